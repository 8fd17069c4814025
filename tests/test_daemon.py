"""End to end under the real Dagster daemon and webserver (`vbs serve` = `dagster dev`).

A file dropped into the inbox runs as a batch without anyone acting; an identical re-drop runs
nothing; a file still being written is not taken; a run whose process is killed with SIGKILL is
retried by the daemon and resumes from its checkpoint.
"""

import json
import os
import re
import signal
import subprocess
import time

import dagster as dg
import pytest

from tests.conftest import chat_line, jsonl, read_jsonl, wait_for

pytestmark = pytest.mark.slow


def test_servers_listen_on_loopback_only(platform):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    for port in (platform.port, platform.api_port):
        mine = [line for line in out.splitlines() if f":{port} " in line]
        assert mine and all("127.0.0.1:" in line for line in mine)


def test_slowly_written_file_waits_then_runs_to_completion(platform):
    lines = [
        chat_line(f"q{i}", "What is the capital of France?", temperature=0, max_tokens=16)
        for i in range(4)
    ]
    data = jsonl(lines)
    path = platform.inbox / "slow.jsonl"
    # A writer that appends for ~4 s: the sensor must not take the file half-written.
    with open(path, "wb") as fh:
        for i in range(0, len(data), len(data) // 8 + 1):
            fh.write(data[i : i + len(data) // 8 + 1])
            fh.flush()
            time.sleep(0.5)
            assert path.exists(), "the file was taken while still being written"
    batch_id = platform.wait_batch("slow.jsonl", timeout=30)
    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=180)
    assert row["status"] == "completed", row
    assert (row["request_total"], row["request_completed"]) == (4, 4)
    output = read_jsonl(platform.home / "bucket" / "batches" / batch_id / "output.jsonl")
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2", "q3"]
    assert all(
        "Paris" in line["response"]["body"]["choices"][0]["message"]["content"] for line in output
    )
    run = platform.wait_run_finished(batch_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS


def test_identical_redrop_starts_no_second_run(platform):
    batch_id = platform.wait_batch("slow.jsonl")
    data = (platform.home / "bucket" / "batches" / batch_id / "input.jsonl").read_bytes()
    platform.drop("slow-again.jsonl", data)
    wait_for(
        lambda: (platform.inbox / "duplicates" / "slow-again.jsonl").exists(),
        30,
        "the re-drop to be recognized",
    )
    time.sleep(3)  # a few more ticks: still nothing new
    assert len(platform.runs(batch_id)) == 1
    names = [r["original_filename"] for r in platform.resources["catalog"].list_batches()]
    assert "slow-again.jsonl" not in names


def _run_pids(instance, run_id: str) -> set[int]:
    """The processes executing a run, as Dagster's own engine events name them."""
    pids = set()
    for entry in instance.all_logs(run_id):
        pids.update(int(p) for p in re.findall(r"\(pid: (\d+)\)", entry.user_message or ""))
    return pids


def test_killed_run_is_retried_by_the_daemon_and_resumes(platform):
    lines = [
        chat_line(f"k{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(24)
    ]
    platform.drop("kill.metadata.json", json.dumps({"chunk_size": 3}).encode())
    platform.drop("kill.jsonl", jsonl(lines))
    batch_id = platform.wait_batch("kill.jsonl", timeout=30)
    checkpoint = platform.home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 180, "two chunks")
    (run,) = platform.runs(batch_id)
    pids = _run_pids(platform.instance, run.run_id)
    assert pids, "no process found for the run"
    done_before_kill = sum(
        len(p.read_text().splitlines()) for p in checkpoint.glob("chunk-*.jsonl")
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=300)
    assert row["status"] == "completed", row
    platform.wait_run_finished(batch_id)
    runs = sorted(platform.runs(batch_id), key=lambda r: r.run_id != run.run_id)
    assert [r.status for r in runs] == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS]
    assert runs[1].tags.get("dagster/parent_run_id") == run.run_id

    folder = platform.home / "bucket" / "batches" / batch_id
    ids = [
        line["custom_id"]
        for name in ("output.jsonl", "errors.jsonl")
        for line in read_jsonl(folder / name)
    ]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    records = platform.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("batch_output"), asset_partitions=[batch_id]),
        limit=1,
    ).records
    resumed = records[0].asset_materialization.metadata["resumed_requests"].value
    assert resumed >= done_before_kill >= 6


# ---- Dagster's own run controls and UI actions, through the webserver's GraphQL API -----------

