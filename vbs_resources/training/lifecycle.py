"""The fine-tuning lifecycle: the one place where a fine-tuning job's or a deployment's status
changes.

As for batches (``vbs_resources.lifecycle``), every change is one conditional update
(``FineTuningStore.transition``, ``DeploymentStore.transition``) that refuses to leave an
ending status and writes the job's event in the same transaction; an ending also writes its
webhook event (``fine_tuning.job.succeeded``, ``.failed``, ``.cancelled``) into the outbox there,
so it exists exactly once and is delivered as batch events are. The API, the assets and the
``fine_tuning_reconciler`` sensor all go through ``FineTuningLifecycle``; nothing else writes a
job's or a deployment's ``status``.

```
validating_files -> queued -> running -> succeeded      (trained *and* evaluated)
        |              |         |
        +--------------+---------+--> failed | cancelled
```
``running -> running`` is the retry of a run that died taking its job over. A deployment goes
``queued -> running -> succeeded | failed``; a job has at most one in flight.
"""

from __future__ import annotations

import time
from typing import Any

from vbs_resources import layout as L
from vbs_resources.catalog import Catalog
from vbs_resources.lifecycle import EventSender
from vbs_resources.webhooks import Webhooks

UNFINISHED = ("validating_files", "queued", "running")
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "queued": ("validating_files",),
    "running": UNFINISHED,
    "succeeded": ("running",),
    "failed": UNFINISHED,
    "cancelled": UNFINISHED,
}
EVENTS = {
    "succeeded": "fine_tuning.job.succeeded",
    "failed": "fine_tuning.job.failed",
    "cancelled": "fine_tuning.job.cancelled",
}
DEPLOYMENT_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "running": ("queued",),
    "succeeded": ("running",),
    "failed": ("queued", "running"),
}


def job_error(code: str, message: str) -> dict[str, Any]:
    """A job's ``error`` in OpenAI's shape."""
    return {"code": code, "message": message[:2000], "param": None}


def evaluation_refusal(evaluation: dict[str, Any] | None) -> str:
    """Why a job's adapter may not deploy without force, from its evaluation."""
    if not evaluation:
        return "it was not evaluated"
    if evaluation.get("skipped"):
        return f"it was not evaluated: {evaluation['skipped']}"
    metric = evaluation.get("metric")
    return (
        f"it did not beat its base ({metric}: adapter "
        f"{(evaluation.get('adapter') or {}).get(metric)} against base "
        f"{(evaluation.get('base') or {}).get(metric)})"
    )


def remote_model(job: dict[str, Any]) -> str | None:
    """The model a remote service trained for ``job`` (the ``openai`` backend), if any."""
    return (job.get("result") or {}).get("remote_model")


def is_trained(job: dict[str, Any]) -> bool:
    """Whether the job's training is done: its adapter saved, or its remote model made."""
    return bool(job.get("adapter_path") or remote_model(job))


