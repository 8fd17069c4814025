"""Annotations come back: Label Studio's annotations are pulled into the catalog incrementally,
the conquest API writes to the same place, the newest edit wins and every replaced edit is
kept; annotations that do not fit are skipped and reported (real Label Studio)."""

from __future__ import annotations

import time

import pytest

from vbs_resources import Catalog
from vbs_resources.catalog import UnknownCursor
from vbs_resources.curation import ConquestTypes
from vbs_resources.curation.annotations import AnnotationError, from_label_studio, result_of
from vbs_resources.curation.handler import LabelStudioHandler
from vbs_resources.curation.labeling import task_data
from vbs_resources.curation.lifecycle import ConquestLifecycle, ConquestRefused
from vbs_resources.curation.sync import sync_annotations
from vbs_resources.lake import catalog_frame, gold_query

REGISTRY = ConquestTypes().registry()
SUPPORT = REGISTRY.get("support_reply")


def item(name: str, kind: str, value: dict) -> dict:
    return {"from_name": name, "to_name": "prediction", "type": kind, "value": value}


GOOD = [
    item("is_gold_star", "choices", {"choices": ["gold"]}),
    item("rating", "rating", {"rating": 5}),
    item("feedback", "textarea", {"text": ["Warm ", "and right"]}),
    item("resolves_issue", "choices", {"choices": ["partially"]}),
    item("needs_escalation", "choices", {"choices": ["no"]}),
    item("tone", "rating", {"rating": 4}),
]


def annotation(result, updated_at="2026-11-28T10:00:00.000001Z", id_=7):
    return {"id": id_, "result": result, "updated_at": updated_at, "created_at": updated_at}


def test_a_label_studio_annotation_becomes_the_types_fields():
    values = from_label_studio(SUPPORT, annotation(GOOD))
    assert values["is_gold_star"] is True and values["rating"] == 5
    assert values["feedback"] == "Warm \nand right"
    assert values["answers"] == {
        "resolves_issue": "partially",
        "needs_escalation": False,
        "tone": 4,
    }
    assert (values["source"], values["source_ref"]) == ("label_studio", "7")
    assert result_of(values) == "VICTORY"
    plain = from_label_studio(SUPPORT, annotation([item("rating", "rating", {"rating": 2})]))
    assert plain["is_gold_star"] is False and result_of(plain) == "DEFEAT"


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (item("resolves_issue", "choices", {"choices": ["maybe"]}), "answers.resolves_issue"),
        (item("resolves_issue", "choices", {"choices": ["yes", "no"]}), "answers.resolves_issue"),
        (item("is_gold_star", "choices", {"choices": ["silver"]}), "is_gold_star"),
        (item("rating", "rating", {"rating": 9}), "rating"),
        (item("tone", "rating", {"rating": 0}), "answers.tone"),
        (item("sentiment", "choices", {"choices": ["x"]}), "sentiment"),
        (item("feedback", "textarea", {"text": [3]}), "feedback"),
    ],
)
def test_values_outside_the_type_are_refused_naming_the_field(bad, field):
    with pytest.raises(AnnotationError) as caught:
        from_label_studio(SUPPORT, annotation([bad]))
    assert caught.value.field == field


def conquest_row(n: int, batch_id: str = "batch_annot0000") -> dict:
    return {
        "id": f"cq_annot_{n}", "type": "support_reply", "type_version": "1.0.0",
        "status": "COMPLETED", "result": None,
        "input_data": {"ticket_subject": f"T{n}", "ticket_body": "Help"},
        "prompt": [], "prediction": f"Answer {n}", "error": None, "model": "m",
        "batch_id": batch_id, "custom_id": f"c{n}", "created_at": n, "updated_at": float(n),
    }  # fmt: skip


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}")
    catalog.conquests.add([conquest_row(n) for n in range(3)])
    return catalog


def values(rating: int, edited_at: float, source: str = "api") -> dict:
    return {"is_gold_star": False, "rating": rating, "feedback": None, "improvement_notes": None,
            "answers": {}, "source": source, "source_ref": None, "edited_at": edited_at}  # fmt: skip


def test_the_newest_edit_wins_and_every_other_is_kept(catalog):
    lifecycle = ConquestLifecycle(catalog)
    assert lifecycle.annotate("cq_annot_0", values(3, 100.0), "api") == "new"
    assert lifecycle.annotate("cq_annot_0", values(3, 100.0), "api") == "unchanged"
    assert lifecycle.annotate("cq_annot_0", values(5, 200.0), "api") == "updated"
    # An edit made before the current one (a sync that lagged) is history, not the current.
    assert lifecycle.annotate("cq_annot_0", values(1, 150.0), "label_studio") == "older"
    assert catalog.conquests.annotation_of("cq_annot_0")["rating"] == 5
    assert catalog.conquests.get("cq_annot_0")["result"] == "VICTORY"
    # The result changed once, through the lifecycle, with its history row.
    changes = [(h["field"], h["before"], h["after"], h["source"])
               for h in catalog.conquests.history_of("cq_annot_0")]  # fmt: skip
    assert changes == [("result", None, "VICTORY", "api")]
    assert [h["rating"] for h in catalog.conquests.annotation_history_of("cq_annot_0")] == [3, 1]
    gold = catalog.conquests.list(type_id="support_reply", min_rating=4)
    assert [r["id"] for r in gold] == ["cq_annot_0"]
    assert [r["id"] for r in catalog.conquests.list(limit=1, after="cq_annot_0")] == [
        "cq_annot_1",
        "cq_annot_2",
    ]  # limit + 1 rows: the caller tells has_more
    with pytest.raises(UnknownCursor):
        catalog.conquests.list(after="cq_nobody")


