"""The reconciler: every unfinished batch follows its Dagster run (runs made here with Dagster's
own test helper, in each status the reconciler must handle)."""

import subprocess
import sys
import time

import dagster as dg
import pytest
from dagster._core.storage.tags import WILL_RETRY_TAG
from dagster._core.test_utils import create_run_for_test

from tests.conftest import chat_line, read_jsonl, submit
from vbs_assets.ingest import batch_input
from vbs_assets.runner import Checkpoint, output_line
from vbs_resources import EngineResult
from vbs_resources import layout as L
from vbs_resources.lifecycle import BatchLifecycle
from vbs_sensors.reconcile import MAX_RUNS, reconcile, release_orphaned_runs


@pytest.fixture
def batch(resources, instance):
    """A validated 3-request batch, in progress, with one request finished in its checkpoint."""
    lines = [chat_line(f"q{i}", "hi", chunk=i) for i in range(3)]
    batch_id = submit(resources, instance, lines, name="rec.jsonl")
    dg.materialize([batch_input], partition_key=batch_id, instance=instance, resources=resources)
    catalog = resources["catalog"]
    BatchLifecycle(catalog).start(batch_id)
    row = catalog.batches.get(batch_id)
    checkpoint = Checkpoint(resources["bucket"], batch_id)
    checkpoint.load(row["input_sha256"])
    body = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    checkpoint.write(0, [output_line(EngineResult("q0", 200, body, 3, 2))])
    return batch_id


def run_for(instance, batch_id, status, **tags):
    return create_run_for_test(
        instance,
        job_name=L.BATCH_JOB,
        status=status,
        tags={L.TAG_BATCH_ID: batch_id, L.TAG_PARTITION: batch_id, **tags},
    )


def tick(instance, resources, now=None, runless=()):
    return reconcile(
        instance, resources["bucket"], resources["catalog"], resources["webhooks"], now=now,
        runless=runless,
    )  # fmt: skip


def outputs(resources, batch_id):
    folder = resources["bucket"].path(f"batches/{batch_id}")
    return [x["custom_id"] for x in read_jsonl(__import__("pathlib").Path(folder) / "output.jsonl")]


def test_a_run_terminated_from_dagster_ends_its_batch_cancelled_keeping_results(
    instance, resources, batch
):
    run_for(instance, batch, dg.DagsterRunStatus.CANCELED)
    result = tick(instance, resources)
    assert result.run_requests == [] and f"{batch}: cancelled" in result.actions
    row = resources["catalog"].batches.get(batch)
    assert row["status"] == "cancelled" and row["request_completed"] == 1
    assert row["output_file_id"] and outputs(resources, batch) == ["q0"]
    assert [e["type"] for e in resources["catalog"].events.of_subject(batch)] == ["batch.cancelled"]
    assert tick(instance, resources).actions == []  # nothing more to do, ever


def test_a_run_failed_for_good_fails_its_batch_keeping_results(instance, resources, batch):
    run = run_for(instance, batch, dg.DagsterRunStatus.FAILURE, **{WILL_RETRY_TAG: "false"})
    tick(instance, resources)
    row = resources["catalog"].batches.get(batch)
    assert row["status"] == "failed" and row["errors"][0]["code"] == "run_failed"
    assert run.run_id in row["errors"][0]["message"]
    assert outputs(resources, batch) == ["q0"]


def test_a_run_waiting_for_its_retry_is_left_alone(instance, resources, batch):
    run_for(instance, batch, dg.DagsterRunStatus.FAILURE, **{WILL_RETRY_TAG: "true"})
    assert tick(instance, resources).actions == []
    assert resources["catalog"].batches.get(batch)["status"] == "in_progress"


def test_an_active_run_sees_a_cancel_itself(instance, resources, batch):
    run_for(instance, batch, dg.DagsterRunStatus.STARTED)  # no process recorded yet
    BatchLifecycle(resources["catalog"]).request_cancel(batch)
    assert tick(instance, resources).actions == []
    assert resources["catalog"].batches.get(batch)["status"] == "cancelling"


def test_a_cancel_with_no_run_to_see_it_ends_the_batch(instance, resources, batch):
    BatchLifecycle(resources["catalog"]).request_cancel(batch)
    tick(instance, resources)
    assert resources["catalog"].batches.get(batch)["status"] == "cancelled"


