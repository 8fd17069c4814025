"""A conquest type as Label Studio sees it: the labeling config of its project and the data of
each task.

The config shows the record's fields and the model's answer (a ``Text`` object named
``prediction``), asks the type's questions, and always carries the curation fields under fixed
control names that integrators may rely on: ``is_gold_star`` (Choices, single value ``gold``),
``rating`` (Rating, 1-5), ``feedback`` and ``improvement_notes`` (TextArea). A task's data holds
``conquest_id``, ``prediction`` and one key per data source.
"""

from __future__ import annotations

import json
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from vbs_resources.curation.types import PREDICTION, ConquestType, Question

GOLD = "gold"
BOOLEAN_CHOICES = ("yes", "no")


def _field(source_id: str) -> str:
    # Task data keys and object names share one namespace in a config: data sources are
    # shown by objects named after them, prefixed so they can never meet a control's name.
    return f"input_{source_id}"


def _question(question: Question) -> list[str]:
    required = ' required="true"' if question.required else ""
    name, text = quoteattr(question.id), escape(question.text)
    hint = f" hint={quoteattr(question.help_text)}" if question.help_text else ""
    lines = [f"  <Header value={quoteattr(question.text)}{hint}/>"]
    if question.type in ("choice", "boolean"):
        options = question.options if question.type == "choice" else BOOLEAN_CHOICES
        lines.append(
            f'  <Choices name={name} toName="{PREDICTION}" choice="single-radio"'
            f' showInline="true"{required}>'
        )
        lines += [f"    <Choice value={quoteattr(option)}/>" for option in options or ()]
        lines.append("  </Choices>")
    elif question.type == "rating":
        lines.append(
            f'  <Rating name={name} toName="{PREDICTION}" maxRating="5" icon="star"{required}/>'
        )
    else:
        lines.append(
            f'  <TextArea name={name} toName="{PREDICTION}" rows="3" maxSubmissions="1"'
            f' editable="true" placeholder={quoteattr(text)}{required}/>'
        )
    return lines


def labeling_config(conquest_type: ConquestType) -> str:
    """The Label Studio labeling config (XML) of ``conquest_type``'s project."""
    lines = ["<View>", f'  <Header value={quoteattr(conquest_type.name)} size="3"/>']
    for source in conquest_type.data_sources:
        lines.append(f'  <Header value={quoteattr(source.name)} size="5"/>')
        lines.append(
            f'  <Text name="{_field(source.id)}" value="${_field(source.id)}"'
            ' selectionEnabled="false"/>'
        )
    lines += [
        '  <Header value="The model\'s answer" size="5"/>',
        f'  <Text name="{PREDICTION}" value="${PREDICTION}"/>',
    ]
    for question in conquest_type.questions:
        lines += _question(question)
    lines += [
        '  <Header value="Curation"/>',
        f'  <Choices name="is_gold_star" toName="{PREDICTION}" choice="multiple">',
        f'    <Choice value="{GOLD}" hint="A gold example: train on it"/>',
        "  </Choices>",
        f'  <Rating name="rating" toName="{PREDICTION}" maxRating="5" icon="star"/>',
        f'  <TextArea name="feedback" toName="{PREDICTION}" rows="2" maxSubmissions="1"'
        ' editable="true" placeholder="Feedback"/>',
        f'  <TextArea name="improvement_notes" toName="{PREDICTION}" rows="2"'
        ' maxSubmissions="1" editable="true" placeholder="How the answer should change"/>',
        "</View>",
    ]
    return "\n".join(lines)


def task_data(conquest_type: ConquestType, conquest: dict[str, Any]) -> dict[str, Any]:
    """A conquest as a Label Studio task's data: its id, the model's answer (or its error) and
    each data source as text (structured values as indented JSON)."""
    data: dict[str, Any] = {"conquest_id": conquest["id"]}
    input_data = dict(conquest.get("input_data") or {})
    if "messages" in input_data and not any(s.id in input_data for s in conquest_type.data_sources):
        # A plain batch's conquest: its input data is the request's messages, shown in the
        # type's first text field.
        first = next((s.id for s in conquest_type.data_sources if s.type == "text"), None)
        if first is not None:
            input_data[first] = "\n\n".join(
                f"{m.get('role')}: {m.get('content')}" for m in input_data["messages"]
            )
    for source in conquest_type.data_sources:
        value = input_data.get(source.id)
        if isinstance(value, dict | list):
            value = json.dumps(value, ensure_ascii=False, indent=2)
        data[_field(source.id)] = "" if value is None else str(value)
    prediction = conquest.get("prediction")
    if prediction is None:
        error = conquest.get("error") or {}
        prediction = f"(no answer: {error.get('code') or 'error'}: {error.get('message') or ''})"
    data[PREDICTION] = prediction
    return data
