"""The Label Studio handler against a real Label Studio: a project per conquest type with a
config generated from the type, every conquest imported once (also after an import cut short),
and a new type version's config applied without losing annotations."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET

import pytest

from vbs_resources import Catalog
from vbs_resources.curation import ConquestType, ConquestTypes
from vbs_resources.curation.handler import LabelStudioHandler
from vbs_resources.curation.labeling import labeling_config, task_data

SHIPPED = ConquestTypes().registry()


def a_type(type_id: str, **changes) -> ConquestType:
    raw = SHIPPED.get("support_reply").model_dump(by_alias=True)
    return ConquestType.model_validate({**raw, "id": type_id, **changes})


def conquest(n: int, type_id: str) -> dict:
    return {
        "id": f"cq_{type_id}_{n}",
        "type": type_id,
        "input_data": {
            "ticket_subject": f"Ticket {n}",
            "ticket_body": "Ça ne marche pas 😞 <b>bold?</b>",
            "order_history": [{"id": n}],
        },
        "prediction": f"Answer {n}",
        "error": None,
    }


@pytest.fixture
def catalog(tmp_path):
    return Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}")


@pytest.mark.parametrize("type_id", ["support_reply", "candidate_evaluation"])
def test_each_shipped_types_config_is_accepted_with_the_fixed_control_names(
    label_studio, catalog, type_id
):
    conquest_type = SHIPPED.get(type_id)
    config = ET.fromstring(labeling_config(conquest_type))
    controls = {e.get("name"): e for e in config.iter() if e.get("toName") == "prediction"}
    assert [c.get("value") for c in controls["is_gold_star"]] == ["gold"]
    assert controls["is_gold_star"].tag == "Choices"
    assert (controls["rating"].tag, controls["rating"].get("maxRating")) == ("Rating", "5")
    assert controls["feedback"].tag == controls["improvement_notes"].tag == "TextArea"
    assert {q.id for q in conquest_type.questions} <= set(controls)
    (prediction,) = [e for e in config.iter("Text") if e.get("name") == "prediction"]
    assert prediction.get("value") == "$prediction"
    # Label Studio itself accepts it (it validates every config it is given).
    export = LabelStudioHandler(label_studio.client, catalog).export(conquest_type, [])
    project = label_studio.client.get_project(export.project_id)
    assert project["title"] == f"{conquest_type.name} ({type_id})"


def test_conquests_are_imported_once_even_after_an_import_cut_short(label_studio, catalog):
    conquest_type = a_type("ls_once")
    handler = LabelStudioHandler(label_studio.client, catalog)
    first = handler.export(conquest_type, [conquest(n, "ls_once") for n in range(3)])
    assert (first.project_created, first.imported, first.already) == (True, 3, 0)
    tasks = label_studio.client.tasks(first.project_id)
    assert sorted(t["data"]["conquest_id"] for t in tasks) == [f"cq_ls_once_{n}" for n in range(3)]
    assert tasks[0]["data"]["input_order_history"].startswith("[\n  {")
    assert tasks[0]["data"]["prediction"].startswith("Answer ")

    again = handler.export(conquest_type, [conquest(n, "ls_once") for n in range(5)])
    assert (again.project_id, again.imported, again.already) == (first.project_id, 2, 3)

    # A run killed after Label Studio made the tasks but before the catalog recorded them.
    cut = [conquest(n, "ls_once") for n in (5, 6)]
    catalog.label_studio.start_tasks(handler.url, first.project_id, [c["id"] for c in cut])
    label_studio.client.import_tasks(
        first.project_id, [{"data": task_data(conquest_type, c)} for c in cut]
    )
    retried = handler.export(conquest_type, [conquest(n, "ls_once") for n in range(8)])
    assert (retried.recovered, retried.imported, retried.already) == (2, 1, 5)
    ids = [t["data"]["conquest_id"] for t in label_studio.client.tasks(first.project_id)]
    assert sorted(ids) == [f"cq_ls_once_{n}" for n in range(8)]  # each exactly once


def test_a_new_type_version_updates_the_config_and_keeps_annotations(label_studio, catalog):
    handler = LabelStudioHandler(label_studio.client, catalog)
    first = handler.export(a_type("ls_versions"), [conquest(1, "ls_versions")])
    (task,) = label_studio.client.tasks(first.project_id)
    label_studio.client._call(
        "POST",
        f"/api/tasks/{task['id']}/annotations",
        json={
            "result": [
                {"from_name": "is_gold_star", "to_name": "prediction", "type": "choices",
                 "value": {"choices": ["gold"]}},
            ]
        },
    )  # fmt: skip
    raw = SHIPPED.get("support_reply").model_dump(by_alias=True)
    questions = raw["questions"] + [
        {"id": "language", "text": "Which language?", "type": "choice", "options": ["en", "fr"]}
    ]
    newer = a_type("ls_versions", version="1.1.0", questions=questions)
    second = handler.export(newer, [conquest(1, "ls_versions"), conquest(2, "ls_versions")])
    assert second.project_id == first.project_id and second.config_updated
    assert (second.imported, second.already) == (1, 1)
    project = label_studio.client.get_project(first.project_id)
    assert 'name="language"' in project["label_config"]
    (annotated,) = [t for t in label_studio.client.tasks(first.project_id) if t["id"] == task["id"]]
    assert annotated["annotations"][0]["result"][0]["value"] == {"choices": ["gold"]}


def test_a_project_deleted_in_label_studio_is_made_again(label_studio, catalog):
    handler = LabelStudioHandler(label_studio.client, catalog)
    first = handler.export(a_type("ls_deleted"), [conquest(1, "ls_deleted")])
    label_studio.client._call("DELETE", f"/api/projects/{first.project_id}")
    time.sleep(0.5)
    second = handler.export(a_type("ls_deleted"), [conquest(1, "ls_deleted")])
    assert second.project_id != first.project_id and second.project_created
    assert second.imported == 1


def test_vbs_serve_starts_label_studio_on_loopback_with_its_secrets_in_files(tmp_path):
    import stat

    from tests.conftest import settings_for
    from vbs_cli.serve import serve_commands

    settings = settings_for(tmp_path / "vbs", VBS_WEBHOOK_SECRET="whsec_dGVzdA==")
    commands = {name: (command, env) for name, command, env in serve_commands(settings)}
    (command, env) = commands["label-studio"]
    assert command[1:] == [
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        "8080",
    ]
    home = settings.label_studio_home
    assert env["LABEL_STUDIO_BASE_DATA_DIR"] == str(home / "data")
    assert env["LABEL_STUDIO_USER_TOKEN"] == (home / "token").read_text().strip()
    assert env["LABEL_STUDIO_PASSWORD"] == (home / "password").read_text().strip()
    for secret in ("token", "password"):
        assert stat.S_IMODE((home / secret).stat().st_mode) == 0o600
    assert not any(key.startswith("VBS_") for key in env)  # vbs's own secrets stay with vbs
    assert env["LABEL_STUDIO_USER_TOKEN"] not in " ".join(command)
    # Made once: a restart keeps the same token (integrations hold on to it).
    again = next(env for name, _, env in serve_commands(settings) if name == "label-studio")
    assert again["LABEL_STUDIO_USER_TOKEN"] == env["LABEL_STUDIO_USER_TOKEN"]
    # Another Label Studio named, or starting turned off: none is started.
    for extra in (
        {"VBS_LABEL_STUDIO_URL": "http://127.0.0.1:9999"},
        {"VBS_LABEL_STUDIO_START": "false"},
    ):
        other = settings_for(tmp_path / "vbs", **extra)
        assert "label-studio" not in [name for name, _, _ in serve_commands(other)]


def test_label_studio_down_fails_the_step_for_a_retry_and_keeps_the_conquests(tmp_path):
    """The batch and its conquests are done; the export step says Label Studio is unavailable
    and asks Dagster for a retry (its retry policy waits and tries again)."""
    import dagster as dg

    from tests.conftest import free_port, resources_for
    from vbs_assets.curation import label_studio_tasks
    from vbs_resources.curation.label_studio import LabelStudio

    resources = resources_for(tmp_path / "vbs")
    catalog = resources["catalog"]
    row = {**conquest(1, "support_reply"), "type_version": "1.0.0", "status": "COMPLETED"}
    row.update(result=None, prompt=[], model="m", batch_id="batch_down00000", custom_id="c1")
    row.update(created_at=1, updated_at=1.0)
    catalog.conquests.add([row])
    down = LabelStudio(url=f"http://127.0.0.1:{free_port()}", token="t", timeout_s=2)
    context = dg.build_asset_context(partition_key="batch_down00000")
    with pytest.raises(dg.Failure) as caught:
        label_studio_tasks(
            context, catalog=catalog, conquest_types=resources["conquest_types"], label_studio=down
        )
    assert caught.value.allow_retries
    assert caught.value.description.startswith("Label Studio is unavailable")
    assert "the batch and its conquests are kept" in caught.value.description.lower()
    assert len(catalog.conquests.of_batch("batch_down00000")) == 1
    policy = label_studio_tasks.op.retry_policy
    assert policy.max_retries >= 3 and policy.delay >= 10

    # What a retry cannot change (here a bug's UnicodeEncodeError) fails at once, unretried:
    # it once held the run for 20 minutes of retries.
    class BrokenLabelStudio(LabelStudio):
        """A test double: a Label Studio client whose every call raises a non-transient error."""

        def _call(self, method, path, **kwargs):
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    broken = BrokenLabelStudio(url="http://127.0.0.1:9", token="t", timeout_s=2)
    with pytest.raises(dg.Failure) as caught:
        label_studio_tasks(
            context,
            catalog=catalog,
            conquest_types=resources["conquest_types"],
            label_studio=broken,
        )
    assert not caught.value.allow_retries
    assert "UnicodeEncodeError" in caught.value.description


def test_markup_in_a_type_stays_text_in_its_config(label_studio, catalog):
    questions = [
        {"id": "odd", "text": 'Is <b>this</b> "odd" & $weird?', "type": "choice",
         "options": ['a"b', "<x/>", "$prediction"], "helpText": "</View><View>"},
    ]  # fmt: skip
    hostile = a_type("ls_markup", name='Tickets <"&> $x', questions=questions)
    config = ET.fromstring(labeling_config(hostile))  # well-formed XML
    (odd,) = [e for e in config.iter("Choices") if e.get("name") == "odd"]
    assert [c.get("value") for c in odd] == ['a"b', "<x/>", "$prediction"]
    assert config.tag == "View" and len(config.findall("View")) == 0
    export = LabelStudioHandler(label_studio.client, catalog).export(
        hostile, [conquest(1, "ls_markup")]
    )
    assert export.imported == 1
    assert (
        label_studio.client.get_project(export.project_id)["title"] == 'Tickets <"&> $x (ls_markup)'
    )
