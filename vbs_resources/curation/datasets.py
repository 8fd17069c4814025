"""Curated datasets: a type's gold conquests as chat examples, versioned by their content.

A gold conquest (a gold star, or a rating at or above the policy's threshold, on a completed
answer) is rendered through its type's export templates into ``{"messages": [...]}`` (system,
user, assistant), OpenAI's fine-tuning chat format. Examples are de-duplicated and split into
train and eval by the hash of their prompt (its user turns), so a prompt is on one side only
and stays on its side in every later version (the sides are recorded in the catalog), while
at least ``max(1, round(fraction x prompts))`` prompts are held out. ``icl.jsonl`` holds the
train examples as few-shot demonstrations: the type's ``finetuningFormat`` input and output
fields, and the user and assistant turns.

The version is the hash of the three files' content and of the conquests each split was made
of, so building again with nothing new gives the same version, and any change to what a file
would hold gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from vbs_resources import layout as L
from vbs_resources.bucket import Bucket
from vbs_resources.curation.types import CURATION_FIELDS, PREDICTION, ConquestType, RecordError

if TYPE_CHECKING:
    import polars as pl


class CurationPolicy(dg.ConfigurableResource):
    """When a conquest is gold, and how its type's dataset is cut (``VBS_GOLD_MIN_RATING``,
    ``VBS_DATASET_EVAL_FRACTION``, ``VBS_DATASET_MIN_EXAMPLES``)."""

    gold_min_rating: int = 4
    eval_fraction: float = 0.1
    min_examples: int = 10


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr = Field(min_length=1, pattern=r"\S")


class ChatExample(BaseModel):
    """One line of ``train.jsonl`` / ``eval.jsonl``: OpenAI's chat fine-tuning format, the
    last turn the assistant's."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(min_length=2)

    def dumped(self) -> list[dict[str, str]]:
        return [m.model_dump() for m in self.messages]


def check_example(raw: bytes | str) -> ChatExample:
    """A line as a chat example (ValueError naming the field otherwise)."""
    try:
        example = ChatExample.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "line"
        raise ValueError(f"{where}: {first['msg']}") from None
    if example.messages[-1].role != "assistant":
        raise ValueError("messages: the last turn must be the assistant's")
    if not any(m.role == "user" for m in example.messages):
        raise ValueError("messages: no user turn")
    return example


def _canonical(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """What decides an example's split, and what must never be on both sides: its user turns
    (two examples asking the same thing under different system prompts are one prompt)."""
    return _sha([m["content"] for m in messages if m["role"] == "user"])


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    # Keys in the order they were built (role before content, fields in the type's order):
    # deterministic, and as people expect to read them.
    return b"".join(
        json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for line in lines
    )


@dataclass
class _Example:
    conquest_id: str
    messages: list[dict[str, str]]
    icl: dict[str, Any] | None
    key: str = ""
    prompt: str = ""


@dataclass
class DatasetBuild:
    """A dataset version, before it is written."""

    type_id: str
    type_version: str
    train: list[_Example]
    eval: list[_Example]
    gold: int  # gold conquests read
    duplicates: int  # examples dropped as repeats of another
    skipped: list[str] = field(default_factory=list)  # conquests that could not be rendered
    excluded: list[str] = field(default_factory=list)  # kept out by an excludeIf answer
    sides: dict[str, str] = field(default_factory=dict)  # new prompts' sides, to record
    files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = {
            L.TRAIN: _jsonl([{"messages": e.messages} for e in self.train]),
            L.EVAL: _jsonl([{"messages": e.messages} for e in self.eval]),
            L.ICL: _jsonl([e.icl for e in self.train if e.icl is not None]),
        }

    @cached_property
    def conquest_ids(self) -> dict[str, list[str]]:
        return {
            "train": [e.conquest_id for e in self.train],
            "eval": [e.conquest_id for e in self.eval],
        }

    @cached_property
    def version(self) -> str:
        """The hash of the three files and of the conquests they were made of (the same
        example from another conquest is other lineage, so another version)."""
        digest = hashlib.sha256()
        for name in (L.TRAIN, L.EVAL, L.ICL):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        digest.update(b"conquests\0" + _canonical(self.conquest_ids))
        return L.dataset_version(self.type_id, digest.hexdigest())

    @property
    def icl_count(self) -> int:
        return sum(e.icl is not None for e in self.train)

    def catalog_row(self, options: dict[str, Any], run_id: str | None) -> dict[str, Any]:
        """The version's row for ``Catalog.record_dataset``, built now."""
        now = time.time()
        return {
            "version": self.version,
            "type": self.type_id,
            "type_version": self.type_version,
            "path": L.dataset_folder(self.version),
            "train_count": len(self.train),
            "eval_count": len(self.eval),
            "icl_count": self.icl_count,
            "conquest_ids": self.conquest_ids,
            "options": options,
            "run_id": run_id,
            "created_at": int(now),
            "built_at": now,
        }

    def manifest(self, options: dict[str, Any]) -> dict[str, Any]:
        """What ``manifest.json`` says (no clock in it: the same content, the same bytes)."""
        return {
            "version": self.version,
            "type": self.type_id,
            "type_version": self.type_version,
            "counts": {"train": len(self.train), "eval": len(self.eval), "icl": self.icl_count},
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in self.files.items()},
            "conquest_ids": self.conquest_ids,
            "options": options,
        }


