"""The fine-tuning API's work: validate a job request, turn an uploaded training file into a
dataset version, record the job, and launch its Dagster run (``training_job``: train and
evaluate; ``deploy_job``: deploy). Every status change goes through the fine-tuning lifecycle;
reads only read (the ``fine_tuning_reconciler`` sensor keeps jobs in step with their runs).

Nothing is stored for a refused request: every field, the training file and the dataset
version are checked before the job is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

from vbs_api.errors import APIError
from vbs_api.launch import BatchLauncher, LaunchFailed, LaunchUnavailable
from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.curation.datasets import (
    UploadError,
    build_uploaded_dataset,
    failed_checks,
    write_dataset,
)
from vbs_resources.training import backend_class
from vbs_resources.training.jobs import (
    TERMINAL,
    JobError,
    check_backend,
    create_job,
    deploy_run_config,
    resolve_hyperparameters,
    training_run_config,
)
from vbs_resources.training.lifecycle import (
    FineTuningLifecycle,
    evaluation_refusal,
    remote_model,
)

log = logging.getLogger("vbs.api")
MAX_SUFFIX = 64
CREATE_FIELDS = {
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "metadata",
    "hyperparameters",
    "method",
    "integrations",
    "backend",
    "max_steps",
}
MAX_METADATA_KEYS, MAX_METADATA_VALUE = 16, 512


def _string(body: dict[str, Any], name: str, required: bool = False, limit: int = 256) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(400, f"Missing required parameter: '{name}'.", param=name)
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise APIError(400, f"{name} must be a string of 1 to {limit} characters.", param=name)
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(400, f"{name} must be an integer from {low} to {high}.", param=name)
    return value


def _metadata(body: dict[str, Any]) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string keys of 64 characters, string values of 512."""
    metadata = body.get("metadata")
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_KEYS:
        raise APIError(
            400,
            f"metadata must be an object of at most {MAX_METADATA_KEYS} keys.",
            param="metadata",
        )
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > MAX_METADATA_VALUE:
            raise APIError(
                400,
                f"metadata values must be strings of at most {MAX_METADATA_VALUE} characters, "
                "under keys of at most 64.",
                param=f"metadata.{key[:64]}",
            )
    return metadata


def _raw_hyperparameters(body: dict[str, Any]) -> dict[str, Any] | None:
    raw = body.get("hyperparameters")
    method = body.get("method")
    if method is None:
        return raw
    if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
        raise APIError(400, "Only the supervised method is supported.", param="method.type")
    supervised = method.get("supervised")
    if supervised is None:
        return raw
    if not isinstance(supervised, dict):
        raise APIError(400, "method.supervised must be an object.", param="method.supervised")
    nested = supervised.get("hyperparameters") or {}
    if not isinstance(nested, dict):
        raise APIError(
            400,
            "method.supervised.hyperparameters must be an object.",
            param="method.supervised.hyperparameters",
        )
    if raw is not None and not isinstance(raw, dict):
        raise APIError(400, "hyperparameters must be an object.", param="hyperparameters")
    return {**nested, **(raw or {})}


