"""The ``openai`` backend: a job trained by any OpenAI-compatible fine-tuning API (OpenAI's, or
another vbs), through the official ``openai`` client.

The job's train and eval files are uploaded (``purpose="fine-tune"``), the remote job is created
with the job's hyperparameters in OpenAI's names, then followed: its new events are copied into
the local job's (metrics as training steps), a local cancel cancels it there, and a cancel or a
failure there ends the local job the same way. What it makes is the remote ``fine_tuned_model``:
no adapter comes back, and this platform's engine does not serve it (it is recorded in the model
registry as a ``remote`` model, with its lineage).
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from vbs_resources.settings import redact_url
from vbs_resources.training import (
    DEFAULT_LEARNING_RATE,
    BackendOptions,
    TrainingBackend,
    TrainingError,
    TrainingJob,
    TrainingOutcome,
    TrainingStopped,
    TrainLog,
    register_backend,
)
from vbs_resources.training.sft import finite

# A remote job's statuses that end it.
ENDED = ("succeeded", "failed", "cancelled")


class RemoteCancelled(TrainingStopped):
    """The remote service cancelled the job (not this platform)."""


class OpenAIFineTuningOptions(BackendOptions):
    openai_ft_base_url: str | None = Field(
        default=None,
        description="The OpenAI-compatible API that trains (`.../v1`); OpenAI's when unset.",
    )
    openai_ft_api_key: SecretStr | None = Field(
        default=None, description="Its API key (a secret: never logged, never shown)."
    )
    openai_ft_model: str | None = Field(
        default=None,
        description="The remote base model to fine-tune; the job's `model` when unset.",
    )
    openai_ft_extra_body: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="A JSON object of fields added to the remote job's creation, for a "
        'service with its own (another vbs: `{"backend": "hf", "max_steps": 20}`).',
    )
    openai_ft_poll_seconds: float = Field(
        default=5.0, gt=0, le=600, description="Seconds between looks at the remote job."
    )

    @field_validator("openai_ft_extra_body", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            from vbs_resources.strict_json import JSONError, loads

            try:
                value = loads(value.encode())
            except JSONError as exc:
                raise ValueError(f"not JSON: {exc.message}") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object")
        return value


def openai_hyperparameters(job: TrainingJob) -> dict[str, Any]:
    """The job's hyperparameters in the names OpenAI's API takes (whole epochs, a multiplier
    of vbs's default learning rate)."""
    hp = job.hyperparameters
    return {
        "n_epochs": max(1, math.ceil(hp.num_train_epochs)),
        "batch_size": hp.batch_size,
        "learning_rate_multiplier": round(hp.learning_rate / DEFAULT_LEARNING_RATE, 6),
    }


@register_backend
class OpenAIBackend(TrainingBackend):
    name = "openai"
    summary = (
        "An OpenAI-compatible fine-tuning API trains the job (OpenAI's, or another vbs): the "
        "files are uploaded, the remote job followed; the model stays there."
    )
    install = "in vbs's environment (the official `openai` client is a dependency)"
    requires = ("openai",)
    Options = OpenAIFineTuningOptions
    remote = True

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from openai import OpenAI, OpenAIError

        options = self.options()
        assert isinstance(options, OpenAIFineTuningOptions)
        if options.openai_ft_api_key is None:
            raise TrainingError(
                "The openai backend needs VBS_OPENAI_FT_API_KEY (and VBS_OPENAI_FT_BASE_URL for "
                "a service other than OpenAI's)."
            )
        where = redact_url(options.openai_ft_base_url or "https://api.openai.com/v1")
        client = OpenAI(
            base_url=options.openai_ft_base_url,
            api_key=options.openai_ft_api_key.get_secret_value(),
            max_retries=5,
        )
        try:
            return self._train(client, job, options, where)
        except OpenAIError as exc:
            # The client's message holds the service's answer, never the key.
            raise TrainingError(f"{where}: {type(exc).__name__}: {str(exc)[:500]}") from None

    def _train(
        self, client: Any, job: TrainingJob, options: OpenAIFineTuningOptions, where: str
    ) -> TrainingOutcome:
        started = time.monotonic()
        note = job.on_event or (lambda message: None)
        seen: set[str] = set()
        remote = self._resumed(client, job, where, seen)
        if remote is not None:
            note(f"Following the remote job {remote.id} at {where} again ({remote.status}; "
                 f"its {len(seen)} earlier events are not copied again)")  # fmt: skip
        else:
            remote = self._create(client, job, options, where)
        logs: list[TrainLog] = []
        cancelled_here = False
        while True:
            for event in self._new_events(client, remote.id, seen):
                log = self._step(event, started)
                if log is not None:
                    logs.append(log)
                    if job.on_log:
                        job.on_log(log)
                else:
                    note(f"Remote: {event.message}")
            if remote.status in ENDED:
                break
            if not cancelled_here and job.should_stop and job.should_stop():
                note(f"Cancelling the remote job {remote.id}")
                client.fine_tuning.jobs.cancel(remote.id)
                cancelled_here = True
            time.sleep(options.openai_ft_poll_seconds)
            remote = client.fine_tuning.jobs.retrieve(remote.id)
        outcome = TrainingOutcome.from_logs(
            self.name, "remote", job, logs, started, remote_job_id=remote.id, remote_url=where
        )
        if remote.status == "cancelled":
            if cancelled_here:
                outcome.stopped = True
                return outcome
            raise RemoteCancelled(f"The remote job {remote.id} was cancelled at {where}.")
        if remote.status == "failed":
            error = remote.error
            detail = f"{error.code}: {error.message}" if error and error.message else "no reason"
            raise TrainingError(f"The remote job {remote.id} failed at {where}: {detail}")
        if not remote.fine_tuned_model:
            raise TrainingError(f"The remote job {remote.id} succeeded without a model.")
        outcome.remote_model = remote.fine_tuned_model
        return outcome

    @staticmethod
    def _resumed(client: Any, job: TrainingJob, where: str, seen: set[str]) -> Any:
        """The remote job an earlier attempt of this job created at ``where``, its events
        marked ``seen``; None when there is none (or the service no longer has it)."""
        from openai import NotFoundError

        state = job.resume or {}
        if not state.get("remote_job_id") or state.get("remote_url") != where:
            return None
        try:
            remote = client.fine_tuning.jobs.retrieve(state["remote_job_id"])
        except NotFoundError:
            return None
        seen.update(e.id for e in client.fine_tuning.jobs.list_events(remote.id, limit=100).data)
        return remote

    @staticmethod
    def _create(client: Any, job: TrainingJob, options: OpenAIFineTuningOptions, where: str) -> Any:
        """The job's files uploaded and its remote job created; where it is, remembered."""
        note = job.on_event or (lambda message: None)
        with open(job.train_file, "rb") as fh:
            training = client.files.create(file=fh, purpose="fine-tune")
        validation = None
        if job.eval_file:
            with open(job.eval_file, "rb") as fh:
                validation = client.files.create(file=fh, purpose="fine-tune")
        model = options.openai_ft_model or job.base_name
        if not model:
            raise TrainingError("The job names no base model for the remote service.")
        remote = client.fine_tuning.jobs.create(
            model=model,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            suffix=job.suffix,
            seed=job.hyperparameters.seed,
            hyperparameters=openai_hyperparameters(job),
            extra_body=options.openai_ft_extra_body or None,
        )
        if job.remember:
            job.remember({"remote_job_id": remote.id, "remote_url": where})
        note(f"Remote job {remote.id} created at {where} (files {training.id}"
             f"{', ' + validation.id if validation else ''})")  # fmt: skip
        return remote

    @staticmethod
    def _new_events(client: Any, remote_id: str, seen: set[str]) -> list[Any]:
        """The remote job's events not seen yet, oldest first (the API lists newest first)."""
        page = client.fine_tuning.jobs.list_events(remote_id, limit=100)
        fresh = [event for event in page.data if event.id not in seen]
        seen.update(event.id for event in fresh)
        return list(reversed(fresh))

    @staticmethod
    def _step(event: Any, started: float) -> TrainLog | None:
        """A ``metrics`` event as a training step (OpenAI's ``step``, ``train_loss``,
        ``valid_loss``, ``total_steps``); None for any other event."""
        data = event.data if isinstance(event.data, dict) else {}
        step = data.get("step")
        if event.type != "metrics" or not isinstance(step, int):
            return None
        loss, eval_loss = finite(data.get("train_loss")), finite(data.get("valid_loss"))
        if loss is None and eval_loss is None:
            return None
        return TrainLog(
            step=step,
            total_steps=data.get("total_steps") if isinstance(data.get("total_steps"), int) else 0,
            loss=loss,
            eval_loss=eval_loss,
            learning_rate=finite(data.get("learning_rate")),
            elapsed_s=time.monotonic() - started,
        )
