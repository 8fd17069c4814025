"""Conquest types: the shipped files load and render; bad type files fail with the file and
the field named; records are checked field by field; integrations register types in code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vbs_resources.curation import (
    ConquestType,
    ConquestTypeFileError,
    RecordError,
    TaskRegistry,
    load_type_file,
)
from vbs_resources.curation.registry import SHIPPED

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shipped() -> TaskRegistry:
    registry = TaskRegistry()
    registry.load_folder(SHIPPED)
    return registry


def support_type() -> dict:
    return yaml.safe_load((SHIPPED / "support_reply.yaml").read_text())


def write(folder: Path, raw: dict | str, name: str = "support_reply.yaml") -> Path:
    path = folder / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_the_shipped_types_load(shipped):
    assert [t.id for t in shipped.all()] == ["candidate_evaluation", "support_reply"]
    support = shipped.get("support_reply")
    assert [q.type for q in support.questions] == ["choice", "rating", "boolean", "text"]
    assert support.export.finetuning_format.output_fields == ["prediction"]


def test_a_record_becomes_the_types_prompt_and_a_chat_example(shipped):
    support = shipped.get("support_reply")
    data = support.check_record(
        {
            "ticket_subject": "Broken mug",
            "ticket_body": "It arrived in pieces 😞 — café order",
            "order_history": [{"id": 12, "item": "mug"}],
        }
    )
    system, user = support.prompt(data)
    assert system["role"] == "system" and "our products" in system["content"]  # optional unset
    assert user["content"].startswith("Subject: Broken mug\nRecent orders: ")
    assert '[{"id": 12, "item": "mug"}]' in user["content"]  # structured data as JSON
    assert user["content"].endswith("It arrived in pieces 😞 — café order")
    assert "tier" not in user["content"]
    example = support.example(data, {"prediction": "So sorry! A new mug is on its way."})
    assert [m["role"] for m in example["messages"]] == ["system", "user", "assistant"]
    assert example["messages"][-1]["content"] == "So sorry! A new mug is on its way."


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        ({"ticket_body": "x"}, "ticket_subject", "missing required field 'ticket_subject'"),
        ({"ticket_subject": "", "ticket_body": "x"}, "ticket_subject", "non-empty text"),
        ({"ticket_subject": 5, "ticket_body": "x"}, "ticket_subject", "non-empty text"),
        (
            {"ticket_subject": "s", "ticket_body": "x", "order_history": "[]"},
            "order_history",
            "a JSON object or array",
        ),  # fmt: skip
        ({"ticket_subject": "s", "ticket_body": "x", "tickte": 1}, "tickte", "unknown field"),
        ({"ticket_subject": "s", "ticket_body": "x", "custom_id": 7}, "custom_id", "string"),
        ({"ticket_subject": "s", "ticket_body": "x", "custom_id": "x" * 513}, "custom_id", "512"),
        ({"ticket_subject": "s", "ticket_body": "x", "custom_id": ""}, "custom_id", "non-empty"),
    ],
)
def test_bad_records_name_the_field(shipped, record, field, message):
    with pytest.raises(RecordError, match=message) as caught:
        shipped.get("support_reply").check_record(record)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "value",
    [True, float("nan"), float("inf"), 10**400, "3"],
    ids=["bool", "nan", "inf", "huge", "str"],
)
def test_numbers_are_finite_numbers(shipped, value):
    candidate = shipped.get("candidate_evaluation")
    record = {"role_title": "r", "job_description": "j", "candidate_summary": "c"}
    with pytest.raises(RecordError) as caught:
        candidate.check_record({**record, "years_experience": value})
    assert caught.value.field == "years_experience"


def test_a_record_is_an_object(shipped):
    with pytest.raises(RecordError, match="JSON object, not list"):
        shipped.get("support_reply").check_record([1, 2])


def test_answers_are_checked_against_the_question(shipped):
    questions = {q.id: q for q in shipped.get("support_reply").questions}
    assert questions["resolves_issue"].check_answer("partially") == "partially"
    for question, value in (
        ("resolves_issue", "maybe"),
        ("tone", 6),
        ("tone", True),
        ("needs_escalation", "yes"),
        ("policy_issue", 3),
    ):
        with pytest.raises(RecordError) as caught:
            questions[question].check_answer(value)
        assert caught.value.field == question


def mutate(path: str, value: object) -> dict:
    raw = support_type()
    node = raw
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("version", KeyError, "version: Field required"),
        ("questions.0.options", ["yes"], "questions[0]: a choice question needs at least two"),
        ("questions.1.options", ["a", "b"], "questions[1]: a rating question takes no options"),
        ("questions.0.type", "slider", "questions[0].type: Input should be 'choice'"),
        ("dataSources.0.type", "image", "dataSources[0].type: Input should be 'text'"),
        ("dataSources.1.id", "ticket_subject", "dataSources: ids repeat: ticket_subject"),
        ("questions.2.id", "rating", "questions: reserved ids (vbs's own fields): rating"),
        ("dataSources.0.id", "Bad Id", "dataSources[0].id: String should match pattern"),
        ("questions.0.helpTxt", "typo", "questions[0].helpTxt: Extra inputs are not permitted"),
        (
            "questions.0.excludeIf",
            ["maybe"],
            "questions[0]: excludeIf: 'maybe' is not",
        ),
        ("questions.3.excludeIf", ["x"], "questions[3]: excludeIf: a text question"),
        (
            "export.iclFormat.userPromptTemplate",
            "{{ ticket_body }} {{ ticket_sbuject }}",
            "export.iclFormat.userPromptTemplate: names ticket_sbuject, which this type does not",
        ),
        (
            "export.iclFormat.userPromptTemplate",
            "{% if ticket_body %}unclosed",
            "export.iclFormat.userPromptTemplate: line 1 of the template: Unexpected end",
        ),
        (
            "export.finetuningFormat.outputFields",
            ["prediction", "sentiment"],
            "export.finetuningFormat.outputFields: unknown fields: sentiment",
        ),
    ],
)
def test_a_bad_type_file_names_the_file_and_the_field(tmp_path, path, value, expected):
    bad = write(tmp_path, mutate(path, value))
    with pytest.raises(ConquestTypeFileError) as caught:
        load_type_file(bad)
    assert str(bad) in str(caught.value)
    assert expected in str(caught.value)


def test_unparseable_files_name_the_line(tmp_path):
    with pytest.raises(ConquestTypeFileError, match=r"support_reply.yaml: line 3: "):
        load_type_file(write(tmp_path, "id: support_reply\nname: x\n  bad: [indent\n"))
    with pytest.raises(ConquestTypeFileError, match=r"support_reply.json: line 1: "):
        load_type_file(write(tmp_path, '{"id": "support_reply",', "support_reply.json"))
    with pytest.raises(ConquestTypeFileError, match="holds one mapping"):
        load_type_file(write(tmp_path, "- a\n- b\n"))
    (tmp_path / "latin1.yaml").write_bytes(b"id: caf\xe9\n")
    with pytest.raises(ConquestTypeFileError, match="cannot be read"):
        load_type_file(tmp_path / "latin1.yaml")


def test_the_id_is_the_files_name(tmp_path):
    with pytest.raises(ConquestTypeFileError, match="differs from the file's name 'support'"):
        load_type_file(write(tmp_path, support_type(), "support.yaml"))


def test_a_json_type_file_loads_the_same(tmp_path):
    path = tmp_path / "support_reply.json"
    path.write_text(json.dumps(support_type()))
    assert load_type_file(path) == load_type_file(SHIPPED / "support_reply.yaml")


def test_one_bad_file_loads_nothing_of_its_folder(tmp_path):
    write(tmp_path, support_type())
    write(tmp_path, {"id": "broken"}, "broken.yaml")
    registry = TaskRegistry()
    with pytest.raises(ConquestTypeFileError, match="broken.yaml"):
        registry.load_folder(tmp_path)
    assert registry.all() == []


def test_templates_run_in_a_sandbox(tmp_path):
    raw = mutate("export.iclFormat.userPromptTemplate", "{{ ticket_body.__class__.__mro__ }}")
    conquest_type = load_type_file(write(tmp_path, raw))
    data = conquest_type.check_record({"ticket_subject": "s", "ticket_body": "b"})
    with pytest.raises(RecordError, match="template failed"):
        conquest_type.prompt(data)


def test_an_integration_registers_a_type_in_code(shipped):
    registry = TaskRegistry()
    raw = support_type()
    raw.update(id="triage", name="Triage")
    registered = registry.register("triage", raw)  # the seed's shape
    assert registry.get("triage") is registered and "triage" in registry
    assert registry.register(ConquestType.model_validate(raw)) == registered  # same: accepted
    changed = ConquestType.model_validate({**raw, "version": "2.0.0"})
    with pytest.raises(ValueError, match="already registered .version 1.0.0."):
        registry.register(changed)
    assert registry.register(changed, replace=True).version == "2.0.0"
    with pytest.raises(ValueError, match="the type's id is 'triage'"):
        registry.register("other", changed)
    with pytest.raises(KeyError, match="unknown conquest type 'nope'; known: triage"):
        registry.get("nope")


def test_the_cli_lists_types_and_refuses_a_bad_file(tmp_path):
    vbs = [sys.executable, "-m", "vbs_cli.main", "conquests", "types"]
    listed = subprocess.run(vbs, capture_output=True, text=True, cwd=ROOT, check=True)
    ids = [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    assert ids == ["candidate_evaluation", "support_reply"]
    bad = write(tmp_path, mutate("questions.0.options", ["only"]))
    refused = subprocess.run([*vbs, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2
    assert "questions[0]: a choice question needs at least two options" in refused.stderr
