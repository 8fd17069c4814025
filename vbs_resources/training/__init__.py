"""Fine-tuning: LoRA trainer backends behind one interface, and the resource that runs them.

A backend turns a ``TrainingJob`` (a base model folder, a chat-format train and eval file, the
hyperparameters, an output folder) into a PEFT adapter in that folder and a
``TrainingOutcome``. Two ship: ``unsloth`` (the default; CUDA on GPU machines, its CPU fallback
elsewhere) and ``hf`` (transformers + peft + trl). A backend is one module that subclasses
``TrainingBackend`` (its name, summary, installation, options) and calls ``register_backend``;
the settings, the CLI, the API and ``vbs finetune backends`` find it (``load_backends``): as a
``*_backend`` module of this package, an installed package's ``vbs.training_backends`` entry
point, or a module named in ``VBS_TRAINING_BACKEND_MODULES``.

``Trainer`` is the Dagster resource: it picks the backend of a job (or its own default), trains
into ``<output>.partial`` and renames it into place only when the adapter is whole, so a killed
run leaves no adapter that looks finished, and its retry starts clean.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from vbs_resources.process_memory import peak_rss_mb, release_memory

# The linear layers of Llama-style models (SmolLM2, Llama, Qwen, Mistral, Gemma).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Unsloth's recipes start LoRA at 2e-4; OpenAI's learning_rate_multiplier scales this.
DEFAULT_LEARNING_RATE = 2e-4


class Hyperparameters(BaseModel):
    """One training's knobs, with the seed's names; ``max_steps`` -1 lets epochs decide."""

    model_config = ConfigDict(extra="forbid")

    lora_r: int = Field(default=16, ge=1, le=512)
    lora_alpha: int = Field(default=32, ge=1, le=4096)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False)
    learning_rate: float = Field(default=DEFAULT_LEARNING_RATE, gt=0, le=1, allow_inf_nan=False)
    num_train_epochs: float = Field(default=1, gt=0, le=1000, allow_inf_nan=False)
    max_steps: int = Field(default=-1, ge=-1, le=1_000_000)
    batch_size: int = Field(default=8, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    max_seq_length: int = Field(default=1024, ge=16, le=131072)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_LINEAR), min_length=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False)
    seed: int = Field(default=3407, ge=0, le=2**32 - 1)


@dataclass(frozen=True)
class TrainLog:
    """One logged training step (or the final evaluation, with ``eval_loss``)."""

    step: int
    total_steps: int
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    epoch: float | None = None
    elapsed_s: float = 0.0


@dataclass
class TrainingJob:
    base_model: str
    train_file: str
    output_dir: str
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    eval_file: str | None = None
    on_log: Callable[[TrainLog], None] | None = None
    # Asked between steps; True stops training (a cancelled job) with nothing saved.
    should_stop: Callable[[], bool] | None = None
    # The base model's served name and the job's suffix (a remote service names its model so).
    base_name: str | None = None
    suffix: str | None = None
    # A message for the job's events (a remote service's own events, copied).
    on_event: Callable[[str], None] | None = None
    # Where a backend's work outside this process is (a remote job): ``remember`` keeps it with
    # the job, and the next attempt after a crash gets it back as ``resume``.
    resume: dict[str, Any] | None = None
    remember: Callable[[dict[str, Any]], None] | None = None


@dataclass
class TrainingOutcome:
    backend: str
    device: str
    steps: int
    train_loss: float | None
    eval_loss: float | None
    losses: list[TrainLog]
    duration_s: float
    train_examples: int
    eval_examples: int
    stopped: bool = False
    peak_rss_mb: float = 0.0
    adapter_bytes: int = 0
    # A backend that trains remotely: the model it made there, its job there, and where.
    remote_model: str | None = None
    remote_job_id: str | None = None
    remote_url: str | None = None

    @classmethod
    def from_logs(
        cls,
        backend: str,
        device: str,
        job: TrainingJob,
        logs: list[TrainLog],
        started: float,
        **fields: Any,
    ) -> TrainingOutcome:
        """The outcome of a backend that read ``logs`` from a trainer it does not run itself
        (a process, a service): the last step, the last train and eval losses, the examples."""
        return cls(
            backend=backend,
            device=device,
            steps=max((log.step for log in logs), default=0),
            train_loss=next((x.loss for x in reversed(logs) if x.loss is not None), None),
            eval_loss=next((x.eval_loss for x in reversed(logs) if x.eval_loss is not None), None),
            losses=logs,
            duration_s=time.monotonic() - started,
            train_examples=len(read_chat_examples(job.train_file)),
            eval_examples=len(read_chat_examples(job.eval_file)) if job.eval_file else 0,
            **fields,
        )

    @property
    def seconds_per_step(self) -> float:
        return self.duration_s / self.steps if self.steps else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "steps": self.steps,
            "train_loss": self.train_loss,
            "eval_loss": self.eval_loss,
            "duration_s": round(self.duration_s, 2),
            "seconds_per_step": round(self.seconds_per_step, 3),
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "adapter_bytes": self.adapter_bytes,
            **(
                {
                    "remote_model": self.remote_model,
                    "remote_job_id": self.remote_job_id,
                    "remote_url": self.remote_url,
                }
                if self.remote_model
                else {}
            ),
        }


class TrainingStopped(RuntimeError):
    """Training was stopped on request (``should_stop``); nothing was saved."""


class TrainingError(RuntimeError):
    """A training that cannot run: the message says why, for the job's error."""


