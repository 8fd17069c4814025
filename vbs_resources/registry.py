"""The model registry: what the engine serves, by the name a request's ``model`` uses.

Three kinds are served: ``base`` (a generation model), ``embedding``, and ``adapter`` (a LoRA
adapter of a registered base, served by the base's engine with the adapter applied per
request). The base and embedding models of the settings are registered whenever the platform
starts; adapters are added by hand (``vbs models add``) or by deployment. A fourth, ``remote``,
is a model a remote service trained for a job of this platform (the ``openai`` training
backend): recorded with its lineage, never served here. Retiring keeps the row and the
files: a retired name is never reused, and a request naming it gets ``model_not_found``.

Registering an adapter checks it first, so that a bad one is refused at the door with the field
named, rather than failing every request that names it: a PEFT ``adapter_config.json`` of a LoRA
adapter, its weights beside it (read: every tensor's shape fits the rank, the target modules and
the base model's sizes), a rank within the engine's limit, and a base model that is the
registered base (by folder or by name).
"""

from __future__ import annotations

import posixpath
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from vbs_resources import layout as L
from vbs_resources import strict_json
from vbs_resources.catalog import Catalog
from vbs_resources.lora_weights import WeightsError, check_lora_weights, safetensors_shapes

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,255}$")
# The LoRA ranks vLLM can be started with (``max_lora_rank``).
SUPPORTED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KINDS = ("base", "adapter", "embedding", "remote")


class RegistryError(ValueError):
    """A registration or retirement refused; ``field`` names what is wrong."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


@dataclass(frozen=True)
class ServedModel:
    name: str
    kind: str
    path: str
    base: str | None = None
    lora_id: int | None = None
    rank: int | None = None
    # vLLM's registered names of the parsers that turn this model's output into ``tool_calls``
    # and ``message.reasoning``; an adapter without its own uses its base's.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    @property
    def options(self) -> dict[str, str] | None:
        """The serving options stored with the registration (None when there are none)."""
        found = {
            key: value
            for key, value in (
                ("tool_call_parser", self.tool_call_parser),
                ("reasoning_parser", self.reasoning_parser),
            )
            if value
        }
        return found or None


@dataclass(frozen=True)
class ServedModels:
    """The registry's available models at one moment: what one run serves."""

    models: dict[str, ServedModel] = field(default_factory=dict)

    def get(self, name: Any) -> ServedModel | None:
        return self.models.get(name) if isinstance(name, str) else None

    def adapters_of(self, base: str) -> list[ServedModel]:
        return [m for m in self.models.values() if m.kind == "adapter" and m.base == base]

    def parsers_of(self, model: ServedModel) -> tuple[str | None, str | None]:
        """A model's tool-call and reasoning parsers, an adapter falling back to its base's."""
        base = self.get(model.base) if model.kind == "adapter" else None
        return (
            model.tool_call_parser or (base.tool_call_parser if base else None),
            model.reasoning_parser or (base.reasoning_parser if base else None),
        )


PARSER_OPTIONS = ("tool_call_parser", "reasoning_parser")


