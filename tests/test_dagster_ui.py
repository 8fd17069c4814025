"""Dagster's own run controls and UI actions, sent through the webserver's GraphQL API as the UI
sends them, on a platform of their own (so that "every partition" means a few): a terminated run
cancels its batch keeping what finished; materializing, backfilling or wiping ended batches
changes nothing about them."""

import json
import time

import dagster as dg
import pytest

from tests.conftest import (
    Platform,
    chat_line,
    drop_counting_batch,
    jsonl,
    read_jsonl,
    start_platform,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("ui") / "vbs"
    # Three runs may hold the gpu pool at once: the runs of ended batches do no inference, and
    # the backfills' runs then overlap instead of queueing one by one.
    process = start_platform(home, model_dir, VBS_GPU_SLOTS="3")
    try:
        yield Platform(home, process.port, process.api_port, process.log, process)
    finally:
        process.stop()


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
    events = platform.resources["catalog"].events.of_subject(batch_id)
    return {k: v for k, v in row.items() if k not in ("updated_at", "run_id")}, files, events


def test_ui_actions_on_ended_batches_change_nothing(platform):
    """First in its module, so that the backfill's every partition is this test's three.
    Re-materializing, a backfill over every partition (and cancelling one), a wipe followed
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

    # Launched together (as clicks in the UI would be), then each waited for.
    launched = [materialize_from_ui(platform, b, ["batch_output"]) for b in before]
    for run_id in launched:
        assert wait_run(platform, run_id, 300).status == dg.DagsterRunStatus.SUCCESS
    platform.graphql(WIPE, ranges=[{"assetKey": {"path": ["batch_output"]}}])
    platform.graphql(WIPE, ranges=[{"assetKey": {"path": ["batch_input"]}}])
    launched = [materialize_from_ui(platform, b, ["batch_output"]) for b in (done, invalid)]
    for run_id in launched:
        assert wait_run(platform, run_id, 300).status == dg.DagsterRunStatus.SUCCESS

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
    statuses = {r["status"] for r in platform.resources["catalog"].batches.list(limit=1000)}
    assert statuses <= {"completed", "failed", "cancelled", "expired"}


def test_a_run_terminated_from_dagster_cancels_its_batch_keeping_results(platform):
    batch_id, _ = drop_counting_batch(platform, "terminate", 16, 2, timeout=180)
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
    # A cancel through the API afterwards is refused, and the batch stays as it is.
    from openai import BadRequestError, OpenAI

    api = OpenAI(base_url=platform.api_url, api_key="none", max_retries=0)
    with pytest.raises(BadRequestError):
        api.batches.cancel(batch_id)
    assert platform.batch(batch_id)["status"] == "cancelled"


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