class BackendOptions(BaseSettings):
    """A backend's own settings, read from the environment (``VBS_`` and the field's name, as
    vbs's other settings); each field's description is what ``vbs finetune backends`` and the
    docs show."""

    model_config = SettingsConfigDict(env_prefix="VBS_", extra="ignore", frozen=True)


class TrainingBackend(ABC):
    """A way to train one fine-tuning job. One module declares it whole: a subclass with a
    ``name``, a one-line ``summary``, how it is ``install``-ed, the Python modules it
    ``requires``, its ``Options``, decorated with ``register_backend``.

    ``train`` writes a PEFT adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``) into ``job.output_dir`` and returns its outcome."""

    name: ClassVar[str]
    summary: ClassVar[str]
    install: ClassVar[str]
    # Modules that must be importable in vbs's environment for this backend to train.
    requires: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type[BackendOptions] | None] = None
    # True: a remote service trains and keeps the model (``TrainingOutcome.remote_model``); no
    # adapter is written, and the job's ``model`` is the service's base model, not one of ours.
    remote: ClassVar[bool] = False

    @classmethod
    def missing(cls) -> list[str]:
        """What this machine lacks to train with this backend (empty when ready); an option
        set wrong raises ``TrainingError`` naming it."""
        cls.options()
        return [
            f"the Python module {m}" for m in cls.requires if importlib.util.find_spec(m) is None
        ]

    @classmethod
    def options(cls) -> BackendOptions | None:
        """This backend's options as the environment sets them; a wrong one raises
        ``TrainingError`` naming its variable."""
        from pydantic import ValidationError

        if cls.Options is None:
            return None
        try:
            return cls.Options()
        except ValidationError as exc:
            first = exc.errors()[0]
            name = "_".join(str(p) for p in first["loc"]).upper()
            raise TrainingError(f"VBS_{name}: {first['msg']}") from None

    @abstractmethod
    def train(self, job: TrainingJob) -> TrainingOutcome: ...


BACKENDS: dict[str, type[TrainingBackend]] = {}
# Where backends come from: every ``*_backend`` module of this package, every module an installed
# package names under this entry-point group, and the modules ``VBS_TRAINING_BACKEND_MODULES``
# lists (``load_backends``). Backend modules import their libraries inside ``train``: finding
# them imports no Unsloth (which patches transformers) and no torch.
ENTRY_POINT_GROUP = "vbs.training_backends"
_BACKEND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
_imported: set[str] = set()