def _answers(conquest_type: ConquestType, row: dict[str, Any]) -> dict[str, Any]:
    """What the assistant template and the output fields may read: the prediction, the
    curation fields and every question's answer (an unanswered one is empty)."""
    answers = json.loads(row["answers"]) if row.get("answers") else {}
    values: dict[str, Any] = {q.id: "" for q in conquest_type.questions}
    values.update(answers)
    values.update({name: row.get(name) for name in CURATION_FIELDS})
    values[PREDICTION] = row.get("prediction") or ""
    # Unset is empty, never the text "None" in a training example.
    return {k: "" if v is None else v for k, v in values.items()}


class Excluded(ValueError):
    """A gold conquest the type keeps out of datasets (an ``excludeIf`` answer)."""


def _turn(message: Any) -> dict[str, str] | None:
    """A request message as a chat example's turn: its text (text parts joined), with
    ``developer`` read as ``system``; None for what holds no text (tool results, images)."""
    if not isinstance(message, dict):
        return None
    role = {"developer": "system"}.get(message.get("role"), message.get("role"))
    content = message.get("content")
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "\n".join(t for t in texts if isinstance(t, str))
    if role not in ("system", "user", "assistant") or not isinstance(content, str):
        return None
    return {"role": role, "content": content}


def _example(conquest_type: ConquestType, row: dict[str, Any]) -> _Example:
    """One gold conquest as an example (RecordError when its data does not fit the type)."""
    data = json.loads(row["input_data"])
    answers = _answers(conquest_type, row)
    for question in conquest_type.questions:
        if question.excludes(answers.get(question.id)):
            raise Excluded(f"{question.id} is {answers[question.id]!r} (excludeIf)")
    messages = data.get("messages") if isinstance(data, dict) else None
    plain = "messages" not in {s.id for s in conquest_type.data_sources}
    if plain and isinstance(messages, list) and set(data) == {"messages"}:
        # A plain batch that named a type: its own messages are the prompt.
        prompt = [turn for turn in map(_turn, messages) if turn is not None]
        turns = [*prompt, {"role": "assistant", "content": answers[PREDICTION]}]
        return _Example(row["id"], turns, None)
    record = conquest_type.check_record(data)
    turns = conquest_type.example(record, answers)["messages"]
    fine = conquest_type.export.finetuning_format
    values = {**record, **answers}
    icl = {
        "input": {f: record[f] for f in fine.input_fields if f in record},
        "output": {f: values.get(f) for f in fine.output_fields},
        "messages": [t for t in turns if t["role"] != "system"],
    }
    return _Example(row["id"], turns, icl)


def held_out(prompts: int, eval_fraction: float) -> int:
    """How many prompts a split holds out at least: ``max(1, round(fraction x prompts))`` once
    there are two prompts or more (one to train on), none with a fraction of 0."""
    if eval_fraction <= 0 or prompts < 2:
        return 0
    return min(max(1, round(eval_fraction * prompts)), prompts - 1)


def _split(
    examples: list[_Example], eval_fraction: float, sides: dict[str, str] | None = None
) -> tuple[list[_Example], list[_Example], dict[str, str]]:
    """Train and eval by prompt, deterministically. A prompt seen before (``sides``: the side
    each prompt of the type was first given) keeps its side for good; a new one is held out when
    its hash falls under ``eval_fraction``, and when that holds out fewer than ``held_out``
    prompts, the new prompts with the lowest hashes are held out too. Returns the splits and the
    sides given now to new prompts."""
    sides = sides or {}
    threshold = eval_fraction * 2**64
    rank = {e.prompt: int(e.prompt[:16], 16) for e in examples}
    side = {
        key: sides.get(key) or ("eval" if value < threshold else "train")
        for key, value in rank.items()
    }
    missing = held_out(len(side), eval_fraction) - sum(s == "eval" for s in side.values())
    for key in sorted((k for k in side if k not in sides and side[k] == "train"), key=rank.get):
        if missing <= 0:
            break
        side[key] = "eval"
        missing -= 1
    train = [e for e in examples if side[e.prompt] == "train"]
    evals = [e for e in examples if side[e.prompt] == "eval"]
    return train, evals, {k: s for k, s in side.items() if k not in sides}


