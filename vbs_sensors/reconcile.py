"""The batch reconciler: every unfinished batch follows its Dagster run, whatever happened.

The runs do the work and move their batches through the lifecycle; this sensor covers what a
run cannot say for itself, every few seconds:

- **A run whose process is gone** (the whole platform was killed: power loss, OOM, container
  restart). With Dagster's default run launcher nothing notices that the process of a ``STARTED``
  run no longer exists; the reconciler checks the process ids Dagster recorded and reports such
  a run failed, and Dagster's run retries resume it from its checkpoint.
- **A run that ended without ending its batch**: terminated from the Dagster UI (``CANCELED``)
  means ``cancelled`` with the finished results kept, as an API cancel; failed for good (its
  retries spent) means ``failed``, finished results kept; a run that refused to proceed, or
  materialized only part of the job, gets a whole ``batch_job`` run in its place.
- **A batch with no run at all** (the process that recorded it died before its run was
  requested, or Dagster could not be reached from the API) gets one.
- **A cancel or an expiry with no run to see it** ends the batch.

Webhook events are delivered by the ``webhook_delivery`` sensor, never by this one: a receiver
that hangs must not hold up a tick that resumes runs.

Every action is idempotent and bounded (a batch gets at most ``MAX_RUNS`` runs), so a repeated
tick, or one that dies half-way, changes nothing that the next would not.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from vbs_assets.jobs import batch_job
from vbs_assets.partitions import ACTIVE_RUN_STATUSES, batch_runs
from vbs_assets.runner import finish
from vbs_resources import Bucket, Catalog, Webhooks
from vbs_resources import layout as L
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.wire import TERMINAL_STATUSES, BatchErrorEntry, BatchOptions

# A batch recorded this long ago without a run gets one (its recorder normally requests the
# run within a second; this leaves room for a slow daemon).
NO_RUN_GRACE_SECONDS = 15
# A batch whose input never arrived is failed after this long.
INPUT_GRACE_SECONDS = 600
# A batch gets at most this many runs (retries and runs after platform crashes included).
MAX_RUNS = 10
# How the reconciler words the failure of a run whose process vanished (the platform went down
# under it): such a run's batch gets a new run even when Dagster's own retries are spent.
INTERRUPTED = "The run's processes are gone"

_PID = re.compile(r"\(pid: (\d+)\)")
# What ``reconcile_batch`` says of a batch past its grace that has no run at all.
RUNLESS = "runless"


@dataclass
class Reconciliation:
    run_requests: list[dg.RunRequest] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    # Batches past their grace with no run at all, seen this pass (the next pass's ``runless``).
    runless: list[str] = field(default_factory=list)


# A batch without a run is one the daemon has not launched *yet* while it is still launching:
# the sensor's run requests of a drop of several hundred files take it more than a minute.
RUNLESS_KEPT = 5000


# ---- runs whose process is gone --------------------------------------------------------------


def _process_alive(pid: int, started_before: float) -> bool:
    """True when ``pid`` is a live process created before ``started_before`` (a process with a
    recycled pid, started after a reboot or restart, does not count)."""
    import psutil

    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.create_time() < started_before
    except psutil.Error:
        return False


def run_pids(instance: dg.DagsterInstance, run_id: str) -> set[int]:
    """The processes executing a run, as Dagster's own engine events name them."""
    pids: set[int] = set()
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        text = f"{entry.user_message or ''} {getattr(entry, 'message', '') or ''}"
        pids.update(int(p) for p in _PID.findall(text))
    return pids


def release_orphaned_runs(instance: dg.DagsterInstance, job_name: str = L.BATCH_JOB) -> list[str]:
    """Report ``STARTED``/``CANCELING`` runs whose processes are all gone as failed/canceled.
    Only for Dagster's default run launcher, whose runs are processes of this machine; other
    launchers have Dagster's own run monitoring."""
    from dagster._core.launcher import DefaultRunLauncher

    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []
    actions = []
    records = instance.get_run_records(
        dg.RunsFilter(
            job_name=job_name,
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING],
        )
    )
    for record in records:
        run = record.dagster_run
        pids = run_pids(instance, run.run_id)
        started = (record.start_time or record.create_timestamp.timestamp()) + 30
        if not pids or any(_process_alive(pid, started) for pid in pids):
            continue
        message = (
            f"{INTERRUPTED} ({', '.join(map(str, sorted(pids)))}): the platform was stopped or "
            "killed while it ran."
        )
        if run.status == dg.DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message)
        else:
            instance.report_run_failed(run, message)
        actions.append(f"run {run.run_id}: process gone, reported {run.status.value.lower()}")
    return actions