def check_parsers(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """Refuse parser names vLLM does not know, naming the field and the names it does know."""
    if not tool_call_parser and not reasoning_parser:
        return
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for field_name, value, manager in (
        ("tool_call_parser", tool_call_parser, ToolParserManager),
        ("reasoning_parser", reasoning_parser, ReasoningParserManager),
    ):
        known = sorted(manager.list_registered())
        if value and value not in known:
            raise RegistryError(
                f"vLLM has no {field_name.replace('_', ' ')} named {value[:80]!r}; "
                f"known: {', '.join(known)}.",
                field_name,
            )


def lora_rank_limit(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that covers every adapter."""
    highest = max(ranks, default=1)
    return next(r for r in SUPPORTED_RANKS if r >= highest)


def _is_url(path: str) -> bool:
    return "://" in path


def _read_json(path: str) -> Any:
    with fsspec.open(path, "rb") as fh:
        return strict_json.loads(fh.read(1 << 20))


def _torch_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a PyTorch weights file, read as data only (no code runs)."""
    import torch

    try:
        with fsspec.open(path, "rb") as fh:
            tensors = torch.load(fh, map_location="meta", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever a corrupt pickle raises
        raise WeightsError(f"the weights do not load: {type(exc).__name__}") from None
    if not isinstance(tensors, dict):
        raise WeightsError("the weights are not a table of tensors")
    return {str(k): list(v.shape) for k, v in tensors.items() if hasattr(v, "shape")}


def _exists(path: str) -> bool:
    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)


def _same_model(trained_on: str, base: dict[str, Any]) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the registered ``base``: the same
    folder, or the same model name (``HuggingFaceTB/SmolLM2-135M-Instruct`` and a folder
    ``.../SmolLM2-135M-Instruct`` served as ``SmolLM2-135M-Instruct``)."""
    if not _is_url(trained_on) and not _is_url(base["path"]):
        if Path(trained_on).expanduser().resolve() == Path(base["path"]).expanduser().resolve():
            return True
    last = posixpath.basename(trained_on.rstrip("/")).lower()
    names = {posixpath.basename(base["path"].rstrip("/")).lower(), base["name"].lower()}
    return last in names


def _same_lineage(row: dict[str, Any], lineage: dict[str, Any]) -> bool:
    """Whether ``row`` was deployed from a fine-tuning job of the same base model and suffix."""
    theirs = row["lineage"] or {}
    return (
        row["kind"] == "adapter"
        and bool(theirs.get("job_id"))
        and bool(theirs.get("deployments"))
        and theirs.get("base_model") == lineage.get("base_model")
        and row["name"].rsplit(":", 1)[0] == _deployed_prefix(lineage)
    )


def _deployed_prefix(lineage: dict[str, Any]) -> str:
    """``ft:<base>:<suffix>`` of the model a lineage deploys."""
    return L.fine_tuned_model_name(
        lineage.get("base_model") or "", lineage.get("suffix"), "ftjob-x"
    ).rsplit(":", 1)[0]


class ModelRegistry:
    """Registrations over the catalog's ``models`` table."""

    def __init__(self, catalog: Catalog, max_lora_rank: int = 64) -> None:
        self.catalog, self.max_lora_rank = catalog, max_lora_rank

    # ---- reading ----------------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any]:
        row = self.catalog.models.get(name)
        if row is None:
            raise RegistryError(f"No model named {name[:100]!r} is registered.", "name", 404)
        return row

    def list(self, include_retired: bool = False) -> list[dict[str, Any]]:
        return self.catalog.models.list(include_retired)

    def snapshot(self) -> ServedModels:
        return ServedModels(
            {
                row["name"]: ServedModel(
                    row["name"],
                    row["kind"],
                    row["path"],
                    row["base"],
                    row["lora_id"],
                    row["rank"],
                    **{k: v for k, v in (row["options"] or {}).items() if k in PARSER_OPTIONS},
                )
                for row in self.catalog.models.list()
            }
        )

    # ---- registering ------------------------------------------------------------------------

    def register_configured(self, configured: list[ServedModel]) -> list[str]:
        """Register the models of the settings (base, embedding), or bring a registered one's
        path up to date. Returns notes about names taken by another kind of model."""
        notes = []
        for model in configured:
            check_parsers(model.tool_call_parser, model.reasoning_parser)
            existing = self.catalog.models.get(model.name)
            if existing is None:
                self.catalog.models.insert(
                    self._row(model.name, model.kind, model.path, options=model.options)
                )
            elif existing["kind"] != model.kind:
                notes.append(
                    f"{model.name} is configured as a {model.kind} model but registered as "
                    f"{existing['kind']}; the registration stands"
                )
            elif (existing["path"], existing["options"]) != (model.path, model.options):
                self.catalog.models.update_configured(
                    model.name, model.kind, model.path, model.options
                )
        return notes

    def add_adapter(
        self,
        name: str,
        path: str,
        base: str | None = None,
        lineage: dict[str, Any] | None = None,
        tool_call_parser: str | None = None,
        reasoning_parser: str | None = None,
    ) -> dict[str, Any]:
        """Check and register a LoRA adapter; ``base`` defaults to the only base model. Without
        parsers of its own the adapter uses its base's."""
        self._check_name(name)
        check_parsers(tool_call_parser, reasoning_parser)
        path = path if _is_url(path) else str(Path(path).expanduser().resolve())
        config = self._adapter_config(path)
        base_row = self._base_for(base, config)
        self._check_weights(path, config, base_row)
        rank = config["r"]
        options = ServedModel(
            name,
            "adapter",
            path,
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
        ).options
        row = self._row(
            name,
            "adapter",
            path,
            base=base_row["name"],
            rank=rank,
            lineage=lineage,
            options=options,
        )
        if not self.catalog.models.insert(row):
            raise RegistryError(f"The name {name!r} is taken (names are never reused).", "name")
        return self.get(name)

    def deploy(
        self, name: str, path: str, base: str, lineage: dict[str, Any]
    ) -> tuple[dict[str, Any], list[str]]:
        """Serve a fine-tuned adapter as ``name``: registered (and checked) the first time, made
        available again when it was retired (a rollback). The other available models that a
        deployment of the same lineage made (the same base model and suffix, by a fine-tuning
        job) are retired, so one version of a fine-tuned model answers at a time; a model
        registered by hand is never retired here. Returns the row and the names retired."""
        existing = self.catalog.models.get(name)
        if existing is None:
            row = self.add_adapter(name, path, base=base, lineage=lineage)
        else:
            same = path if _is_url(path) else str(Path(path).resolve())
            if existing["kind"] != "adapter" or existing["path"] != same:
                raise RegistryError(f"The name {name!r} is taken by another model.", "name")
            history = [*(existing["lineage"] or {}).get("deployments", [])]
            self.catalog.models.redeploy(
                name, {**lineage, "deployments": history + lineage.get("deployments", [])}
            )
            row = self.get(name)
        retired = []
        for other in self.catalog.models.list():
            if other["name"] != name and _same_lineage(other, lineage):
                self.catalog.models.retire(other["name"])
                retired.append(other["name"])
        return row, retired

    def record_remote(
        self, name: str, url: str, base: str, lineage: dict[str, Any]
    ) -> dict[str, Any]:
        """A model that a remote service (``url``, no credentials) trained for one of this
        platform's jobs: recorded with its lineage, never served by this engine. Recording the
        same model again (a retried run) changes nothing."""
        self._check_name(name)
        existing = self.catalog.models.get(name)
        if existing is None:
            row = self._row(name, "remote", url, base=base, lineage=lineage)
            if self.catalog.models.insert(row):
                return self.get(name)
            existing = self.get(name)
        if existing["kind"] != "remote" or (existing["lineage"] or {}).get("job_id") != lineage.get(
            "job_id"
        ):
            raise RegistryError(f"The name {name!r} is taken by another model.", "name")
        return existing

    def retire(self, name: str) -> dict[str, Any]:
        row = self.get(name)
        if row["status"] == "retired":
            raise RegistryError(f"{name} is retired already.", "name")
        self.catalog.models.retire(name)
        return self.get(name)

    # ---- checks -----------------------------------------------------------------------------

    def _row(self, name: str, kind: str, path: str, **fields: Any) -> dict[str, Any]:
        return dict(
            name=name,
            kind=kind,
            path=path,
            status="available",
            created_at=int(time.time()),
            **fields,
        )

    @staticmethod
    def _check_name(name: str) -> None:
        if not MODEL_NAME.match(name):
            raise RegistryError(
                "A model name is 1 to 256 letters, digits and . _ : @ / + -, starting with a "
                "letter or digit.",
                "name",
            )

    def _adapter_config(self, path: str) -> dict[str, Any]:
        config_path = posixpath.join(path, "adapter_config.json")
        if not _exists(path):
            raise RegistryError(f"There is no adapter at {path}.", "path")
        if not _exists(config_path):
            raise RegistryError(
                "The adapter has no adapter_config.json: save it with PEFT's save_pretrained.",
                "adapter_config.json",
            )
        try:
            config = _read_json(config_path)
        except (OSError, ValueError):
            raise RegistryError(
                "adapter_config.json is not valid JSON.", "adapter_config.json"
            ) from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            raise RegistryError(
                "adapter_config.json does not describe a LoRA adapter (peft_type must be LORA).",
                "peft_type",
            )
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise RegistryError("The adapter's rank r must be a positive integer.", "r")
        if rank > self.max_lora_rank:
            raise RegistryError(
                f"The adapter's rank {rank} is above the engine's limit of {self.max_lora_rank} "
                "(VBS_MAX_LORA_RANK).",
                "r",
            )
        if not config.get("target_modules"):
            raise RegistryError("The adapter names no target_modules.", "target_modules")
        if not isinstance(config.get("base_model_name_or_path"), str):
            raise RegistryError(
                "adapter_config.json does not name its base_model_name_or_path.",
                "base_model_name_or_path",
            )
        if not any(_exists(posixpath.join(path, f)) for f in WEIGHT_FILES):
            raise RegistryError(
                f"The adapter has no weights ({' or '.join(WEIGHT_FILES)}).", "weights"
            )
        return config

    @staticmethod
    def _check_weights(path: str, config: dict[str, Any], base: dict[str, Any]) -> None:
        """The weights read (not loaded): their tensors match the config's rank and target
        modules and the base model's layers and sizes, so vLLM can load them for that base."""
        try:
            base_config = _read_json(posixpath.join(base["path"], "config.json"))
        except (OSError, ValueError):
            base_config = None  # a base whose folder vLLM reads another way: sizes unchecked
        weights = posixpath.join(path, WEIGHT_FILES[0])
        try:
            if _exists(weights):
                shapes = safetensors_shapes(weights)
            else:
                shapes = _torch_shapes(posixpath.join(path, WEIGHT_FILES[1]))
            check_lora_weights(shapes, config, base_config)
        except WeightsError as exc:
            name = weights if _exists(weights) else WEIGHT_FILES[1]
            raise RegistryError(
                f"{posixpath.basename(name)}: {exc.message}", exc.tensor or "weights"
            ) from None

    def _base_for(self, base: str | None, config: dict[str, Any]) -> dict[str, Any]:
        bases = [m for m in self.catalog.models.list() if m["kind"] == "base"]
        if base is None:
            if len(bases) != 1:
                raise RegistryError(
                    f"Name the adapter's base model: {len(bases)} base models are registered.",
                    "base",
                )
            row = bases[0]
        else:
            row = next((m for m in bases if m["name"] == base), None)
            if row is None:
                raise RegistryError(f"{base!r} is not an available base model.", "base")
        trained_on = config["base_model_name_or_path"]
        if not _same_model(trained_on, row):
            raise RegistryError(
                f"The adapter was trained on {trained_on[:200]!r}, which is not the base model "
                f"{row['name']} ({row['path']}).",
                "base_model_name_or_path",
            )
        return row
