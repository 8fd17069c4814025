"""The conquest types a deployment knows: the files of a folder (``conquest_types/`` by
default) and whatever an integration registers in code, as in the seed's guide::

    from vbs_resources.curation import ConquestType, task_registry

    task_registry.register(ConquestType(id="my_task", ...))
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import ValidationError

from vbs_resources.curation.types import ConquestType

SUFFIXES = (".yaml", ".yml", ".json")
# The shipped types, beside the packages (the top-level folder DESIGN.md fixes).
SHIPPED = Path(__file__).resolve().parents[2] / "conquest_types"
MAX_TYPE_FILE_BYTES = 1_000_000


class ConquestTypeFileError(ValueError):
    """A type file that cannot be loaded: the file and the field at fault are in the message."""


def _where(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a path: ``questions[1].options``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the file)"


def describe(error: ValidationError) -> str:
    """Every problem of a type, one per line, each led by its field."""
    lines = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{_where(item['loc'])}: {message}")
    return "\n".join(lines)


def load_type_file(path: Path) -> ConquestType:
    """One type file, or ConquestTypeFileError naming the file and each field at fault."""
    import yaml

    try:
        if path.stat().st_size > MAX_TYPE_FILE_BYTES:
            raise ConquestTypeFileError(f"{path}: over {MAX_TYPE_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConquestTypeFileError(f"{path}: cannot be read: {exc}") from None
    try:
        if path.suffix == ".json":
            raw = json.loads(text)
        else:
            raw = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConquestTypeFileError(f"{path}: line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConquestTypeFileError(f"{path}: {where}{problem}") from None
    if not isinstance(raw, dict):
        raise ConquestTypeFileError(f"{path}: a type file holds one mapping (id, name, ...)")
    try:
        conquest_type = ConquestType.model_validate(raw)
    except ValidationError as exc:
        raise ConquestTypeFileError(f"{path}:\n{describe(exc)}") from None
    if conquest_type.id != path.stem:
        raise ConquestTypeFileError(
            f"{path}: id: {conquest_type.id!r} differs from the file's name {path.stem!r}"
        )
    return conquest_type


class TaskRegistry:
    """Conquest types by id. Registering the same id again with other content is refused
    unless ``replace`` (a type changes by a new ``version``, not silently)."""

    def __init__(self) -> None:
        self._types: dict[str, ConquestType] = {}
        self._lock = threading.Lock()

    def register(
        self,
        conquest_type: ConquestType | str,
        definition: ConquestType | dict[str, Any] | None = None,
        replace: bool = False,
    ) -> ConquestType:
        """``register(ConquestType(...))``, or the seed's shape ``register("id", definition)``
        with the type or its fields as a dict."""
        if isinstance(conquest_type, str):
            if definition is None:
                raise ValueError("register(type_id, definition): the definition is missing")
            if isinstance(definition, dict):
                definition = ConquestType.model_validate({"id": conquest_type, **definition})
            if definition.id != conquest_type:
                raise ValueError(
                    f"registered as {conquest_type!r} but the type's id is {definition.id!r}"
                )
            conquest_type = definition
        with self._lock:
            known = self._types.get(conquest_type.id)
            if known is not None and known != conquest_type and not replace:
                raise ValueError(
                    f"conquest type {conquest_type.id!r} is already registered (version "
                    f"{known.version}) with other content; pass replace=True to change it"
                )
            self._types[conquest_type.id] = conquest_type
        return conquest_type

    def load_folder(self, folder: Path) -> list[ConquestType]:
        """Every type file of ``folder`` (sorted by name); the first bad file stops the load
        with ConquestTypeFileError, and nothing of the folder is registered."""
        files = sorted(p for p in Path(folder).iterdir() if p.suffix in SUFFIXES)
        loaded = [load_type_file(p) for p in files]
        for conquest_type in loaded:
            self.register(conquest_type, replace=True)
        return loaded

    def get(self, type_id: str) -> ConquestType:
        """The type, or KeyError naming the ones there are."""
        with self._lock:
            found = self._types.get(type_id)
            known = sorted(self._types)
        if found is None:
            raise KeyError(
                f"unknown conquest type {type_id!r}; known: {', '.join(known) or 'none'}"
            )
        return found

    def all(self) -> list[ConquestType]:
        with self._lock:
            return [self._types[k] for k in sorted(self._types)]

    def __contains__(self, type_id: object) -> bool:
        return type_id in self._types


task_registry = TaskRegistry()


def load_conquest_types(folder: Path | None = None) -> TaskRegistry:
    """``task_registry`` with the types of ``folder`` (the shipped ``conquest_types/`` when
    None) loaded into it."""
    task_registry.load_folder(folder or SHIPPED)
    return task_registry


class ConquestTypes(dg.ConfigurableResource):
    """The deployment's conquest types: ``folder`` (the shipped ``conquest_types/`` when
    unset) read at each use, so an edited type file counts from the next run, plus the types
    integrations registered in code."""

    folder: str | None = None

    def registry(self) -> TaskRegistry:
        return load_conquest_types(Path(self.folder) if self.folder else None)
