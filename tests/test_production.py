"""The platform in its production set-up, chosen by configuration alone: `vbs serve` (Dagster's
production processes) with ``VBS_CATALOG_URL`` and ``VBS_DAGSTER_STORAGE_URL`` naming databases
of the session's real PostgreSQL 15, and ``VBS_BUCKET_URL`` a bucket of the session's real S3
server (moto's server mode), nothing mocked.

A platform of its own with two gpu slots and JSON logs: the inbox and the API at once with
several writers and two runs holding the gpu pool side by side, a re-materialization from the
Dagster UI, uploads and downloads through the bucket, `vbs query` on the results in S3, a
fine-tuning job trained from the bucket and deployed from it, the secrets kept out of every log
and record, JSON logs, and the whole platform killed mid-batch (last)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import time

import dagster as dg
import pytest
from openai import OpenAI

from tests.conftest import (
    Platform,
    chat_line,
    drop_batch,
    drop_counting_batch,
    jsonl,
    start_platform,
    wait_for,
)
from tests.test_dagster_ui import materialize_from_ui, snapshot, wait_run

pytestmark = [pytest.mark.slow, pytest.mark.production]
ENDED = {"completed", "failed", "cancelled", "expired"}
PASSWORD = "pg-Secret-4711"


@pytest.fixture(scope="module")
def pg_platform(tmp_path_factory, model_dir, postgres, s3, webhook_receiver):
    home = tmp_path_factory.mktemp("production") / "vbs"
    # With a password (the test server trusts any), to show it reaches no log and no metadata.
    process = start_platform(
        home,
        model_dir,
        VBS_CATALOG_URL=postgres.database("catalog").replace("vbs@", f"vbs:{PASSWORD}@"),
        # The plain form a team writes: vbs uses psycopg2 for it.
        VBS_DAGSTER_STORAGE_URL=postgres.database("dagster").replace(
            "postgresql+psycopg2://vbs@", f"postgresql://vbs:{PASSWORD}@"
        ),
        VBS_BUCKET_URL=s3.bucket_url(),
        VBS_GPU_SLOTS="2",
        VBS_LOG_FORMAT="json",
        VBS_WEBHOOK_URLS=webhook_receiver.url,
        VBS_TRAINER_THREADS="1",
    )
    platform = Platform(home, process.port, process.api_port, process.log, process)
    try:
        yield platform
    finally:
        process.stop()


def client_of(platform) -> OpenAI:
    return OpenAI(base_url=platform.api_url, api_key="none", max_retries=0)


def test_nothing_of_the_state_is_in_sqlite_or_a_local_folder(pg_platform):
    assert type(pg_platform.instance.run_storage).__name__ == "PostgresRunStorage"
    assert pg_platform.resources["catalog"].engine.dialect.name == "postgresql"
    assert not list(pg_platform.home.glob("**/*.db")), list(pg_platform.home.glob("**/*.db"))
    assert pg_platform.bucket.uri("inbox").startswith("s3://")
    assert not (pg_platform.home / "bucket").exists()


def test_several_writers_at_once_lose_and_double_nothing(pg_platform, webhook_receiver):
    """At once: three API creates (one cancelled as soon as it exists), two files dropped into
    the inbox, the reconciler and the delivery sensor ticking, and two runs holding the gpu pool
    side by side. Counted afterwards: one batch per create and per file, every request answered
    once, one ending event and one delivery per batch, one run per batch."""
    platform, client = pg_platform, client_of(pg_platform)
    upload = client.files.create(
        file=("w.jsonl", jsonl([chat_line(f"r{i}", f"Say {i}.", max_tokens=4) for i in range(4)])),
        purpose="batch",
    )

    def create(n: int) -> tuple[str, bool]:
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
            metadata={"writer": f"api-{n}"},
        )  # fmt: skip
        if n < 1:
            client.batches.cancel(batch.id)
        return batch.id, n < 1

    def drop(n: int) -> None:
        lines = [chat_line(f"d{n}-{i}", f"Name {i} fruit.", max_tokens=4) for i in range(4)]
        platform.drop(f"writer-{n}.jsonl", jsonl(lines))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        dropping = pool.map(drop, range(2))
        created = list(pool.map(create, range(3)))
        list(dropping)
    dropped = [platform.wait_batch(f"writer-{n}.jsonl", timeout=120) for n in range(2)]
    batch_ids = [b for b, _ in created] + dropped
    assert len(set(batch_ids)) == 5
    catalog = platform.resources["catalog"]
    rows = {b: platform.wait_status(b, ENDED, timeout=600) for b in batch_ids}

    for batch_id, was_cancelled in created:
        row = rows[batch_id]
        assert row["status"] == ("cancelled" if was_cancelled else "completed"), row
    files = [r for r in catalog.batches.list(limit=1000) if r["original_filename"]]
    for n in range(2):  # the same file was never taken twice
        assert [r["original_filename"] for r in files].count(f"writer-{n}.jsonl") == 1
    for batch_id, row in rows.items():
        output = f"batches/{batch_id}/output.jsonl"
        out = platform.read_jsonl(output) if platform.bucket.exists(output) else []
        ids = [line["custom_id"] for line in out]
        assert len(ids) == len(set(ids)) == row["request_completed"], batch_id
        if row["status"] == "completed":
            assert row["request_completed"] == 4 and row["request_failed"] == 0, row
        events = catalog.events.of_subject(batch_id)
        assert [e["type"] for e in events] == [f"batch.{row['status']}"], events
    for batch_id in batch_ids:  # delivered once each, by the delivery sensor
        wait_for(lambda b=batch_id: webhook_receiver.events_for(b), 120, f"{batch_id}'s webhook")
    time.sleep(6)  # a sensor tick: nothing is sent twice
    for batch_id in batch_ids:
        assert len(webhook_receiver.events_for(batch_id)) == 1, batch_id

    runs = {b: platform.runs(b) for b in batch_ids}
    for batch_id, row in rows.items():
        if row["status"] == "completed":
            [run] = runs[batch_id]  # no second run from the reconciler
            assert run.status == dg.DagsterRunStatus.SUCCESS
    # Two slots of the gpu pool: two runs overlapped.
    spans = sorted(
        (record.start_time, record.end_time)
        for record in platform.instance.get_run_records(
            dg.RunsFilter(run_ids=[r.run_id for rs in runs.values() for r in rs])
        )
        if record.start_time
    )
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_the_database_password_is_in_no_log_file_and_no_run_record(pg_platform):
    platform = pg_platform
    assert PASSWORD not in platform.log.read_text(errors="replace")
    for path in platform.home.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert PASSWORD.encode() not in path.read_bytes(), path
    for run in platform.instance.get_runs(limit=100):
        assert PASSWORD not in json.dumps(run.run_config, default=str), run.run_id
        for entry in platform.instance.all_logs(run.run_id):
            assert PASSWORD not in str(entry), run.run_id


def test_a_rematerialization_from_the_ui_changes_nothing(pg_platform):
    platform = pg_platform
    batch_id = drop_batch(platform, "ui-pg", [chat_line("u", "Hi.", max_tokens=4)])
    assert platform.wait_status(batch_id, ENDED, timeout=300)["status"] == "completed"
    platform.wait_run_finished(batch_id)
    catalog = platform.resources["catalog"]
    wait_for(lambda: catalog.events.of_subject(batch_id)[0]["delivered_at"], 60, "the webhook")
    before = snapshot(platform, batch_id)
    run = wait_run(platform, materialize_from_ui(platform, batch_id, ["batch_output"]), 300)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert snapshot(platform, batch_id) == before


def test_the_logs_are_json_lines_from_the_api_the_sensors_and_the_runs(pg_platform):
    lines = pg_platform.log.read_text(errors="replace").splitlines()
    records = []
    for line in lines:
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    api = [r for r in records if r.get("logger") == "vbs.api"]
    sensors = [r for r in records if str(r.get("logger", "")).startswith("dagster.daemon.Sensor")]
    runs = [r for r in records if r.get("run_id")]
    assert api and all({"timestamp", "level", "event"} <= r.keys() for r in api), api[:3]
    assert any("inbox_sensor" in r.get("event", "") for r in sensors), sensors[:5]
    # The inbox sensor's own lines ("<file> -> batch <id>").
    assert any(" -> batch batch_" in r.get("event", "") for r in records)
    steps = {r.get("step_key") for r in runs}
    assert {"STEP_START", "STEP_SUCCESS"} <= {r.get("dagster_event_type") for r in runs}
    assert "batch_output" in steps, sorted(s for s in steps if s)
    # Nothing of vbs's or Dagster's in their text formats.
    text = [line for line in lines if not line.startswith("{")]
    assert not [line for line in text if " - dagster - " in line][:3]
    assert not [line for line in text if re.match(r"^\d{4}-\d\d-\d\d \S+ vbs\.", line)][:3]


def test_uploads_downloads_and_queries_go_through_the_bucket(pg_platform):
    """A 4 MiB upload streams into an object and back out byte for byte; a batch's output is
    downloaded from S3 through the API; `vbs query` reads its results.parquet from S3."""
    platform, client = pg_platform, client_of(pg_platform)
    line = jsonl([chat_line("pad", "x" * 2000, max_tokens=1)])
    big = line * (4 * 1024 * 1024 // len(line) + 1)
    upload = client.files.create(file=("big.jsonl", big), purpose="batch")
    row = platform.resources["catalog"].files.get(upload.id)
    assert platform.bucket.size(row["path"]) == len(big)
    assert client.files.content(upload.id).read() == big

    small = client.files.create(
        file=("q.jsonl", jsonl([chat_line(f"q{i}", "Say yes.", max_tokens=4) for i in range(3)])),
        purpose="batch",
    )
    batch = client.batches.create(
        input_file_id=small.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert platform.wait_status(batch.id, ENDED, timeout=300)["status"] == "completed"
    done = client.batches.retrieve(batch.id)
    downloaded = client.files.content(done.output_file_id).read()
    assert downloaded == platform.bucket.read_bytes(f"batches/{batch.id}/output.jsonl")
    assert sorted(json.loads(x)["custom_id"] for x in downloaded.splitlines()) == ["q0", "q1", "q2"]
    results = f"batches/{batch.id}/results.parquet"
    wait_for(lambda: platform.bucket.exists(results), 120, "results.parquet in the bucket")
    env = {**os.environ, **platform.env, "PATH": "/usr/bin:/bin"}
    sql = f"SELECT custom_id FROM results WHERE batch_id = '{batch.id}' ORDER BY custom_id"
    query = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "query", sql, "--format", "json"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    assert [json.loads(x)["custom_id"] for x in query.stdout.splitlines()] == ["q0", "q1", "q2"]


def test_a_fine_tuning_job_trains_from_the_bucket_and_deploys_from_it(pg_platform):
    """The dataset is read from S3, the adapter is written to S3, and the engine serves the
    deployed model from a local copy of it; its lineage reaches the uploaded file."""
    from tests.conftest import start_short_fine_tune, wait_job_ended

    platform, client = pg_platform, client_of(pg_platform)
    job = start_short_fine_tune(client, "s3")
    done = wait_job_ended(client, job.id)
    assert done.status == "succeeded", done
    row = platform.resources["catalog"].fine_tuning.get(job.id)
    assert row["adapter_path"] == platform.bucket.uri(f"adapters/{job.id}")
    assert platform.bucket.exists(f"adapters/{job.id}/adapter_config.json")
    deployed = client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    model = deployed["model"]
    wait_for(lambda: model in [m.id for m in client.models.list().data], 300, "the deployment")
    lines = [chat_line("ft", "Write one short sentence about tea.", max_tokens=8)]
    lines[0]["body"]["model"] = model
    batch_id = drop_batch(platform, "fine-tuned-s3", lines)
    assert platform.wait_status(batch_id, ENDED, timeout=300)["status"] == "completed"
    [answer] = platform.read_jsonl(f"batches/{batch_id}/output.jsonl")
    assert answer["response"]["body"]["model"] == model
    from vbs_resources.lineage import model_lineage

    chain = model_lineage(platform.resources["catalog"], model)
    assert chain["adapter"]["path"] == row["adapter_path"]
    assert job.training_file in json.dumps(chain["dataset"])  # back to the uploaded file


def test_the_whole_platform_killed_mid_batch_finishes_it_after_a_restart(pg_platform):
    """Every process of `vbs serve` killed at once (PostgreSQL, a server of its own, stays):
    the next start finishes the batch from its checkpoint, each custom_id once."""
    platform = pg_platform
    batch_id, lines = drop_counting_batch(platform, "power-pg", 24, 4, timeout=300)
    platform.process.kill_everything()
    before = platform.batch(batch_id)
    assert before["status"] == "in_progress" and 8 <= before["request_completed"] < 24

    platform.process.start()
    row = platform.wait_status(batch_id, ENDED, timeout=300)
    assert row["status"] == "completed", row
    out = platform.read_jsonl(f"batches/{batch_id}/output.jsonl")
    assert sorted(line["custom_id"] for line in out) == sorted(x["custom_id"] for x in lines)
    assert platform.read_jsonl(f"batches/{batch_id}/errors.jsonl") == []  # an object, empty
    events = platform.resources["catalog"].events.of_subject(batch_id)
    assert [e["type"] for e in events] == ["batch.completed"]
    # The run that finished it (a retry of the killed one, or the reconciler's) succeeded.
    assert platform.wait_run_finished(batch_id, 120).status == dg.DagsterRunStatus.SUCCESS
