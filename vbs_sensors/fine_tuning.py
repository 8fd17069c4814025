"""The fine-tuning reconciler: every unfinished fine-tuning job and deployment follows its
Dagster run, as ``batch_reconciler`` makes batches follow theirs. A GET of a job only reads; this
sensor is what ends a job whose run ended without ending it.

Every few seconds, for each job (and each deployment) in flight:

- **No run yet** (the API could not reach Dagster, or died before launching): one is requested,
  with the job's tag and a run key of its own, so it is requested once.
- **Its run is in flight**: nothing to do.
- **Its run failed and Dagster will retry it** (``dagster/will_retry=true``): the retry run takes
  the job over (its assets do, and so does this sensor once the retry exists). Dagster stores a
  run's failure before it tags the retry decision, so an untagged failure younger than
  ``RETRY_DECISION_GRACE_S`` is not read yet.
- **Its run failed for good, or was terminated** (the Dagster UI): the job ends ``failed`` or
  ``cancelled``; a deployment ends ``failed``.
- **Its run succeeded without ending it** (a materialization of ``fine_tuned_adapter`` alone):
  a trained job succeeds, recording that it was not evaluated; anything else fails.

Runs whose processes vanished with the whole platform are reported failed first (as the batch
reconciler does), so Dagster retries them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from vbs_assets.jobs import deploy_job, fine_tuning_job, training_job
from vbs_assets.partitions import ACTIVE_RUN_STATUSES, dataset_version_partitions
from vbs_resources import Catalog, Webhooks
from vbs_resources import layout as L
from vbs_resources.training.jobs import deploy_run_config, training_run_config
from vbs_resources.training.lifecycle import FineTuningLifecycle, is_trained
from vbs_sensors.reconcile import release_orphaned_runs

# A job or deployment recorded this long ago without a run gets one requested.
NO_RUN_GRACE_S = 15
# Dagster marks a run failed, then tags whether the daemon will retry it.
RETRY_DECISION_GRACE_S = 60
# A run tagged for a retry whose retry never appeared is read as failed after this long.
RETRY_START_GRACE_S = 300
TAG_WILL_RETRY = "dagster/will_retry"
TAG_PARENT = "dagster/parent_run_id"


@dataclass
class FineTuningReconciliation:
    run_requests: list[dg.RunRequest] = field(default_factory=list)
    versions: set[str] = field(default_factory=set)  # dataset_versions partitions they need
    actions: list[str] = field(default_factory=list)


def _run_of(instance: dg.DagsterInstance, run_id: str | None, tag: str, value: str) -> Any:
    """The run named, or else the newest run tagged with the job's or deployment's id."""
    if run_id:
        return instance.get_run_record_by_id(run_id)
    records = instance.get_run_records(dg.RunsFilter(tags={tag: value}), limit=1)
    return records[0] if records else None


def _retry_of(instance: dg.DagsterInstance, run_id: str) -> str | None:
    records = instance.get_run_records(dg.RunsFilter(tags={TAG_PARENT: run_id}), limit=1)
    return records[0].dagster_run.run_id if records else None


def _ended_at(record: Any) -> float | None:
    return record.end_time


def _failure_verdict(instance: dg.DagsterInstance, record: Any, now: float) -> str | None:
    """For a failed run: ``wait`` (a retry may follow), ``retried:<run id>`` or ``failed``."""
    run = record.dagster_run
    will_retry = run.tags.get(TAG_WILL_RETRY)
    ended = _ended_at(record)
    if will_retry == "true":
        retry = _retry_of(instance, run.run_id)
        if retry:
            return f"retried:{retry}"
        return "wait" if ended is None or now - ended < RETRY_START_GRACE_S else "failed"
    if will_retry is None and ended is not None and now - ended < RETRY_DECISION_GRACE_S:
        return "wait"
    return "failed"


def _reconcile_job(
    instance: dg.DagsterInstance,
    lifecycle: FineTuningLifecycle,
    job: dict[str, Any],
    now: float,
    result: FineTuningReconciliation,
) -> None:
    job_id = job["id"]
    record = _run_of(instance, job["run_id"], L.TAG_FINE_TUNING_JOB, job_id)
    if record is None:
        if job["run_id"] is None and now - job["created_at"] >= NO_RUN_GRACE_S:
            result.versions.add(job["dataset_version"])
            result.run_requests.append(
                dg.RunRequest(
                    run_key=f"{job_id}:launch",
                    job_name=L.TRAINING_JOB,
                    partition_key=job["dataset_version"],
                    run_config=training_run_config(job_id),
                    tags={L.TAG_FINE_TUNING_JOB: job_id},
                )
            )
            result.actions.append(f"{job_id}: run requested")
        elif job["run_id"] is not None and now - job["created_at"] >= NO_RUN_GRACE_S:
            message = f"Dagster has no run {job['run_id']}"
            if lifecycle.fail(job_id, "run_failed", message, expect_run=job["run_id"]):
                result.actions.append(f"{job_id}: failed, {message}")
        return
    run = record.dagster_run
    expect = job["run_id"]
    if run.status in ACTIVE_RUN_STATUSES:
        return
    if run.status == dg.DagsterRunStatus.CANCELED:
        message = f"Dagster run {run.run_id} was terminated"
        if lifecycle.cancel(job_id, message, expect_run=expect):
            result.actions.append(f"{job_id}: cancelled, {message}")
        return
    if run.status == dg.DagsterRunStatus.FAILURE:
        verdict = _failure_verdict(instance, record, now)
        if verdict == "wait":
            return
        if verdict.startswith("retried:"):
            retry = verdict.removeprefix("retried:")
            why = f"Run {run.run_id} died; Dagster retries it as run {retry}"
            if lifecycle.adopt(job_id, retry, why):
                result.actions.append(f"{job_id}: followed its retry {retry}")
            return
        message = f"Dagster run {run.run_id} failed and will not be retried"
        if lifecycle.fail(job_id, "run_failed", message, expect_run=expect):
            result.actions.append(f"{job_id}: failed, {message}")
        return
    # SUCCESS without the job ended.
    fresh = lifecycle.catalog.fine_tuning.get(job_id)
    if fresh["status"] == "running" and is_trained(fresh):
        reason = f"run {run.run_id} trained the adapter without adapter_eval: materialize it"
        evaluation = {"passed": False, "skipped": reason, "examples": 0, "run_id": run.run_id}
        if lifecycle.succeed(job_id, evaluation, f"Not evaluated: {reason}."):
            result.actions.append(f"{job_id}: succeeded, not evaluated")
    elif fresh["status"] != "succeeded":
        message = f"Dagster run {run.run_id} ended without training the job"
        if lifecycle.fail(job_id, "run_failed", message, expect_run=expect):
            result.actions.append(f"{job_id}: failed, {message}")


def _reconcile_deployment(
    instance: dg.DagsterInstance,
    lifecycle: FineTuningLifecycle,
    deployment: dict[str, Any],
    now: float,
    result: FineTuningReconciliation,
) -> None:
    deployment_id = deployment["id"]
    record = _run_of(instance, deployment["run_id"], L.TAG_DEPLOYMENT, deployment_id)
    if record is None:
        if now - deployment["created_at"] < NO_RUN_GRACE_S:
            return
        job = lifecycle.catalog.fine_tuning.get(deployment["job_id"])
        result.versions.add(job["dataset_version"])
        result.run_requests.append(
            dg.RunRequest(
                run_key=f"{deployment_id}:launch",
                job_name=L.DEPLOY_JOB,
                partition_key=job["dataset_version"],
                run_config=deploy_run_config(job["id"], deployment_id, deployment["forced"]),
                tags={L.TAG_FINE_TUNING_JOB: job["id"], L.TAG_DEPLOYMENT: deployment_id},
            )
        )
        result.actions.append(f"{deployment_id}: run requested")
        return
    run = record.dagster_run
    if run.status in ACTIVE_RUN_STATUSES:
        return
    if run.status == dg.DagsterRunStatus.FAILURE:
        verdict = _failure_verdict(instance, record, now)
        if verdict == "wait":
            return
        if verdict.startswith("retried:"):
            lifecycle.deployment_launched(deployment_id, verdict.removeprefix("retried:"))
            return
    word = {dg.DagsterRunStatus.CANCELED: "was terminated", dg.DagsterRunStatus.SUCCESS: (
        "ended without deploying")}.get(run.status, "failed and will not be retried")  # fmt: skip
    message = f"Dagster run {run.run_id} {word}"
    if lifecycle.deployment_failed(deployment_id, "run_failed", message):
        result.actions.append(f"{deployment_id}: failed, {message}")


def reconcile_fine_tuning(
    instance: dg.DagsterInstance,
    catalog: Catalog,
    webhooks: Webhooks,
    now: float | None = None,
) -> FineTuningReconciliation:
    """One pass over fine-tuning jobs and deployments (the sensor's body, without its context)."""
    now = time.time() if now is None else now
    lifecycle = FineTuningLifecycle(catalog, webhooks, deliver_in_background=True)
    result = FineTuningReconciliation()
    for name in (L.TRAINING_JOB, L.DEPLOY_JOB, L.FINE_TUNING_JOB):
        result.actions += release_orphaned_runs(instance, job_name=name)
    for job in catalog.fine_tuning.unfinished():
        _reconcile_job(instance, lifecycle, job, now, result)
    for deployment in catalog.deployments.in_flight():
        _reconcile_deployment(instance, lifecycle, deployment, now, result)
    return result


@dg.sensor(
    name=L.FINE_TUNING_SENSOR,
    jobs=[training_job, deploy_job, fine_tuning_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Makes every unfinished fine-tuning job and deployment follow its Dagster run: "
    "launches those without one, follows Dagster's retries, ends those whose run ended.",
)
def fine_tuning_reconciler(
    context: dg.SensorEvaluationContext, catalog: Catalog, webhooks: Webhooks
) -> dg.SensorResult | dg.SkipReason:
    result = reconcile_fine_tuning(context.instance, catalog, webhooks)
    for action in result.actions:
        context.log.info(action)
    if not result.run_requests:
        return dg.SkipReason("; ".join(result.actions) or "every job follows its run")
    have = set(context.instance.get_dynamic_partitions(L.DATASET_VERSION_PARTITIONS))
    new = sorted(result.versions - have)
    return dg.SensorResult(
        run_requests=result.run_requests,
        dynamic_partitions_requests=[dataset_version_partitions.build_add_request(new)]
        if new
        else [],
    )