TERMINATE = """
mutation Terminate($runId: String!) {
  terminateRun(runId: $runId, terminatePolicy: SAFE_TERMINATE) { __typename }
}
"""

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""

BACKFILL = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  }
}
"""

CANCEL_BACKFILL = """
mutation Cancel($id: String!) { cancelPartitionBackfill(backfillId: $id) { __typename } }
"""

WIPE = """
mutation Wipe($ranges: [PartitionsByAssetSelector!]!) {
  wipeAssets(assetPartitionRanges: $ranges) { __typename }
}
"""

SELECTOR = {"repositoryLocationName": "vbs", "repositoryName": "__repository__"}


def materialize_from_ui(platform, batch_id: str, assets: list[str]) -> str:
    """What the UI's "Materialize" does for one partition of the selected assets."""
    params = {
        "selector": {
            **SELECTOR,
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [{"path": [a]} for a in assets],
            "assetCheckSelection": [],
        },
        "mode": "default",
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": batch_id}]},
    }
    result = platform.graphql(LAUNCH, params=params)["launchPipelineExecution"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def wait_run(platform, run_id: str, timeout: float = 120):
    return wait_for(
        lambda: (run := platform.instance.get_run_by_id(run_id)) and run.is_finished and run,
        timeout,
        f"run {run_id}",
    )


def drop_batch(platform, name: str, lines, chunk_size: int | None = None) -> str:
    if chunk_size:
        platform.drop(f"{name}.metadata.json", json.dumps({"chunk_size": chunk_size}).encode())
    platform.drop(f"{name}.jsonl", jsonl(lines) if isinstance(lines, list) else lines)
    return platform.wait_batch(f"{name}.jsonl", timeout=60)


def snapshot(platform, batch_id: str):
    folder = platform.home / "bucket" / "batches" / batch_id
    files = {p.name: p.read_bytes() for p in folder.glob("*.jsonl") if p.name != "input.jsonl"}
    row = platform.batch(batch_id)
    events = platform.resources["catalog"].batch_events_of(batch_id)
    return {k: v for k, v in row.items() if k not in ("updated_at", "run_id")}, files, events


def test_a_run_terminated_from_dagster_cancels_its_batch_keeping_results(platform):
    lines = [
        chat_line(f"t{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(16)
    ]
    batch_id = drop_batch(platform, "terminate", lines, chunk_size=2)
    checkpoint = platform.home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 180, "two chunks")
    [run] = platform.runs(batch_id)
    assert platform.graphql(TERMINATE, runId=run.run_id)["terminateRun"]["__typename"] == (
        "TerminateRunSuccess"
    )
    row = platform.wait_status(batch_id, {"cancelled", "completed", "failed"}, timeout=60)
    assert row["status"] == "cancelled" and row["cancelled_at"]
    assert 4 <= row["request_completed"] < 16
    output = read_jsonl(platform.home / "bucket" / "batches" / batch_id / "output.jsonl")
    assert len(output) == row["request_completed"] == len({x["custom_id"] for x in output})
    assert platform.wait_run_finished(batch_id).status == dg.DagsterRunStatus.CANCELED


def test_a_run_terminated_during_engine_start_cancels_its_batch(platform):
    batch_id = drop_batch(platform, "early", [chat_line("e0", "Hi.", max_tokens=4)])
    wait_for(lambda: platform.runs(batch_id), 30, "the run")
    [run] = platform.runs(batch_id)
    wait_for(
        lambda: platform.instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED,
        60,
        "the run to start",
    )
    platform.graphql(TERMINATE, runId=run.run_id)
    row = platform.wait_status(batch_id, {"cancelled", "completed", "failed"}, timeout=60)
    assert row["status"] in ("cancelled", "completed")  # it may have finished first
    if row["status"] == "cancelled":
        assert row["request_completed"] + row["request_failed"] <= 1


def test_ui_actions_on_ended_batches_change_nothing(platform):
    """Re-materializing, a backfill over every partition (and cancelling one), a wipe followed
    by batch_output alone: a completed, a failed and a cancelled batch stay exactly as they
    were: no inference, no rewrite, no event, status and errors unchanged."""
    done = drop_batch(platform, "ui-done", [chat_line("u0", "Hi.", max_tokens=4)])
    invalid = drop_batch(platform, "ui-invalid", b"\n\n")
    cancelled = drop_batch(
        platform, "ui-cancel", [chat_line(f"c{i}", "Hi.", max_tokens=32) for i in range(6)], 1
    )
    platform.wait_status(cancelled, {"in_progress", "completed"}, timeout=120)
    from vbs_resources.lifecycle import BatchLifecycle

    BatchLifecycle(platform.resources["catalog"]).request_cancel(cancelled)
    for batch_id, status in ((done, "completed"), (invalid, "failed"), (cancelled, "cancelled")):
        assert platform.wait_status(batch_id, {status}, timeout=180)["status"] == status
        platform.wait_run_finished(batch_id)
    before = {b: snapshot(platform, b) for b in (done, invalid, cancelled)}

    for batch_id in (done, invalid, cancelled):
        run = wait_run(platform, materialize_from_ui(platform, batch_id, ["batch_output"]))
        assert run.status == dg.DagsterRunStatus.SUCCESS
        run = wait_run(
            platform, materialize_from_ui(platform, batch_id, ["batch_input", "batch_output"])
        )
        assert run.status == dg.DagsterRunStatus.SUCCESS
    platform.graphql(WIPE, ranges=[{"assetKey": {"path": ["batch_output"]}}])
    platform.graphql(WIPE, ranges=[{"assetKey": {"path": ["batch_input"]}}])
    for batch_id in (done, invalid):
        run = wait_run(platform, materialize_from_ui(platform, batch_id, ["batch_output"]))
        assert run.status == dg.DagsterRunStatus.SUCCESS

    backfill = {
        "allPartitions": True,
        "assetSelection": [{"path": ["batch_input"]}, {"path": ["batch_output"]}],
    }
    result = platform.graphql(BACKFILL, params=backfill)["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    wait_for(
        lambda: platform.instance.get_backfill(result["backfillId"]).status.value != "REQUESTED",
        600,
        "the backfill",
        interval=2,
    )
    second = platform.graphql(BACKFILL, params=backfill)["launchPartitionBackfill"]
    time.sleep(3)
    platform.graphql(CANCEL_BACKFILL, id=second["backfillId"])
    wait_for(
        lambda: (
            platform.instance.get_backfill(second["backfillId"]).status.value
            not in ("REQUESTED", "CANCELING")
        ),
        300,
        "the cancelled backfill",
        interval=2,
    )
    wait_for(lambda: all(r.is_finished for r in platform.instance.get_runs(limit=50)), 300, "runs")
    after = {b: snapshot(platform, b) for b in (done, invalid, cancelled)}
    assert after == before
    # Every batch of the platform is still in an ending status.
    statuses = {r["status"] for r in platform.resources["catalog"].list_batches(limit=1000)}
    assert statuses <= {"completed", "failed", "cancelled", "expired"}


# ---- the whole platform ----------------------------------------------------------------------


def test_the_whole_platform_killed_mid_batch_finishes_it_after_a_restart(
    tmp_path_factory, model_dir
):
    """Every process of `vbs serve` killed at once mid-batch (power loss), then `vbs serve` again
    on the same VBS_HOME: without anyone acting, the batch completes from its checkpoint, each
    custom_id exactly once. Then a stop (SIGTERM) is quick and leaves no process behind."""
    from tests.conftest import Platform, start_platform

    home = tmp_path_factory.mktemp("crash") / "vbs"
    process = start_platform(home, model_dir)
    platform = Platform(home, process.port, process.api_port, process.log, process)
    lines = [
        chat_line(f"p{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(32)
    ]
    batch_id = drop_batch(platform, "power", lines, chunk_size=4)
    checkpoint = home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 240, "two chunks")
    process.kill_everything()
    before = platform.batch(batch_id)
    assert before["status"] == "in_progress" and 8 <= before["request_completed"] < 32

    process.start()
    try:
        row = platform.wait_status(batch_id, {"completed", "failed", "cancelled"}, timeout=300)
        assert row["status"] == "completed", row
        ids = [
            line["custom_id"]
            for name in ("output.jsonl", "errors.jsonl")
            for line in read_jsonl(home / "bucket" / "batches" / batch_id / name)
        ]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)
        records = platform.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("batch_output"), asset_partitions=[batch_id]
            ),
            limit=1,
        ).records
        resumed = records[0].asset_materialization.metadata["resumed_requests"].value
        assert resumed >= before["request_completed"]
        events = platform.resources["catalog"].batch_events_of(batch_id)
        assert [e["type"] for e in events] == ["batch.completed"]
    finally:
        seconds = process.stop()
    assert seconds < 15
    assert process.processes() == []
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
