"""Conquest types: what one kind of LLM work takes in, what people are asked about its answers,
and how its gold answers become training examples.

A type is a file under ``conquest_types/`` (YAML or JSON, the field names as in the seed's
guide: ``dataSources``, ``helpText``, ``iclFormat``...) or a ``ConquestType`` registered in code
(``registry.py``). Templates are Jinja2, rendered in Jinja's sandbox with every variable
required: ``{{ ticket }}`` is the record's ``ticket`` field, and a template naming a field the
type does not declare is refused when the type loads, not when a record meets it.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel

from vbs_resources import layout as L

# Ids become Jinja variables, Label Studio control names and catalog keys.
Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]

# Control names vbs's Label Studio config gives the curation fields and the model's answer;
# integrators rely on them, so a type's own ids may not take them.
CURATION_FIELDS = ("is_gold_star", "rating", "feedback", "improvement_notes")
PREDICTION = "prediction"
RESERVED = frozenset((*CURATION_FIELDS, PREDICTION, "conquest_id", "custom_id"))


_EXACT_INT = 2**53


class ConquestTypeError(ValueError):
    """A type that cannot be used, with the field at fault."""


class RecordError(ValueError):
    """A record that does not fit its type; ``field`` names the record's field at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


class DataSource(_Model):
    """One field of a record: what the model is given."""

    id: Identifier
    name: str = Field(min_length=1, max_length=200)
    type: Literal["text", "structured", "number"]
    required: bool = True
    # How Label Studio shows it: text as plain text or markdown, structured as JSON.
    display_format: Literal["plain", "markdown", "json"] | None = None


class Question(_Model):
    """What a curator is asked about one answer, besides the curation fields every type has."""

    id: Identifier
    text: str = Field(min_length=1, max_length=500)
    type: Literal["choice", "rating", "boolean", "text"]
    options: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = None
    required: bool = False
    help_text: str | None = None
    # Answers that keep a conquest out of curated datasets, gold or not (a bias flag, say).
    exclude_if: list[str | bool | int] | None = None

    @model_validator(mode="after")
    def _options_fit_the_type(self) -> Question:
        if self.type == "choice":
            if not self.options or len(self.options) < 2:
                raise ValueError("a choice question needs at least two options")
            if len(set(self.options)) != len(self.options):
                raise ValueError("options repeat")
        elif self.options is not None:
            raise ValueError(f"a {self.type} question takes no options")
        if self.exclude_if is not None:
            if self.type == "text":
                raise ValueError("excludeIf: a text question's answers cannot exclude")
            for value in self.exclude_if:
                try:
                    self.check_answer(value)
                except RecordError:
                    raise ValueError(f"excludeIf: {value!r} is not an answer to it") from None
        return self

    def excludes(self, answer: Any) -> bool:
        """Whether ``answer`` keeps its conquest out of datasets (``excludeIf``)."""
        return any(
            answer == value and isinstance(answer, bool) == isinstance(value, bool)
            for value in self.exclude_if or []
        )

    def check_answer(self, value: Any) -> Any:
        """``value`` if it is an answer to this question, else RecordError."""
        if self.type == "choice":
            ok = isinstance(value, str) and value in (self.options or [])
            expected = f"one of {self.options}"
        elif self.type == "rating":
            ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5
            expected = "a whole number from 1 to 5"
        elif self.type == "boolean":
            ok, expected = isinstance(value, bool), "true or false"
        else:
            ok = isinstance(value, str) and len(value) <= 20_000
            expected = "text of at most 20000 characters"
        if not ok:
            raise RecordError(f"answer to {self.id!r} must be {expected}", self.id)
        return value


class IclFormat(_Model):
    """A gold conquest as a chat example: system prompt, user turn and assistant turn."""

    system_prompt: str | None = None
    user_prompt_template: str = Field(min_length=1)
    assistant_response_template: str = Field(default="{{ prediction }}", min_length=1)


class FinetuningFormat(_Model):
    """Which fields a training example's input and output are made of."""

    input_fields: list[Identifier] = Field(min_length=1)
    output_fields: list[Identifier] = Field(min_length=1)


class ExportFormats(_Model):
    icl_format: IclFormat
    finetuning_format: FinetuningFormat


def _sandbox() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Prompts are not HTML: no autoescaping. Undefined variables fail instead of vanishing.
    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


_ENV: Any = None


def _env() -> Any:
    global _ENV
    if _ENV is None:
        _ENV = _sandbox()
    return _ENV


def template_fields(source: str) -> set[str]:
    """The variables a template reads (ConquestTypeError for a template Jinja cannot parse)."""
    from jinja2 import TemplateSyntaxError, meta

    try:
        return set(meta.find_undeclared_variables(_env().parse(source)))
    except TemplateSyntaxError as exc:
        raise ConquestTypeError(f"line {exc.lineno} of the template: {exc.message}") from None