# ---- batches and their runs -------------------------------------------------------------------


def batch_runs_of(instance: dg.DagsterInstance, batch_id: str) -> list[dg.DagsterRun]:
    """A batch's runs, newest first: those vbs started (tagged with the batch's id) and those
    started from the Dagster UI or a backfill that materialize its batch assets (tagged with its
    partition only)."""
    ours = {dg.AssetKey(L.BATCH_INPUT), dg.AssetKey(L.BATCH_OUTPUT)}
    records = {}
    for tags in ({L.TAG_BATCH_ID: batch_id}, {L.TAG_PARTITION: batch_id}):
        for record in instance.get_run_records(dg.RunsFilter(tags=tags), limit=MAX_RUNS + 1):
            run = record.dagster_run
            if (
                L.TAG_BATCH_ID in tags
                or run.job_name == L.BATCH_JOB
                or (ours & set(run.asset_selection or ()))
            ):
                records[run.run_id] = record
    newest = sorted(records.values(), key=lambda r: r.create_timestamp, reverse=True)
    return [record.dagster_run for record in newest]


def _interrupted(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether the reconciler failed ``run`` because its process vanished."""
    failures = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    return any(INTERRUPTED in (e.message or "") for e in failures)


def _request(row: dict[str, Any], attempt: int) -> dg.RunRequest:
    options = BatchOptions.model_validate({**(row.get("options") or {}), "metadata": {}})
    return dg.RunRequest(
        run_key=f"{row['id']}:reconcile:{attempt}",
        partition_key=row["id"],
        run_config=options.run_config(),
        tags=L.batch_run_tags(row["id"], row.get("original_filename") or ""),
    )


def reconcile_batch(
    instance: dg.DagsterInstance,
    bucket: Bucket,
    lifecycle: BatchLifecycle,
    row: dict[str, Any],
    now: float,
    inbox_names: set[str],
) -> tuple[str | None, dg.RunRequest | None]:
    """What to do for one unfinished batch: (a note of what was done, a run to request)."""
    batch_id = row["id"]
    runs = batch_runs_of(instance, batch_id)
    active = [
        run
        for run in runs
        if run.status in ACTIVE_RUN_STATUSES or run.is_complete_and_waiting_to_retry
    ]
    stopping = row["status"] == "cancelling" or bool(
        row.get("expires_at") and now > row["expires_at"]
    )
    queued = [run for run in active if run.status == dg.DagsterRunStatus.QUEUED]
    if stopping and active and len(queued) == len(active):
        # Waiting in the queue (behind the gpu pool, say) for nothing: out of the queue, and the
        # next tick ends the batch.
        for run in queued:
            instance.run_coordinator.cancel_run(run.run_id)
        return f"{batch_id}: {len(queued)} queued run(s) cancelled", None
    if active:
        return None, None  # its run will see a cancel or an expiry at its next chunk
    # Read again now that its runs are known: a run may have ended it since the tick began.
    catalog = lifecycle.catalog
    row = catalog.batches.get(batch_id) or row
    if row["status"] in TERMINAL_STATUSES:
        return None, None
    sha = row.get("input_sha256")

    def end(status: str, errors: list[BatchErrorEntry] | None = None) -> str | None:
        # Take the batch from whatever run held it (compare and swap), so that a run starting
        # meanwhile finds it taken and stops, instead of both writing its files.
        if not catalog.batches.claim(
            batch_id, f"reconciler-{uuid.uuid4().hex[:12]}", row.get("run_id")
        ):
            return None
        done = finish(bucket, catalog, lifecycle, batch_id, status, sha, errors=errors)
        return f"{batch_id}: {status}" if done else None

    if row["status"] == "cancelling":
        return end("cancelled"), None
    if row.get("expires_at") and now > row["expires_at"]:
        return end("expired"), None
    latest = runs[0] if runs else None
    if latest is not None and latest.status == dg.DagsterRunStatus.CANCELED:
        return end("cancelled"), None  # terminated from Dagster: as an API cancel
    if latest is not None and latest.status == dg.DagsterRunStatus.FAILURE:
        if L.TAG_REFUSED not in latest.tags and not _interrupted(instance, latest):
            error = BatchErrorEntry(
                code="run_failed",
                message=f"The batch's run {latest.run_id} failed and will not be retried; the "
                "results it finished are kept.",
            )
            if L.TAG_ENGINE_UNAVAILABLE in latest.tags:
                error = BatchErrorEntry(
                    code="engine_unavailable",
                    message="The engine server stayed unreachable through every retry of run "
                    f"{latest.run_id}; the results it finished are kept.",
                )
            return end("failed", [error]), None
    if len(runs) >= MAX_RUNS:
        error = BatchErrorEntry(
            code="run_failed", message=f"The batch could not be run in {len(runs)} runs."
        )
        return end("failed", [error]), None
    if latest is None:
        if now - row["created_at"] < NO_RUN_GRACE_SECONDS:
            return None, None
        if not bucket.exists(L.batch_file(batch_id, L.INPUT)):
            if row.get("original_filename") in inbox_names:
                return None, None  # the inbox sensor is still moving it in
            if now - row["created_at"] < INPUT_GRACE_SECONDS:
                return None, None
            error = BatchErrorEntry(code="input_missing", message="The input file never arrived.")
            lifecycle.fail(batch_id, [error])
            return f"{batch_id}: failed, input missing", None
    if latest is None:
        return RUNLESS, _request(row, 0)  # the caller decides: the daemon may be launching it
    # The last run refused, was interrupted, or ran only part of the job.
    return f"{batch_id}: run requested", _request(row, len(runs))


def reconcile(
    instance: dg.DagsterInstance,
    bucket: Bucket,
    catalog: Catalog,
    webhooks: Webhooks,
    now: float | None = None,
    runless: Iterable[str] = (),
) -> Reconciliation:
    """One pass over runs and batches (the sensor's body, without Dagster's context).
    ``runless``: the batches the previous pass found past their grace with no run. A batch with
    none is given one only when it had none on the previous pass too, and that pass's others
    did not get theirs meanwhile: while the daemon is still launching a drop's runs (batches
    leave the set), the reconciler waits instead of asking for a second run of each."""
    now = time.time() if now is None else now
    # Deliveries on threads: a slow receiver never holds a tick past Dagster's sensor timeout
    # (an event whose delivery is cut short is swept up by a later tick).
    lifecycle = BatchLifecycle(catalog, webhooks, deliver_in_background=True)
    result = Reconciliation(actions=release_orphaned_runs(instance))
    inbox_names = {e.name for e in bucket.list_entries(L.INBOX)}
    waiting: list[tuple[str, dg.RunRequest]] = []
    for row in catalog.batches.unfinished():
        note, request = reconcile_batch(instance, bucket, lifecycle, row, now, inbox_names)
        if note == RUNLESS:
            waiting.append((row["id"], request))
            continue
        if note:
            result.actions.append(note)
        if request is not None:
            result.run_requests.append(request)
    previous = set(runless)
    now_runless = {batch_id for batch_id, _ in waiting}
    launching = bool(previous - now_runless)
    for batch_id, request in waiting:
        if batch_id in previous and not launching:
            result.run_requests.append(request)
            result.actions.append(f"{batch_id}: run requested (none was launched)")
    if launching and waiting:
        result.actions.append(
            f"{len(waiting)} batch(es) without a run yet, while runs are being launched: waiting"
        )
    result.runless = sorted(now_runless)[:RUNLESS_KEPT]
    return result


@dg.sensor(
    name=L.RECONCILE_SENSOR,
    job=batch_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes every unfinished batch follow its run: resumes runs whose process died, "
    "ends batches whose run was terminated or failed for good, runs batches that have none.",
)
def batch_reconciler(
    context: dg.SensorEvaluationContext, bucket: Bucket, catalog: Catalog, webhooks: Webhooks
) -> dg.SensorResult | dg.SkipReason:
    previous = json.loads(context.cursor).get("runless", []) if context.cursor else []
    result = reconcile(context.instance, bucket, catalog, webhooks, runless=previous)
    for action in result.actions:
        context.log.info(action)
    cursor = json.dumps({"runless": result.runless})
    if not result.run_requests:
        context.update_cursor(cursor)
        return dg.SkipReason("; ".join(result.actions) or "every unfinished batch has its run")
    return batch_runs(result.run_requests, cursor)