class FineTuningService:
    def __init__(
        self,
        bucket: Bucket,
        catalog: Catalog,
        launcher: BatchLauncher | None,
        lifecycle: FineTuningLifecycle,
        default_backend: str,
        eval_fraction: float,
        max_lora_rank: int,
    ) -> None:
        self.bucket, self.catalog, self.launcher = bucket, catalog, launcher
        self.lifecycle = lifecycle
        self.default_backend, self.eval_fraction = default_backend, eval_fraction
        self.max_lora_rank = max_lora_rank

    # ---- creating ----------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - CREATE_FIELDS)
        if unknown:
            raise APIError(400, f"Unknown parameter: '{unknown[0][:64]}'.", param=unknown[0][:64])
        model = _string(body, "model", required=True)
        training_file = _string(body, "training_file", required=True)
        validation_file = _string(body, "validation_file")
        suffix = _string(body, "suffix", limit=MAX_SUFFIX)
        backend = _string(body, "backend", limit=32) or self.default_backend
        seed = _integer(body, "seed", 0, 2**32 - 1)
        max_steps = _integer(body, "max_steps", 1, 1_000_000)
        metadata = _metadata(body)
        if body.get("integrations"):
            raise APIError(400, "Integrations are not supported.", param="integrations")
        try:
            check_backend(backend)
            hyperparameters = resolve_hyperparameters(
                _raw_hyperparameters(body),
                seed=seed,
                max_steps=max_steps,
                max_lora_rank=self.max_lora_rank,
            )
        except JobError as exc:
            raise APIError(400, exc.message, param=exc.param) from None
        base = self.catalog.models.get(model)
        remote = backend_class(backend).remote  # the remote service's model: it checks it
        if not remote and (base is None or base["kind"] != "base" or base["status"] != "available"):
            raise APIError(
                400,
                f"The model {model[:100]!r} is not an available base model to fine-tune.",
                param="model",
                code="model_not_available",
            )
        version = self._dataset_version(training_file, validation_file)
        dataset = self.catalog.datasets.get(version)
        job = create_job(
            self.lifecycle,
            model=model,
            dataset_version=version,
            training_file=training_file,
            validation_file=validation_file,
            backend=backend,
            hyperparameters=hyperparameters,
            suffix=suffix or (dataset or {}).get("type"),
            metadata=metadata,
        )
        return self._launch(job)

    def _dataset_version(self, training_file: str, validation_file: str | None) -> str:
        """A dataset version as given (one that passed its blocking checks), or the version an
        uploaded file becomes."""
        if L.is_dataset_version(training_file):
            if validation_file:
                raise APIError(
                    400,
                    "A dataset version holds its own eval split: leave validation_file out.",
                    param="validation_file",
                )
            row = self.catalog.datasets.get(training_file)
            if row is None:
                raise APIError(400, f"No dataset version {training_file}.", param="training_file")
            failed = failed_checks(row)
            if failed:
                raise APIError(
                    400,
                    f"{training_file} failed its blocking checks, so it is not trained on: "
                    + "; ".join(failed)[:1000],
                    param="training_file",
                    code="dataset_failed_checks",
                )
            return training_file
        training = (training_file, self._fine_tune_lines(training_file, "training_file"))
        validation = (
            (validation_file, self._fine_tune_lines(validation_file, "validation_file"))
            if validation_file
            else None
        )
        sides = self.catalog.datasets.sides(L.UPLOADED_DATASET_TYPE)
        try:
            build = build_uploaded_dataset(training, validation, self.eval_fraction, sides)
        except UploadError as exc:
            raise APIError(400, f"Invalid training data: {exc}", param="training_file") from None
        if not build.eval or not build.train:
            raise APIError(
                400,
                "The training data needs two distinct prompts or more (one held out for "
                "evaluation), or a validation_file.",
                param="training_file",
            )
        version = build.version
        write_dataset(self.bucket, build, {"source": "upload", "eval_fraction": self.eval_fraction})
        options = {"training_file": training_file, "validation_file": validation_file}
        self.catalog.datasets.record(build.catalog_row(options, run_id=None), splits=build.sides)
        return version

    def _fine_tune_lines(self, file_id: str, param: str) -> list[bytes]:
        row = self.catalog.files.get(file_id) if L.is_file_id(file_id) else None
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
            return job  # the fine-tuning reconciler launches it
        try:
            run_id = self.launcher.launch(
                job["dataset_version"],
                training_run_config(job_id),
                {L.TAG_FINE_TUNING_JOB: job_id},
                job=L.TRAINING_JOB,
                partitions=L.DATASET_VERSION_PARTITIONS,
            )
        except LaunchUnavailable as exc:
            log.warning(f"{job_id}: {exc}; the fine-tuning reconciler launches it")
            return self.get(job_id)
        except LaunchFailed as exc:
            self.lifecycle.fail(job_id, "launch_failed", str(exc))
            return self.get(job_id)
        self.lifecycle.queued(job_id, run_id)
        return self.get(job_id)

    # ---- reading -----------------------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.catalog.fine_tuning.get(job_id) if L.is_job_id(job_id) else None
        if job is None:
            raise APIError(404, f"No such fine-tuning job: {job_id[:100]}", param="id")
        return job

    # ---- acting ------------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] in TERMINAL:
            raise APIError(
                400, f"Job {job_id} is {job['status']} and cannot be cancelled.", param="id"
            )
        after = self.lifecycle.request_cancel(job_id)
        if after["status"] == "cancelled" and after["run_id"] and self.launcher is not None:
            # Not training yet: its run is stopped before it starts.
            try:
                self.launcher.terminate(after["run_id"])
            except (LaunchFailed, LaunchUnavailable):
                log.warning("could not terminate run %s of %s", after["run_id"], job_id)
        elif after["status"] in TERMINAL and after["status"] != "cancelled":
            raise APIError(
                400, f"Job {job_id} is {after['status']} and cannot be cancelled.", param="id"
            )
        return after

    def deploy(self, job_id: str, force: bool) -> dict[str, Any]:
        """A deployment of the job, launched; the one in flight when there is one already."""
        job = self.get(job_id)
        if job["status"] != "succeeded":
            raise APIError(
                400,
                f"Job {job_id} is {job['status']}: only a succeeded job (trained and evaluated) "
                "deploys.",
                param="id",
            )
        remote = remote_model(job)
        if remote:
            raise APIError(
                400,
                f"{remote} is a remote model, served by {job['result'].get('remote_url')}: "
                "this engine cannot deploy it. Use it there.",
                param="id",
                code="remote_model",
            )
        if not force and not (job["evaluation"] or {}).get("passed"):
            raise APIError(
                400,
                f"The adapter of {job_id} is not deployed: {evaluation_refusal(job['evaluation'])}"
                "; deploy with force to override.",
                param="force",
                code="evaluation_failed",
            )
        rank = (job["hyperparameters"] or {}).get("lora_r", 0)
        if rank > self.max_lora_rank:
            raise APIError(
                400,
                f"The adapter's rank {rank} is above the engine's limit {self.max_lora_rank} "
                "(VBS_MAX_LORA_RANK).",
                param="id",
            )
        if self.launcher is None:
            raise APIError(503, "No Dagster webserver is configured.")
        deployment, created = self.lifecycle.create_deployment(job, force)
        if not created:
            return deployment
        try:
            run_id = self.launcher.launch(
                job["dataset_version"],
                deploy_run_config(job_id, deployment["id"], force),
                {L.TAG_FINE_TUNING_JOB: job_id, L.TAG_DEPLOYMENT: deployment["id"]},
                job=L.DEPLOY_JOB,
                partitions=L.DATASET_VERSION_PARTITIONS,
            )
        except LaunchUnavailable as exc:
            log.warning(f"{deployment['id']}: {exc}; the fine-tuning reconciler launches it")
        except LaunchFailed as exc:
            self.lifecycle.deployment_failed(deployment["id"], "launch_failed", str(exc))
        else:
            self.lifecycle.deployment_launched(deployment["id"], run_id)
        return self.catalog.deployments.get(deployment["id"])