def test_past_its_window_with_no_run_a_batch_expires(instance, resources, batch):
    resources["catalog"].batches.update_unfinished(batch, expires_at=1)
    run_for(instance, batch, dg.DagsterRunStatus.CANCELED)
    tick(instance, resources)
    row = resources["catalog"].batches.get(batch)
    assert (row["status"], row["request_completed"], row["request_failed"]) == ("expired", 1, 2)


def test_a_batch_without_a_run_gets_one_after_a_grace(instance, resources):
    lines = [chat_line("a", "hi")]
    data = b"".join(__import__("json").dumps(x).encode() + b"\n" for x in lines)
    resources["bucket"].write_bytes("inbox/orphan.jsonl", data)
    resources["bucket"].write_bytes("inbox/orphan.metadata.json", b'{"chunk_size": 5}')
    from vbs_sensors.inbox import take

    lifecycle = BatchLifecycle(resources["catalog"])
    sidecar = next(e for e in resources["bucket"].list_entries("inbox") if e.name.endswith(".json"))
    batch_id, _ = take(resources["bucket"], lifecycle, "orphan.jsonl", sidecar)
    # The process that took it died before its run was requested.
    assert tick(instance, resources).run_requests == []  # within the grace
    first = tick(instance, resources, now=time.time() + 60)
    assert first.run_requests == [] and first.runless == [batch_id]  # seen once: maybe launching
    result = tick(instance, resources, now=time.time() + 65, runless=first.runless)
    [request] = result.run_requests
    assert request.partition_key == batch_id
    assert request.run_config == {"ops": {"batch_output": {"config": {"chunk_size": 5}}}}
    assert request.tags[L.TAG_BATCH_ID] == batch_id


def test_a_refused_or_partial_run_gets_a_whole_run_a_bounded_number_of_times(
    instance, resources, batch
):
    run_for(instance, batch, dg.DagsterRunStatus.SUCCESS)  # batch_input alone, say
    assert [r.partition_key for r in tick(instance, resources).run_requests] == [batch]
    run_for(instance, batch, dg.DagsterRunStatus.FAILURE, **{L.TAG_REFUSED: "not validated"})
    assert [r.partition_key for r in tick(instance, resources).run_requests] == [batch]
    for _ in range(MAX_RUNS):
        run_for(instance, batch, dg.DagsterRunStatus.SUCCESS)
    assert tick(instance, resources).run_requests == []
    row = resources["catalog"].batches.get(batch)
    assert row["status"] == "failed" and "could not be run" in row["errors"][0]["message"]


def test_a_started_run_whose_process_is_gone_is_reported_failed(instance, resources):
    from dagster._core.launcher import DefaultRunLauncher

    assert isinstance(instance.run_launcher, DefaultRunLauncher)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = run_for(instance, "batch_gone0001", dg.DagsterRunStatus.STARTED)
    alive = run_for(instance, "batch_live0001", dg.DagsterRunStatus.STARTED)
    instance.report_engine_event(f"Started process for run (pid: {dead.pid}).", gone)
    import os

    instance.report_engine_event(f"Started process for run (pid: {os.getpid()}).", alive)
    actions = release_orphaned_runs(instance)
    assert actions == [f"run {gone.run_id}: process gone, reported started"]
    assert instance.get_run_by_id(gone.run_id).status == dg.DagsterRunStatus.FAILURE
    assert instance.get_run_by_id(alive.run_id).status == dg.DagsterRunStatus.STARTED


