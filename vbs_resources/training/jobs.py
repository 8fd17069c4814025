"""Fine-tuning jobs: OpenAI's job shape over the catalog's ``fine_tuning_jobs`` rows.

Every training is a job, whoever starts it: ``POST /v1/fine_tuning/jobs``, ``vbs finetune``, a
materialization in the Dagster UI, or the retraining schedule. Hyperparameters arrive in
OpenAI's form (``n_epochs``, ``batch_size``, ``learning_rate_multiplier``, each a number or
``"auto"``) or with the seed's names (``lora_r``, ``lora_alpha``, ``learning_rate``,
``num_train_epochs``, ...); ``learning_rate_multiplier`` scales the backend's default rate.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from vbs_resources import layout as L
from vbs_resources.training import (
    DEFAULT_LEARNING_RATE,
    Hyperparameters,
    TrainingError,
    backend_class,
    backend_names,
)
from vbs_resources.training.lifecycle import FineTuningLifecycle

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
OPENAI_NAMES = {"n_epochs": "num_train_epochs", "batch_size": "batch_size"}


class JobError(ValueError):
    """A job request refused; ``param`` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def resolve_hyperparameters(
    raw: dict[str, Any] | None,
    seed: int | None = None,
    max_steps: int | None = None,
    max_lora_rank: int | None = None,
) -> Hyperparameters:
    """OpenAI's or the seed's hyperparameters as the trainer's; an unknown name or a value out
    of range is a ``JobError`` naming ``hyperparameters.<name>``. With ``max_lora_rank`` (the
    engine's ``VBS_MAX_LORA_RANK``) a rank the engine could never serve is refused too."""
    if raw is not None and not isinstance(raw, dict):
        raise JobError("hyperparameters must be an object.", "hyperparameters")
    values: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if value == "auto":
            continue
        if key == "learning_rate_multiplier":
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise JobError(
                    "learning_rate_multiplier must be a positive number or 'auto'.",
                    "hyperparameters.learning_rate_multiplier",
                )
            values["learning_rate"] = DEFAULT_LEARNING_RATE * value
            continue
        values[OPENAI_NAMES.get(key, key)] = value
    if seed is not None:
        values["seed"] = seed
    if max_steps is not None:
        values["max_steps"] = max_steps
    try:
        resolved = Hyperparameters(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(p) for p in first["loc"]) or "hyperparameters"
        shown = {v: k for k, v in OPENAI_NAMES.items()}.get(name, name)
        message = "is not a hyperparameter" if first["type"] == "extra_forbidden" else first["msg"]
        raise JobError(f"hyperparameters.{shown}: {message}.", f"hyperparameters.{shown}") from None
    if max_lora_rank is not None and resolved.lora_r > max_lora_rank:
        raise JobError(
            f"hyperparameters.lora_r: {resolved.lora_r} is above the engine's LoRA rank limit "
            f"{max_lora_rank} (VBS_MAX_LORA_RANK): the adapter could never be served.",
            "hyperparameters.lora_r",
        )
    return resolved


def check_backend(backend: str) -> str:
    """``backend`` when it is registered and can train here; a job it could never train is
    refused rather than recorded."""
    if backend not in backend_names():
        raise JobError(
            f"No training backend named {backend[:40]!r}; known: {', '.join(backend_names())}.",
            "backend",
        )
    try:
        missing = backend_class(backend).missing()
    except TrainingError as exc:  # one of its options is set wrong
        missing = [str(exc)]
    if missing:
        raise JobError(
            f"The {backend} training backend cannot train here: it lacks {'; '.join(missing)}.",
            "backend",
        )
    return backend


def create_job(
    lifecycle: FineTuningLifecycle,
    *,
    model: str,
    dataset_version: str,
    training_file: str,
    backend: str,
    hyperparameters: Hyperparameters,
    suffix: str | None = None,
    validation_file: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A new job in ``validating_files``, through the lifecycle."""
    check_backend(backend)
    return lifecycle.create(
        {
            "id": L.new_job_id(),
            "model": model,
            "training_file": training_file,
            "validation_file": validation_file,
            "dataset_version": dataset_version,
            "backend": backend,
            "hyperparameters": hyperparameters.model_dump(),
            "suffix": suffix,
            "seed": hyperparameters.seed,
            "job_metadata": metadata,
        }
    )


def training_run_config(job_id: str) -> dict[str, Any]:
    """``training_job``'s run config for a job."""
    config = {"job_id": job_id}
    return {"ops": {L.FINE_TUNED_ADAPTER: {"config": config}, L.ADAPTER_EVAL: {"config": config}}}


def deploy_run_config(job_id: str, deployment_id: str, force: bool) -> dict[str, Any]:
    """``deploy_job``'s run config for a deployment."""
    config = {"job_id": job_id, "deployment_id": deployment_id, "force": force}
    return {"ops": {L.DEPLOYED_MODEL: {"config": config}}}


def deployment_object(row: dict[str, Any], job: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deployment as the API answers it (with its job when given)."""
    found = {
        "id": row["id"],
        "object": "fine_tuning.job.deployment",
        "job_id": row["job_id"],
        "model": row["model"],
        "status": row["status"],
        "force": row["forced"],
        "run_id": row["run_id"],
        "retired": row["retired"] or [],
        "error": row["error"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
    }
    if job is not None:
        found["job"] = job_object(job)
    return found


def job_object(row: dict[str, Any], deployment: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job row as OpenAI's ``fine_tuning.job`` object, with vbs's fields beside it (its
    latest deployment among them, when given)."""
    hp = row["hyperparameters"] or {}
    result = row["result"] or {}
    return {
        "id": row["id"],
        "object": "fine_tuning.job",
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "model": row["model"],
        "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": "vbs",
        "status": row["status"],
        "training_file": row["training_file"],
        "validation_file": row["validation_file"],
        "hyperparameters": {
            "n_epochs": hp.get("num_train_epochs"),
            "batch_size": hp.get("batch_size"),
            "learning_rate_multiplier": (hp.get("learning_rate") or DEFAULT_LEARNING_RATE)
            / DEFAULT_LEARNING_RATE,
        },
        "result_files": [],
        "trained_tokens": result.get("trained_tokens"),
        "error": row["error"],
        "seed": row["seed"],
        "suffix": row["suffix"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": row["job_metadata"],
        # vbs's own fields
        "backend": row["backend"],
        "dataset_version": row["dataset_version"],
        "vbs_hyperparameters": hp,
        "result": result or None,
        "evaluation": row["evaluation"],
        "started_at": row["started_at"],
        "deployment": deployment_object(deployment) if deployment else None,
    }


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"ftevent-{row['id']}",
        "object": "fine_tuning.job.event",
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "type": row["type"],
        "data": row["data"],
    }