def build_dataset(
    conquest_type: ConquestType,
    gold: pl.DataFrame,
    eval_fraction: float,
    sides: dict[str, str] | None = None,
) -> DatasetBuild:
    """The dataset of ``gold`` (the type's gold conquests, with their annotations); ``sides``
    are the sides the type's prompts were given before (``DatasetStore.sides``)."""
    seen: dict[str, _Example] = {}
    skipped: list[str] = []
    excluded: list[str] = []
    duplicates = 0
    for row in gold.sort("created_at", "id").iter_rows(named=True):
        try:
            example = _example(conquest_type, row)
            # Checked as chat_format_valid checks the files, and encoded: text that cannot be
            # UTF-8 (a lone surrogate) is refused here, not when the files are written.
            line = _canonical({"messages": example.messages})
            check_example(line)
            _canonical(example.icl)
            example.key = hashlib.sha256(line).hexdigest()
            example.prompt = prompt_key(example.messages)
        except Excluded as exc:
            excluded.append(f"{row['id']}: {exc}")
            continue
        except (RecordError, ValueError, KeyError, TypeError) as exc:
            skipped.append(f"{row['id']}: {str(exc)[:300]}")
            continue
        if example.key in seen:
            duplicates += 1
            continue
        seen[example.key] = example
    # Files in the order of the examples' hashes: stable, and unrelated to when they came.
    examples = sorted(seen.values(), key=lambda e: e.key)
    train, evals, new_sides = _split(examples, eval_fraction, sides)
    return DatasetBuild(
        type_id=conquest_type.id,
        type_version=conquest_type.version,
        train=train,
        eval=evals,
        gold=gold.height,
        duplicates=duplicates,
        skipped=skipped,
        excluded=excluded,
        sides=new_sides,
    )


def write_dataset(bucket: Bucket, build: DatasetBuild, options: dict[str, Any]) -> bool:
    """Write the version's folder unless it is there already; True when written now. The
    manifest goes last, so a write cut short is finished by the next build."""
    version = build.version
    if bucket.exists(L.dataset_file(version, L.DATASET_MANIFEST)):
        return False
    for name, content in build.files.items():
        bucket.write_bytes(L.dataset_file(version, name), content)
    manifest = json.dumps(build.manifest(options), ensure_ascii=False, indent=2) + "\n"
    bucket.write_bytes(L.dataset_file(version, L.DATASET_MANIFEST), manifest.encode())
    return True


class UploadError(ValueError):
    """An uploaded training file that is not chat-format JSONL: every bad line, numbered."""

    def __init__(self, problems: list[str]) -> None:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        super().__init__(shown)
        self.problems = problems


def _uploaded(file_id: str, lines: list[bytes], problems: list[str]) -> list[_Example]:
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            # Strict JSON: a lone surrogate escape, deep nesting, a wrong type is a bad line.
            messages = check_example(line).dumped()
        except ValueError as exc:
            problems.append(f"{file_id} line {number}: {exc}")
            continue
        key = hashlib.sha256(_canonical({"messages": messages})).hexdigest()
        example = _Example(f"{file_id}#L{number}", messages, None)
        example.key = key
        example.prompt = prompt_key(messages)
        examples.append(example)
    return examples


def build_uploaded_dataset(
    training: tuple[str, list[bytes]],
    validation: tuple[str, list[bytes]] | None,
    eval_fraction: float,
    sides: dict[str, str] | None = None,
) -> DatasetBuild:
    """A dataset version of uploaded fine-tuning files (OpenAI's chat format, a file id and its
    lines each): de-duplicated like a curated one; the validation file is the eval split, or,
    without one, prompts are held out by hash as ``curated_dataset`` holds them out. Any bad
    line refuses the whole upload (``UploadError``), naming each."""
    problems: list[str] = []
    train = _uploaded(*training, problems)
    evals = _uploaded(*validation, problems) if validation else []
    if problems:
        raise UploadError(problems)
    if not train:
        raise UploadError([f"{training[0]}: no examples"])

    def unique(examples: list[_Example]) -> list[_Example]:
        return sorted({e.key: e for e in reversed(examples)}.values(), key=lambda e: e.key)

    before = len(train) + len(evals)
    train = unique(train)
    new_sides: dict[str, str] = {}
    if validation:
        held = {e.prompt for e in unique(evals)}
        evals = unique(evals)
        train = [e for e in train if e.prompt not in held]
    else:
        train, evals, new_sides = _split(train, eval_fraction, sides)
    return DatasetBuild(
        type_id=L.UPLOADED_DATASET_TYPE,
        type_version="1",
        train=train,
        eval=evals,
        gold=before,
        duplicates=before - len(train) - len(evals),
        skipped=[],
        excluded=[],
        sides=new_sides,
    )


def failed_checks(row: dict[str, Any]) -> list[str]:
    """The blocking checks a dataset version's latest build failed, each with its problems
    (none for a version built before checks were recorded, or uploaded)."""
    failed = []
    for name, check in (row.get("checks") or {}).items():
        if not check.get("passed"):
            problems = "; ".join(str(p) for p in check.get("problems") or []) or "failed"
            failed.append(f"{name}: {problems}")
    return failed