def test_a_run_interrupted_by_the_platform_going_down_gets_a_new_run(instance, resources, batch):
    """Its retries spent or not, a run whose process vanished is not the batch's failure."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = run_for(instance, batch, dg.DagsterRunStatus.STARTED)
    instance.report_engine_event(f"Started process for run (pid: {dead.pid}).", run)
    instance.add_run_tags(run.run_id, {"dagster/retry_number": "2"})  # retries spent
    result = tick(instance, resources)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert [r.partition_key for r in result.run_requests] == [batch]
    assert resources["catalog"].batches.get(batch)["status"] == "in_progress"


def test_a_batch_its_run_ended_during_the_tick_is_never_touched(instance, resources, batch):
    """The tick read the batch unfinished; its run then completed it and removed the checkpoint.
    The reconciler must not rewrite its files (with an empty checkpoint) or change it."""
    from vbs_assets.runner import finish
    from vbs_sensors.reconcile import reconcile_batch

    catalog, bucket = resources["catalog"], resources["bucket"]
    stale = catalog.batches.get(batch)
    lifecycle = BatchLifecycle(catalog)
    sha = stale["input_sha256"]
    assert finish(bucket, catalog, lifecycle, batch, "completed", sha)  # the run ends it
    output = bucket.read_bytes(f"batches/{batch}/output.jsonl")
    assert not bucket.exists(f"batches/{batch}/checkpoint")
    before = catalog.batches.get(batch)
    run_for(instance, batch, dg.DagsterRunStatus.CANCELED)
    stale = {**stale, "status": "cancelling"}
    assert reconcile_batch(instance, bucket, lifecycle, stale, time.time(), set()) == (None, None)
    assert not finish(bucket, catalog, lifecycle, batch, "expired", sha)
    assert bucket.read_bytes(f"batches/{batch}/output.jsonl") == output
    assert catalog.batches.get(batch) == before
    assert not bucket.exists(f"batches/{batch}/checkpoint")


def test_a_validated_batch_from_before_the_upgrade_records_its_hash_and_resumes(
    instance, resources, batch
):
    """A batch validated by the previous vbs has no recorded hash; batch_input records it,
    keeping the checkpoint (which is tied to the same hash)."""
    import sqlalchemy as sa

    from vbs_assets.ingest import ingest
    from vbs_assets.validation import Limits
    from vbs_resources.catalog import batches

    catalog = resources["catalog"]
    sha = catalog.batches.get(batch)["input_sha256"]
    with catalog.engine.begin() as conn:
        conn.execute(sa.update(batches).where(batches.c.id == batch).values(input_sha256=None))
    report = ingest(resources["bucket"], catalog, BatchLifecycle(catalog), batch, Limits())
    assert report.recorded and report.sha256 == sha
    assert catalog.batches.get(batch)["input_sha256"] == sha
    progress = Checkpoint(resources["bucket"], batch).read(sha)
    assert progress is not None and progress.done == {"q0"}


def test_batches_waiting_for_the_daemon_to_launch_their_runs_get_no_second_run(instance, resources):
    """300 files dropped at once took the daemon over 60 s to launch; the reconciler asked for a
    second run for 178 of them. Here 300 batches, their runs launched a hundred a tick. While batches keep getting their runs, it waits; it steps in
    only for batches still without one once launching has stopped."""
    from vbs_resources.lifecycle import BatchLifecycle

    lifecycle = BatchLifecycle(resources["catalog"])
    ids = [f"batch_drop{n:06d}" for n in range(300)]
    for batch_id in ids:
        lifecycle.create(batch_id, source="inbox", input_file_id="file-x")
        resources["bucket"].write_bytes(f"batches/{batch_id}/input.jsonl", b"{}\n")
    later = time.time() + 60  # every batch past its grace
    first = tick(instance, resources, now=later)
    assert first.run_requests == [] and first.runless == sorted(ids)
    # The daemon launches a hundred of them (a run not started yet is the batch's run).
    for batch_id in ids[:100]:
        run_for(instance, batch_id, dg.DagsterRunStatus.NOT_STARTED)
    second = tick(instance, resources, now=later + 5, runless=first.runless)
    assert second.run_requests == [] and second.runless == sorted(ids[100:])
    # It launches a hundred more: still waiting.
    for batch_id in ids[100:200]:
        run_for(instance, batch_id, dg.DagsterRunStatus.NOT_STARTED)
    third = tick(instance, resources, now=later + 10, runless=second.runless)
    assert third.run_requests == [] and third.runless == sorted(ids[200:])
    # Launching stopped with a hundred left: those, and only those, get a run now.
    fourth = tick(instance, resources, now=later + 15, runless=third.runless)
    assert sorted(r.partition_key for r in fourth.run_requests) == sorted(ids[200:])
    assert {r.run_key for r in fourth.run_requests} == {f"{b}:reconcile:0" for b in ids[200:]}