class FineTuningLifecycle:
    """Status changes of fine-tuning jobs and their deployments, with their events."""

    def __init__(
        self,
        catalog: Catalog,
        webhooks: Webhooks | None = None,
        deliver_in_background: bool = False,
    ) -> None:
        self.catalog = catalog
        self.sender = EventSender(catalog, webhooks, deliver_in_background)

    # ---- jobs --------------------------------------------------------------------------------

    def create(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a new job in ``validating_files`` (its run is launched next)."""
        row = {**row, "status": "validating_files", "created_at": int(time.time())}
        return self.catalog.fine_tuning.insert(row, f"Created fine-tuning job {row['id']}")

    def queued(self, job_id: str, run_id: str) -> bool:
        """``validating_files -> queued``: its run was launched."""
        return self._move(job_id, "queued", f"Job queued as Dagster run {run_id}", run_id=run_id)

    def start(self, job_id: str, run_id: str, what: str) -> bool:
        """The run ``run_id`` trains the job now: from ``validating_files`` or ``queued``, or from
        ``running`` when another run held it (Dagster's retry of a run that died takes it over).
        False when the job ended (a cancel won the race)."""
        job = self.catalog.fine_tuning.get(job_id)
        if job is None or job["status"] not in UNFINISHED:
            return False
        if job["cancel_requested"]:
            self.cancel(job_id, "Cancelled before training started")
            return False
        message = what
        # Work a backend left outside the run (a remote job) is followed again, not redone.
        remote = (job["result"] or {}).get("remote")
        if job["status"] == "running" and job["run_id"] != run_id:
            again = (
                f"follows the remote job {remote.get('remote_job_id')} again"
                if remote
                else "trains again from the start"
            )
            message = f"Run {job['run_id']} died; run {run_id} {again}. {what}"
        return self._move(
            job_id,
            "running",
            message,
            expect={"run_id": job["run_id"]} if job["run_id"] else None,
            run_id=run_id,
            started_at=int(time.time()),
            adapter_path=None,
            fine_tuned_model=None,
            result={"remote": remote} if remote else None,
            evaluation=None,
        )

    def remember_remote(self, job_id: str, run_id: str, state: dict[str, Any]) -> bool:
        """Where the job's remote work is (the remote job's id and service), kept with the job
        while the run ``run_id`` holds it, for a retry of a run that dies."""
        return self.catalog.fine_tuning.update_unfinished(
            job_id, expect={"run_id": run_id, "status": "running"}, result={"remote": state}
        )

    def trained(
        self,
        job_id: str,
        run_id: str,
        adapter_path: str | None,
        model: str,
        result: dict[str, Any],
    ) -> bool:
        """The adapter is trained (the job stays ``running`` until it is evaluated). False when the
        job was cancelled or taken by another run meanwhile."""
        done = self.catalog.fine_tuning.update_unfinished(
            job_id,
            expect={"run_id": run_id, "status": "running"},
            adapter_path=adapter_path,
            fine_tuned_model=model,
            result=result,
        )
        if done:
            self.catalog.fine_tuning.add_event(
                job_id, f"Trained {model}; evaluating it against its base"
            )
        return done

    def adopt(self, job_id: str, run_id: str, why: str) -> bool:
        """The run ``run_id`` holds the unfinished job now (Dagster's retry of a run that died,
        taking it over); ``why`` goes to the job's events. False when the job has ended."""
        job = self.catalog.fine_tuning.get(job_id)
        if job is None or job["status"] not in UNFINISHED:
            return False
        if job["run_id"] == run_id:
            return True
        expect = {"run_id": job["run_id"]} if job["run_id"] else {"status": job["status"]}
        done = self.catalog.fine_tuning.update_unfinished(job_id, expect=expect, run_id=run_id)
        if done:
            self.catalog.fine_tuning.add_event(job_id, why)
        return done

    def succeed(self, job_id: str, evaluation: dict[str, Any], verdict: str) -> bool:
        """``running -> succeeded`` once the trained adapter has its evaluation (or the reason it
        has none). A job that already succeeded gets this evaluation in place of its old one (its
        adapter evaluated again)."""
        job = self.catalog.fine_tuning.get(job_id)
        if job is None:
            return False
        if job["status"] == "succeeded":
            return self.catalog.fine_tuning.record_evaluation(job_id, evaluation, verdict)
        if job["status"] != "running" or not is_trained(job):
            return False
        message = f"The job has successfully completed: {job['fine_tuned_model']}. {verdict}"
        return self._move(
            job_id,
            "succeeded",
            message,
            data=evaluation,
            expect={"fine_tuned_model": job["fine_tuned_model"]},
            evaluation=evaluation,
            finished_at=int(time.time()),
        )

    def fail(self, job_id: str, code: str, message: str, expect_run: str | None = None) -> bool:
        """``* -> failed`` with ``error`` {code, message}; with ``expect_run``, only while that
        run still holds the job."""
        return self._move(
            job_id,
            "failed",
            message,
            level="error",
            expect={"run_id": expect_run} if expect_run else None,
            error=job_error(code, message),
            finished_at=int(time.time()),
        )

    def cancel(
        self,
        job_id: str,
        message: str,
        expect_run: str | None = None,
        before_training: bool = False,
    ) -> bool:
        """``* -> cancelled``; with ``before_training`` only while the job is not running yet
        (a run that has just started it stops at its next step instead)."""
        return self._move(
            job_id,
            "cancelled",
            message,
            level="warn",
            allowed=("validating_files", "queued") if before_training else None,
            expect={"run_id": expect_run} if expect_run else None,
            finished_at=int(time.time()),
        )

    def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        """Ask a job to stop. One not training yet ends ``cancelled`` now (the caller terminates
        its run); one training stops after its current step. Returns the job afterwards."""
        if self.catalog.fine_tuning.update_unfinished(job_id, cancel_requested=True):
            job = self.catalog.fine_tuning.get(job_id)
            if job["status"] == "running" or not self.cancel(
                job_id, "Cancelled before training started", before_training=True
            ):
                # Training (or it started just now): it stops after its current step.
                self.catalog.fine_tuning.add_event(job_id, "Cancellation requested", "warn")
        return self.catalog.fine_tuning.get(job_id)

    def progress(self, job_id: str, message: str, data: dict[str, Any] | None = None) -> None:
        """A step's metrics, as one of the job's events."""
        self.catalog.fine_tuning.add_event(job_id, message, kind="metrics", data=data)

    def note(self, job_id: str, message: str) -> None:
        """A message for the job's events (a remote service's, copied), changing nothing."""
        self.catalog.fine_tuning.add_event(job_id, message[:2000])

    def _move(
        self,
        job_id: str,
        to: str,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
        expect: dict[str, Any] | None = None,
        allowed: tuple[str, ...] | None = None,
        **fields: Any,
    ) -> bool:
        webhook = (L.new_event_id(), EVENTS[to]) if to in EVENTS else None
        if allowed is not None and not set(allowed) <= set(ALLOWED_FROM[to]):
            raise ValueError(f"{allowed} is not within the transition table's {to}")
        changed = self.catalog.fine_tuning.transition(
            job_id,
            to,
            allowed or ALLOWED_FROM[to],
            message=message,
            level=level,
            data=data,
            webhook=webhook,
            expect=expect,
            **fields,
        )
        if changed and webhook is not None:
            self.sender.send(webhook[0])
        return changed

    # ---- deployments -------------------------------------------------------------------------

    def create_deployment(self, job: dict[str, Any], forced: bool) -> tuple[dict[str, Any], bool]:
        """A deployment of ``job`` in ``queued``; the one already in flight (and False) when
        there is one."""
        row = {
            "id": L.new_deployment_id(),
            "job_id": job["id"],
            "model": job["fine_tuned_model"],
            "status": "queued",
            "forced": forced,
            "created_at": int(time.time()),
        }
        word = " (forced past its evaluation)" if forced else ""
        return self.catalog.deployments.insert(
            row, f"Deployment {row['id']} of {job['fine_tuned_model']} requested{word}"
        )

    def deployment_launched(self, deployment_id: str, run_id: str) -> bool:
        return self.catalog.deployments.update_in_flight(deployment_id, run_id=run_id)

    def deployment_started(self, deployment_id: str, run_id: str) -> bool:
        return self.catalog.deployments.transition(
            deployment_id,
            "running",
            DEPLOYMENT_ALLOWED_FROM["running"],
            message=f"Deployment {deployment_id} running in Dagster run {run_id}",
            run_id=run_id,
            started_at=int(time.time()),
        )

    def deployment_succeeded(self, deployment_id: str, model: str, retired: list[str]) -> bool:
        also = f"; retired {', '.join(retired)}" if retired else ""
        return self.catalog.deployments.transition(
            deployment_id,
            "succeeded",
            DEPLOYMENT_ALLOWED_FROM["succeeded"],
            message=f"Deployed as {model}{also}",
            retired=retired,
            finished_at=int(time.time()),
        )

    def deployment_failed(self, deployment_id: str, code: str, message: str) -> bool:
        return self.catalog.deployments.transition(
            deployment_id,
            "failed",
            DEPLOYMENT_ALLOWED_FROM["failed"],
            message=f"Deployment {deployment_id} failed: {message}",
            level="error",
            error=job_error(code, message),
            finished_at=int(time.time()),
        )
