"""The platform on PostgreSQL, chosen by configuration alone: `vbs serve` with
``VBS_CATALOG_URL`` and ``VBS_DAGSTER_STORAGE_URL`` naming databases of the session's real
PostgreSQL 15, nothing mocked.

A platform of its own with two gpu slots and JSON logs: the inbox and the API at once with
several writers and two runs holding the gpu pool side by side, a re-materialization from the
Dagster UI, the database password kept out of every log and record, JSON logs, and the whole
platform killed mid-batch (last). About 200 s alone: `make test-production` runs it, `make test`
leaves it out (its 25-minute budget)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import re
import time

import dagster as dg
import pytest
from openai import OpenAI

from tests.conftest import (
    Platform,
    chat_line,
    drop_batch,
    jsonl,
    read_jsonl,
    start_platform,
    wait_for,
)
from tests.test_dagster_ui import materialize_from_ui, snapshot, wait_run

# Not in `make test` (its 25-minute budget): `make test-production` runs this module.
pytestmark = [pytest.mark.slow, pytest.mark.production]
ENDED = {"completed", "failed", "cancelled", "expired"}
PASSWORD = "pg-Secret-4711"


@pytest.fixture(scope="module")
def pg_platform(tmp_path_factory, model_dir, postgres, webhook_receiver):
    home = tmp_path_factory.mktemp("postgres") / "vbs"
    # With a password (the test server trusts any), to show it reaches no log and no metadata.
    process = start_platform(
        home,
        model_dir,
        VBS_CATALOG_URL=postgres.database("catalog").replace("vbs@", f"vbs:{PASSWORD}@"),
        # The plain form a team writes: vbs uses psycopg2 for it.
        VBS_DAGSTER_STORAGE_URL=postgres.database("dagster").replace(
            "postgresql+psycopg2://vbs@", f"postgresql://vbs:{PASSWORD}@"
        ),
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


def test_nothing_of_the_state_is_in_sqlite(pg_platform):
    assert type(pg_platform.instance.run_storage).__name__ == "PostgresRunStorage"
    assert pg_platform.resources["catalog"].engine.dialect.name == "postgresql"
    assert not list(pg_platform.home.glob("**/*.db")), list(pg_platform.home.glob("**/*.db"))


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
        folder = platform.home / "bucket" / "batches" / batch_id
        out = read_jsonl(folder / "output.jsonl") if (folder / "output.jsonl").exists() else []
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


def test_the_whole_platform_killed_mid_batch_finishes_it_after_a_restart(pg_platform):
    """Every process of `vbs serve` killed at once (PostgreSQL, a server of its own, stays):
    the next start finishes the batch from its checkpoint, each custom_id once."""
    platform = pg_platform
    lines = [
        chat_line(f"p{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(24)
    ]
    batch_id = drop_batch(platform, "power-pg", lines, chunk_size=4)
    checkpoint = platform.home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 300, "two chunks")
    platform.process.kill_everything()
    before = platform.batch(batch_id)
    assert before["status"] == "in_progress" and 8 <= before["request_completed"] < 24

    platform.process.start()
    row = platform.wait_status(batch_id, ENDED, timeout=300)
    assert row["status"] == "completed", row
    out = read_jsonl(platform.home / "bucket" / "batches" / batch_id / "output.jsonl")
    assert sorted(line["custom_id"] for line in out) == sorted(x["custom_id"] for x in lines)
    events = platform.resources["catalog"].events.of_subject(batch_id)
    assert [e["type"] for e in events] == ["batch.completed"]
    # The run that finished it (a retry of the killed one, or the reconciler's) succeeded.
    assert platform.wait_run_finished(batch_id, 120).status == dg.DagsterRunStatus.SUCCESS