class ConquestType(_Model):
    """One kind of conquest (the file format of ``conquest_types/``)."""

    id: Identifier
    name: str = Field(min_length=1, max_length=200)
    description: str = ""
    version: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")]
    data_sources: list[DataSource] = Field(min_length=1)
    questions: list[Question] = Field(default_factory=list)
    export: ExportFormats

    @model_validator(mode="after")
    def _names_are_consistent(self) -> ConquestType:
        if self.id == L.UPLOADED_DATASET_TYPE:
            raise ValueError(f"id: {self.id!r} is reserved for uploaded training files")
        sources = [s.id for s in self.data_sources]
        questions = [q.id for q in self.questions]
        for kind, ids in (("dataSources", sources), ("questions", questions)):
            repeated = sorted({i for i in ids if ids.count(i) > 1})
            if repeated:
                raise ValueError(f"{kind}: ids repeat: {', '.join(repeated)}")
            taken = sorted(set(ids) & RESERVED)
            if taken:
                raise ValueError(f"{kind}: reserved ids (vbs's own fields): {', '.join(taken)}")
        shared = sorted(set(sources) & set(questions))
        if shared:
            raise ValueError(f"ids used by both dataSources and questions: {', '.join(shared)}")
        icl = self.export.icl_format
        answers = {PREDICTION, *questions, *CURATION_FIELDS}
        for field, source, allowed in (
            ("export.iclFormat.systemPrompt", icl.system_prompt or "", set(sources)),
            ("export.iclFormat.userPromptTemplate", icl.user_prompt_template, set(sources)),
            (
                "export.iclFormat.assistantResponseTemplate",
                icl.assistant_response_template,
                set(sources) | answers,
            ),
        ):
            try:
                unknown = sorted(template_fields(source) - allowed)
            except ConquestTypeError as exc:
                raise ValueError(f"{field}: {exc}") from None
            if unknown:
                raise ValueError(
                    f"{field}: names {', '.join(unknown)}, which this type does not declare "
                    f"(it may use: {', '.join(sorted(allowed))})"
                )
        fine = self.export.finetuning_format
        for field, names, allowed in (
            ("export.finetuningFormat.inputFields", fine.input_fields, set(sources)),
            ("export.finetuningFormat.outputFields", fine.output_fields, set(sources) | answers),
        ):
            unknown = sorted(set(names) - allowed)
            if unknown:
                raise ValueError(f"{field}: unknown fields: {', '.join(unknown)}")
        return self

    # ---- records ----------------------------------------------------------------------------

    def check_record(self, record: Any) -> dict[str, Any]:
        """The record's data-source fields, checked against their types (RecordError naming
        the field otherwise). ``custom_id`` (a string) may ride along; nothing else unknown."""
        if not isinstance(record, dict):
            raise RecordError(f"a record is a JSON object, not {type(record).__name__}")
        known = {s.id: s for s in self.data_sources}
        unknown = sorted(set(record) - set(known) - {"custom_id"})
        if unknown:
            raise RecordError(
                f"unknown field {unknown[0]!r}; {self.id} records have: {', '.join(known)}",
                unknown[0],
            )
        if "custom_id" in record:
            custom_id = record["custom_id"]
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 512:
                message = "custom_id must be a non-empty string of at most 512 characters"
                raise RecordError(message, "custom_id")  # a batch line's own limits
        data: dict[str, Any] = {}
        for source in self.data_sources:
            value = record.get(source.id)
            if value is None:
                if source.required:
                    raise RecordError(f"missing required field {source.id!r}", source.id)
                continue
            if source.type == "text":
                ok, expected = isinstance(value, str) and value.strip() != "", "non-empty text"
            elif source.type == "number":
                if isinstance(value, bool):
                    ok = False
                elif isinstance(value, int):
                    ok = abs(value) <= _EXACT_INT  # what any JSON reader keeps exactly
                else:
                    ok = isinstance(value, float) and math.isfinite(value)
                expected = "a finite number (whole numbers within ±2^53)"
            else:
                ok, expected = isinstance(value, dict | list), "a JSON object or array"
            if not ok:
                raise RecordError(
                    f"field {source.id!r} must be {expected}, not {json.dumps(value)[:60]}",
                    source.id,
                )
            data[source.id] = value
        return data

    def _render(self, source: str, values: dict[str, Any]) -> str:
        from jinja2 import TemplateError

        # Structured fields read as JSON text in a prompt, not as Python reprs.
        shown = {
            key: json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else value
            for key, value in values.items()
        }
        optional = {s.id: "" for s in self.data_sources if not s.required}
        try:
            return _env().from_string(source).render({**optional, **shown})
        except TemplateError as exc:
            raise RecordError(f"template failed: {exc}") from None

    def prompt(self, data: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages a checked record is sent to the model as."""
        icl = self.export.icl_format
        messages = []
        if icl.system_prompt:
            messages.append({"role": "system", "content": self._render(icl.system_prompt, data)})
        messages.append({"role": "user", "content": self._render(icl.user_prompt_template, data)})
        return messages

    def example(self, data: dict[str, Any], answers: dict[str, Any]) -> dict[str, Any]:
        """A chat example (``{"messages": [...]}``) from a record and its answers (the
        prediction, the questions' answers, the curation fields)."""
        reply = self._render(
            self.export.icl_format.assistant_response_template, {**data, **answers}
        )
        return {"messages": [*self.prompt(data), {"role": "assistant", "content": reply}]}
