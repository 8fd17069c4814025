"""The fine-tuning API's work: validate a job request, turn an uploaded training file into a
dataset version, record the job, and launch its Dagster run (``training_job``: train and
evaluate; ``deploy_job``: deploy). Each job's status follows its run: the assets write it, and a
read of a job still in flight asks Dagster whether its run died without saying so.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vbs_api.errors import APIError
from vbs_api.launch import BatchLauncher, LaunchFailed, LaunchUnavailable, RunState
from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.curation.datasets import UploadError, build_uploaded_dataset, write_dataset
from vbs_resources.training.jobs import (
    TERMINAL,
    JobError,
    check_backend,
    create_job,
    resolve_hyperparameters,
)

log = logging.getLogger("vbs.api")
MAX_SUFFIX = 64
# Dagster's run statuses that end a run which did not finish its job.
RUN_ENDED = {"FAILURE": "failed", "CANCELED": "cancelled"}
# Dagster marks a run failed, then tags whether the daemon will retry it: a failure this recent
# and still untagged is not read as the job's end yet.
RETRY_DECISION_GRACE_S = 60


def _retry_may_follow(state: RunState) -> bool:
    """Whether the daemon's retry may still take over a failed run's job: Dagster tagged the run
    ``dagster/will_retry=true``, or has not tagged it yet (it writes FAILURE first) and the run
    ended moments ago. A failed run with no end time is not one Dagster has just ended."""
    will_retry = state.tags.get("dagster/will_retry")
    if will_retry is not None:
        return will_retry == "true"
    return state.end_time is not None and time.time() - state.end_time < RETRY_DECISION_GRACE_S


def _string(body: dict[str, Any], name: str, required: bool = False, limit: int = 256) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"Missing required parameter: '{name}'.", param=name)
        return None
    if not isinstance(value, str) or not value or len(value) > limit:
        raise APIError(400, f"{name} must be a string of 1 to {limit} characters.", param=name)
    return value


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer.", param=name)
    return value


class FineTuningService:
    def __init__(
        self,
        bucket: Bucket,
        catalog: Catalog,
        launcher: BatchLauncher | None,
        default_backend: str,
        eval_fraction: float,
    ) -> None:
        self.bucket, self.catalog, self.launcher = bucket, catalog, launcher
        self.default_backend, self.eval_fraction = default_backend, eval_fraction

    # ---- creating ----------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        model = _string(body, "model", required=True)
        training_file = _string(body, "training_file", required=True)
        validation_file = _string(body, "validation_file")
        suffix = _string(body, "suffix", limit=MAX_SUFFIX)
        backend = _string(body, "backend", limit=32) or self.default_backend
        seed = _integer(body, "seed")
        max_steps = _integer(body, "max_steps")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise APIError(400, "metadata must be an object.", param="metadata")
        raw = body.get("hyperparameters")
        method = body.get("method")
        if isinstance(method, dict) and isinstance(method.get("supervised"), dict):
            raw = {**(method["supervised"].get("hyperparameters") or {}), **(raw or {})}
        elif method is not None and (
            not isinstance(method, dict) or method.get("type") != "supervised"
        ):
            raise APIError(400, "Only the supervised method is supported.", param="method")
        try:
            check_backend(backend)
            hyperparameters = resolve_hyperparameters(raw, seed=seed, max_steps=max_steps)
        except JobError as exc:
            raise APIError(400, exc.message, param=exc.param) from None
        base = self.catalog.models.get(model)
        if base is None or base["kind"] != "base" or base["status"] != "available":
            raise APIError(
                400,
                f"The model {model[:100]!r} is not an available base model to fine-tune.",
                param="model",
                code="model_not_available",
            )
        version = self._dataset_version(training_file, validation_file)
        dataset = self.catalog.datasets.get(version)
        job = create_job(
            self.catalog,
            model=model,
            dataset_version=version,
            training_file=training_file,
            validation_file=validation_file,
            backend=backend,
            hyperparameters=hyperparameters,
            suffix=suffix or (dataset or {}).get("type"),
            metadata=metadata,
            status="validating_files",
        )
        return self._launch(job)

    def _dataset_version(self, training_file: str, validation_file: str | None) -> str:
        """A dataset version as given, or the version an uploaded file becomes."""
        if L.is_dataset_version(training_file):
            if validation_file:
                raise APIError(
                    400,
                    "A dataset version holds its own eval split: leave validation_file out.",
                    param="validation_file",
                )
            if self.catalog.datasets.get(training_file) is None:
                raise APIError(400, f"No dataset version {training_file}.", param="training_file")
            return training_file
        training = (training_file, self._fine_tune_lines(training_file, "training_file"))
        validation = (
            (validation_file, self._fine_tune_lines(validation_file, "validation_file"))
            if validation_file
            else None
        )
        try:
            build = build_uploaded_dataset(training, validation, self.eval_fraction)
        except UploadError as exc:
            raise APIError(400, f"Invalid training data: {exc}", param="training_file") from None
        if not build.eval:
            raise APIError(
                400,
                "The training file is too small to hold any prompt out for evaluation: send a "
                "validation_file.",
                param="validation_file",
            )
        version = build.version
        write_dataset(self.bucket, build, {"source": "upload", "eval_fraction": self.eval_fraction})
        options = {"training_file": training_file, "validation_file": validation_file}
        self.catalog.datasets.record(build.catalog_row(options, run_id=None))
        return version

    def _fine_tune_lines(self, file_id: str, param: str) -> list[bytes]:
        row = self.catalog.files.get(file_id) if file_id.startswith("file-") else None
        if row is None:
            raise APIError(
                400,
                f"{param} is neither a dataset version nor an uploaded file: {file_id[:100]}",
                param=param,
            )
        if row["purpose"] != "fine-tune":
            raise APIError(
                400,
                f"File {file_id} has purpose '{row['purpose']}'; training data must be a file "
                "uploaded with purpose 'fine-tune'.",
                param=param,
            )
        with self.bucket.open(row["path"], "rb") as fh:
            return fh.read().splitlines()

    def _launch(self, job: dict[str, Any]) -> dict[str, Any]:
        job_id = job["id"]
        if self.launcher is None:
            return self._fail(job_id, "launch_failed", "No Dagster webserver is configured.")
        config = {"job_id": job_id}
        run_config = {
            "ops": {L.FINE_TUNED_ADAPTER: {"config": config}, L.ADAPTER_EVAL: {"config": config}}
        }
        try:
            run_id = self.launcher.launch(
                job["dataset_version"],
                run_config,
                {L.TAG_FINE_TUNING_JOB: job_id},
                job=L.TRAINING_JOB,
                partitions=L.DATASET_VERSION_PARTITIONS,
            )
        except (LaunchFailed, LaunchUnavailable) as exc:
            return self._fail(job_id, "launch_failed", str(exc))
        self.catalog.fine_tuning.update(job_id, status="queued", run_id=run_id)
        self.catalog.fine_tuning.add_event(job_id, f"Job queued as Dagster run {run_id}")
        return self.get(job_id)

    def _fail(self, job_id: str, code: str, message: str) -> dict[str, Any]:
        self.catalog.fine_tuning.update(
            job_id,
            status="failed",
            finished_at=int(time.time()),
            error={"code": code, "message": message, "param": None},
        )
        self.catalog.fine_tuning.add_event(job_id, message, level="error")
        return self.get(job_id)

    # ---- reading -----------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.catalog.fine_tuning.get(job_id) if L.is_job_id(job_id) else None
        if job is None:
            raise APIError(404, f"No such fine-tuning job: {job_id[:100]}", param="id")
        if job["status"] not in TERMINAL and job["run_id"] and self.launcher is not None:
            job = self._follow_run(job)
        return job

    def _follow_run(self, job: dict[str, Any]) -> dict[str, Any]:
        """A job whose run ended without ending it (killed and not retried, terminated in the
        Dagster UI) ends as its run did."""
        try:
            state = self.launcher.run_state(job["run_id"])
        except (LaunchFailed, LaunchUnavailable):
            return job
        ended = RUN_ENDED.get(state.status)
        if ended is None or (state.status == "FAILURE" and _retry_may_follow(state)):
            return job
        # The retry of a killed run takes the job over (a new run id) before this run's
        # failure is read; only the job's own run ends it.
        fresh = self.catalog.fine_tuning.get(job["id"])
        if fresh["run_id"] != job["run_id"] or fresh["status"] in TERMINAL:
            return fresh
        message = f"Dagster run {job['run_id']} ended {state.status.lower()}"
        self.catalog.fine_tuning.update(
            job["id"],
            status=ended,
            finished_at=int(time.time()),
            error=None
            if ended == "cancelled"
            else {"code": "run_failed", "message": message, "param": None},
        )
        return self.catalog.fine_tuning.get(job["id"])

    # ---- acting ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise APIError(
                400, f"Job {job_id} is {job['status']} and cannot be cancelled.", param="id"
            )
        self.catalog.fine_tuning.update(job_id, cancel_requested=True)
        if job["status"] in ("validating_files", "queued"):
            # Not training yet: the run is stopped before it starts, and the job ends now.
            if job["run_id"] and self.launcher is not None:
                try:
                    self.launcher.terminate(job["run_id"])
                except (LaunchFailed, LaunchUnavailable):
                    log.warning("could not terminate run %s of %s", job["run_id"], job_id)
            self.catalog.fine_tuning.update(
                job_id, status="cancelled", finished_at=int(time.time())
            )
        # A job that is training stops after its current step (the asset asks between steps).
        self.catalog.fine_tuning.add_event(job_id, "Cancellation requested", level="warn")
        return self.catalog.fine_tuning.get(job_id)

    def deploy(self, job_id: str, force: bool) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] != "succeeded":
            raise APIError(
                400, f"Job {job_id} is {job['status']}: only a succeeded job deploys.", param="id"
            )
        if not force and not (job["evaluation"] or {}).get("passed"):
            reason = "was not evaluated" if not job["evaluation"] else "did not beat its base"
            raise APIError(
                400,
                f"The adapter of {job_id} {reason}; deploy with force to override.",
                param="force",
                code="evaluation_failed",
            )
        if self.launcher is None:
            raise APIError(503, "No Dagster webserver is configured.")
        config = {"job_id": job_id, "force": force}
        try:
            run_id = self.launcher.launch(
                job["dataset_version"],
                {"ops": {L.DEPLOYED_MODEL: {"config": config}}},
                {L.TAG_FINE_TUNING_JOB: job_id},
                job=L.DEPLOY_JOB,
                partitions=L.DATASET_VERSION_PARTITIONS,
            )
        except (LaunchFailed, LaunchUnavailable) as exc:
            raise APIError(503, f"The deployment was not launched: {exc}") from None
        self.catalog.fine_tuning.add_event(job_id, f"Deployment queued as Dagster run {run_id}")
        return {"job": job, "run_id": run_id, "model": job["fine_tuned_model"], "force": force}