def test_an_excluded_conquest_leaves_every_dataset_and_comes_back_with_its_history(catalog):
    lifecycle = ConquestLifecycle(catalog)
    for n in range(3):
        lifecycle.annotate(f"cq_annot_{n}", {**values(5, 100.0), "is_gold_star": True}, "api")
    gold = lambda: catalog_frame(catalog, gold_query("support_reply", 4))["id"].to_list()  # noqa: E731
    assert sorted(gold()) == ["cq_annot_0", "cq_annot_1", "cq_annot_2"]
    assert lifecycle.exclude("cq_annot_1", "a forged record", "cli")
    assert not lifecycle.exclude("cq_annot_1", "again", "cli")  # already: nothing changes
    assert sorted(gold()) == ["cq_annot_0", "cq_annot_2"]
    assert [r["id"] for r in catalog.conquests.list(excluded=True)] == ["cq_annot_1"]
    with pytest.raises(ConquestRefused):
        lifecycle.exclude("cq_annot_0", "   ", "api")
    with pytest.raises(ConquestRefused) as missing:
        lifecycle.exclude("cq_nobody", "x", "api")
    assert missing.value.status == 404
    assert lifecycle.include("cq_annot_1", "api")
    assert sorted(gold()) == ["cq_annot_0", "cq_annot_1", "cq_annot_2"]
    changes = [(h["field"], h["after"], h["source"], h["note"])
               for h in catalog.conquests.history_of("cq_annot_1")]  # fmt: skip
    assert changes == [("result", "VICTORY", "api", None),
                       ("excluded", "yes", "cli", "a forged record"),
                       ("excluded", "no", "api", None)]  # fmt: skip


def test_sync_pulls_new_and_edited_annotations_and_reports_what_it_skips(label_studio, catalog):
    client = label_studio.client
    export = LabelStudioHandler(client, catalog).export(
        SUPPORT, [catalog.conquests.get(f"cq_annot_{n}") for n in range(3)]
    )
    tasks = {t["data"]["conquest_id"]: t["id"] for t in client.tasks(export.project_id)}
    (stranger,) = client.import_tasks(
        export.project_id, [{"data": task_data(SUPPORT, {**conquest_row(9), "id": "cq_nobody"})}]
    )
    # A task imported by hand naming another conquest's id: not that conquest's task.
    (forger,) = client.import_tasks(
        export.project_id, [{"data": task_data(SUPPORT, catalog.conquests.get("cq_annot_2"))}]
    )

    def annotate(task_id: int, result: list) -> dict:
        return client._call("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})

    first = annotate(tasks["cq_annot_0"], GOOD)
    annotate(tasks["cq_annot_1"], [item("resolves_issue", "choices", {"choices": ["maybe"]})])
    annotate(stranger, [item("rating", "rating", {"rating": 3})])
    annotate(forger, GOOD)

    report, cursor = sync_annotations(client, catalog, REGISTRY, {})
    assert report.counts == {"new": 1}
    assert len(report.problems) == 3
    assert any("cq_nobody" in p for p in report.problems)
    assert any(f"task {forger} " in p and "cq_annot_2" in p for p in report.problems)
    assert catalog.conquests.annotation_of("cq_annot_2") is None
    assert any("(answers.resolves_issue)" in p for p in report.problems)
    current = catalog.conquests.annotation_of("cq_annot_0")
    assert current["is_gold_star"] is True and current["source"] == "label_studio"
    assert catalog.conquests.get("cq_annot_0")["result"] == "VICTORY"
    assert set(cursor) == {str(export.project_id)}

    # Nothing changed: the next sync records nothing new.
    again, cursor = sync_annotations(client, catalog, REGISTRY, cursor)
    assert set(again.counts) <= {"unchanged"}

    # An edit in Label Studio: newest wins, the gold annotation goes to the history.
    time.sleep(1.1)
    client._call(
        "PATCH", f"/api/annotations/{first['id']}",
        json={"result": [item("rating", "rating", {"rating": 2})]},
    )  # fmt: skip
    edited, cursor = sync_annotations(client, catalog, REGISTRY, cursor)
    assert edited.counts.get("updated") == 1
    assert catalog.conquests.annotation_of("cq_annot_0")["rating"] == 2
    assert catalog.conquests.get("cq_annot_0")["result"] == "DEFEAT"
    assert [h["is_gold_star"] for h in catalog.conquests.annotation_history_of("cq_annot_0")] == [
        True
    ]