def register_backend(cls: type[TrainingBackend]) -> type[TrainingBackend]:
    """Class decorator: make a backend available by its ``name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _BACKEND_NAME.fullmatch(name):
        raise TrainingError(
            f"{cls.__qualname__}.name must be 1-40 lowercase letters, digits, - or _, "
            f"starting with a letter (got {name!r})."
        )
    for attribute in ("summary", "install"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise TrainingError(f"The {name} backend declares no {attribute}.")
    known = BACKENDS.get(name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise TrainingError(
            f"Two training backends are named {name!r}: {known.__module__}.{known.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}."
        )
    BACKENDS[name] = cls
    return cls


def _import_once(module: str, load: Callable[[], object]) -> None:
    if module in _imported:
        return
    try:
        load()
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(
            f"The training backend module {module} cannot be imported: {type(exc).__name__}: {exc}"
        ) from exc
    _imported.add(module)


def load_backends(modules: Iterable[str] = ()) -> None:
    """Import every backend module not imported yet: vbs's own, installed packages' (the
    ``vbs.training_backends`` entry points) and ``modules`` (``VBS_TRAINING_BACKEND_MODULES``,
    which ``Settings`` hands here)."""
    for found in pkgutil.iter_modules(__path__):
        if found.name.endswith("_backend"):
            module = f"{__name__}.{found.name}"
            _import_once(module, partial(importlib.import_module, module))
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        _import_once(entry.value, entry.load)
    for module in modules:
        _import_once(module, partial(importlib.import_module, module))


def backend_names() -> list[str]:
    load_backends()
    return sorted(BACKENDS)


def backend_class(name: str) -> type[TrainingBackend]:
    load_backends()
    if name not in BACKENDS:
        raise TrainingError(
            f"No training backend named {name[:40]!r}; known: {', '.join(sorted(BACKENDS))}."
        )
    return BACKENDS[name]


def backend_for(name: str) -> TrainingBackend:
    return backend_class(name)()


def describe_backends() -> list[dict[str, Any]]:
    """Each backend as ``vbs finetune backends`` and the docs show it: name, summary, how it is
    installed, what this machine lacks, and its options (environment variable, type, default,
    description; a secret's value is never shown)."""
    described = []
    for name in backend_names():
        cls = BACKENDS[name]
        options = []
        for field_name, info in (cls.Options.model_fields if cls.Options else {}).items():
            default = info.get_default(call_default_factory=True)
            options.append(
                {
                    "variable": f"VBS_{field_name.upper()}",
                    "type": _type_name(info.annotation),
                    "default": None if isinstance(default, SecretStr) else default,
                    "description": info.description or "",
                }
            )
        try:
            missing = cls.missing()
        except TrainingError as exc:  # an option set wrong: said, not raised
            missing = [str(exc)]
        described.append(
            {
                "name": name,
                "summary": cls.summary,
                "install": cls.install,
                "missing": missing,
                "options": options,
            }
        )
    return described


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("pydantic.types.", "")


def folder_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Trainer(dg.ConfigurableResource):
    """Runs a training job with a backend: the job's, or ``backend``. ``threads`` caps torch's
    CPU threads (0: torch's own choice); ``max_lora_rank`` is the engine's limit
    (``VBS_MAX_LORA_RANK``): a job asking for more is refused, as its adapter could not be
    served."""

    backend: str = "unsloth"
    threads: int = 0
    max_lora_rank: int = 64

    def train(self, job: TrainingJob, backend: str | None = None) -> TrainingOutcome:
        name = backend or self.backend
        impl = backend_for(name)
        if not Path(job.train_file).is_file():
            raise TrainingError(f"There is no training file at {job.train_file}.")
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        final = Path(job.output_dir)
        staging = final.with_name(final.name + ".partial")
        # A killed attempt's leftovers: the retry starts clean.
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        started = time.monotonic()
        try:
            outcome = impl.train(replace(job, output_dir=str(staging)))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if outcome.stopped:
            shutil.rmtree(staging, ignore_errors=True)
            raise TrainingStopped(f"Training stopped at step {outcome.steps}; nothing was saved.")
        if impl.remote:
            shutil.rmtree(staging, ignore_errors=True)
            if not outcome.remote_model:
                raise TrainingError(f"The {name} backend named no remote model.")
            outcome.duration_s = outcome.duration_s or time.monotonic() - started
            return outcome
        if not (staging / "adapter_config.json").is_file():
            shutil.rmtree(staging, ignore_errors=True)
            raise TrainingError(f"The {name} backend saved no adapter_config.json.")
        outcome.duration_s = outcome.duration_s or time.monotonic() - started
        outcome.peak_rss_mb = peak_rss_mb()
        outcome.adapter_bytes = folder_bytes(str(staging))
        (staging / "vbs_training.json").write_text(json.dumps(outcome.summary(), indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        release_memory()
        return outcome


def read_chat_examples(path: str) -> list[dict[str, Any]]:
    """A chat-format JSONL file as trl's conversational prompt-completion rows: the answer (the
    last, assistant, message) is the completion, so the loss is taken on it alone."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if not messages or messages[-1].get("role") != "assistant":
                raise TrainingError(
                    f"{Path(path).name} line {number}: the last message is not "
                    "the assistant's answer."
                )
            prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
            rows.append({"prompt": prompt, "completion": [dict(messages[-1])]})
    return rows


__all__ = [
    "ALL_LINEAR",
    "BACKENDS",
    "BackendOptions",
    "DEFAULT_LEARNING_RATE",
    "Hyperparameters",
    "TrainLog",
    "Trainer",
    "TrainingBackend",
    "TrainingError",
    "TrainingJob",
    "TrainingOutcome",
    "TrainingStopped",
    "backend_class",
    "backend_for",
    "backend_names",
    "describe_backends",
    "load_backends",
    "read_chat_examples",
    "register_backend",
]
