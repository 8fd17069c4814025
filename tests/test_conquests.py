"""From records to conquests: ``vbs conquests submit`` checks records line by line and sends
their rendered prompts as a batch; the batch's run makes one conquest per result line, and a
plain batch naming a type in its metadata is curated the same way (real vLLM, real Dagster
daemon and API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import openai
import pytest

from tests.conftest import API_KEY, MODEL, chat_line, jsonl, wait_for
from vbs_assets.curation import conquests
from vbs_resources import layout as L
from vbs_resources.curation import ConquestTypes
from vbs_resources.curation.records import check_records

SUPPORT = ConquestTypes().registry().get("support_reply")

RECORDS = [
    {
        "custom_id": "t-mug",
        "ticket_subject": "Broken mug",
        "ticket_body": "My mug arrived in pieces. Can you send a new one?",
        "order_history": [{"id": 12, "item": "mug"}],
    },
    {"ticket_subject": "Password", "ticket_body": "I forgot my password — help! 🙏"},
]


def test_records_are_checked_line_by_line():
    lines = [
        json.dumps(RECORDS[0]).encode(),
        b"",  # blank: skipped
        b'{"ticket_subject": "x", "ticket_body": NaN}',
        b'{"ticket_subject": "x"}',
        b'{"ticket_subject": "x", "ticket_body": "y", "custom_id": "t-mug"}',
        b'{"ticket_subject": "x", "ticket_body": "\\ud800"}',
        json.dumps(RECORDS[1]).encode(),
        b"[1, 2]",
    ]
    good, errors = check_records(SUPPORT, lines)
    assert [(custom_id, line) for custom_id, _, line in good] == [
        ("t-mug", 1),
        ("support_reply-7", 7),
    ]
    assert good[0][1]["order_history"] == [{"id": 12, "item": "mug"}]
    assert "custom_id" not in good[0][1]
    assert [e.split(":")[0] for e in errors] == [
        "line 3",
        "line 4 (field ticket_body)",
        "line 5 (field custom_id)",
        "line 6 (field ticket_body)",
        "line 8",
    ]
    assert "is also line 1" in errors[2]
    assert "a JSON object, not list" in errors[4]


def vbs(platform, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VBS_API_KEY": API_KEY}
    command = [sys.executable, "-m", "vbs_cli.main", *args, "--api-url", platform.api_url]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_bad_records_submit_nothing(platform, tmp_path):
    client = openai.OpenAI(base_url=platform.api_url, api_key=API_KEY)
    before = [b.id for b in client.batches.list(limit=100).data]
    path = tmp_path / "tickets.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"ticket_subject": 3, "ticket_body": "b"}\n')
    refused = vbs(platform, "conquests", "submit", "support_reply", str(path))
    assert refused.returncode == 2
    assert "1 bad record(s); nothing was submitted" in refused.stderr
    assert "line 2 (field ticket_subject): field 'ticket_subject' must be" in refused.stderr
    unknown = vbs(platform, "conquests", "submit", "no_such_type", str(path))
    assert unknown.returncode == 2 and "unknown conquest type 'no_such_type'" in unknown.stderr
    assert [b.id for b in client.batches.list(limit=100).data] == before


def test_the_api_refuses_an_unknown_type_and_a_records_file_that_is_not_one(platform):
    client = openai.OpenAI(base_url=platform.api_url, api_key=API_KEY)
    uploaded = client.files.create(file=("x.jsonl", jsonl([chat_line("a", "hi")])), purpose="batch")
    for metadata, param in (
        ({"conquest_type": "nope"}, "metadata.conquest_type"),
        (
            {"conquest_type": "support_reply", "conquest_records_file": uploaded.id},
            "metadata.conquest_records_file",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata=metadata,
            )
        assert caught.value.body["param"] == param


def test_a_records_file_is_read_strictly_and_tied_to_the_requests_sent(platform):
    """A records file reaches the catalog only as strict JSON of the type, each record the one
    its request was rendered from: anything else is a 400 naming the line, and no batch."""
    client = openai.OpenAI(base_url=platform.api_url, api_key=API_KEY)
    good = {"custom_id": "t-1", "ticket_subject": "Mug", "ticket_body": "It broke."}
    line = {"custom_id": "t-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": SUPPORT.prompt({k: v for k, v in good.items()
                                                                  if k != "custom_id"}),
                     "max_tokens": 4}}  # fmt: skip
    batch_file = client.files.create(file=("typed.jsonl", jsonl([line])), purpose="batch")
    before = [b.id for b in client.batches.list(limit=100).data]
    forged = {**good, "ticket_body": "Another question whose answer it is not."}
    for records, where in (
        (b'{"custom_id": "t-1", "ticket_subject": "a", "ticket_body": NaN}', "line 1"),
        (b'{"custom_id": "t-1", "ticket_subject": "a", "ticket_body": 1e999}', "line 1"),
        (b'{"custom_id": "t-1", "ticket_subject": "\\ud800", "ticket_body": "b"}', "line 1"),
        (b'{"custom_id": "t-1", "ticket_subject": "a", "ticket_body": "b", "x": [' + b"[" * 100
         + b"]" * 100 + b"]}", "line 1"),
        (json.dumps(good).encode() + b"\n" + json.dumps(good).encode(), "line 2 (field custom_id)"),
        (json.dumps({**good, "custom_id": "t-9"}).encode(), "line 1 (field custom_id)"),
        (json.dumps(forged).encode(), "line 1: the prompt this record renders"),
    ):  # fmt: skip
        uploaded = client.files.create(file=("records.jsonl", records), purpose="user_data")
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(
                input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"conquest_type": "support_reply", "conquest_records_file": uploaded.id},
            )  # fmt: skip
        message = caught.value.body["message"]
        assert where in message and caught.value.body["param"] == "metadata.conquest_records_file"
        assert caught.value.body["code"] == "invalid_records", message
    assert [b.id for b in client.batches.list(limit=100).data] == before


def platform_label_studio(platform):
    from vbs_resources.curation.label_studio import LabelStudio

    env = platform.process.env
    return LabelStudio(url=env["VBS_LABEL_STUDIO_URL"], token=env["VBS_LABEL_STUDIO_TOKEN"])


def _tasks_of(ls, catalog, type_id: str, batch_id: str) -> dict[str, dict] | None:
    project = catalog.label_studio.project(type_id, ls.url)
    if project is None:
        return None
    ids = {row["id"] for row in catalog.conquests.of_batch(batch_id)}
    found = {
        t["data"]["conquest_id"]: t["data"]
        for t in ls.tasks(project["project_id"])
        if t["data"]["conquest_id"] in ids
    }
    return found if len(found) == len(ids) else None


def test_submitted_records_become_conquests_once(platform, tmp_path):
    path = tmp_path / "tickets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    submitted = vbs(
        platform, "conquests", "submit", "support_reply", str(path), "--max-tokens", "16", "--wait"
    )
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    catalog = platform.resources["catalog"]
    batch = catalog.batches.get(batch_id)
    assert batch["batch_metadata"]["conquest_type"] == "support_reply"
    wait_for(lambda: len(catalog.conquests.of_batch(batch_id)) == 2, 60, "the conquests")
    rows = {row["custom_id"]: row for row in catalog.conquests.of_batch(batch_id)}
    assert set(rows) == {"t-mug", "support_reply-2"}
    mug = rows["t-mug"]
    assert mug["id"] == L.conquest_id(batch_id, "t-mug")
    assert (mug["type"], mug["type_version"], mug["status"]) == (
        "support_reply",
        "1.0.0",
        "COMPLETED",
    )
    assert mug["model"] == MODEL and mug["prediction"]
    assert mug["input_data"] == {k: v for k, v in RECORDS[0].items() if k != "custom_id"}
    assert mug["prompt"] == SUPPORT.prompt(mug["input_data"])
    assert '"item": "mug"' in mug["prompt"][1]["content"]
    assert rows["support_reply-2"]["input_data"]["ticket_body"].endswith("help! 🙏")

    # In a run of its own after the batch's, each conquest became a task of the type's Label
    # Studio project.
    ls = platform_label_studio(platform)
    tasks = wait_for(lambda: _tasks_of(ls, catalog, "support_reply", batch_id), 120, "the tasks")
    assert sorted(tasks) == sorted(r["id"] for r in rows.values())
    assert tasks[mug["id"]]["prediction"] == mug["prediction"]

    # Materialized again (as from the UI): the same conquests, nothing added or changed.
    result = dg.materialize(
        [conquests],
        partition_key=batch_id,
        resources=platform.resources,
        instance=platform.instance,
    )
    (event,) = result.asset_materializations_for_node(L.CONQUESTS)
    assert event.metadata["conquests"].value == 2 and event.metadata["new"].value == 0
    assert {r["id"]: r for r in catalog.conquests.of_batch(batch_id)} == {
        r["id"]: r for r in rows.values()
    }


def test_a_plain_batch_naming_a_type_is_curated_with_its_errors(platform):
    client = openai.OpenAI(base_url=platform.api_url, api_key=API_KEY)
    lines = [
        chat_line("ok", "Say hello.", max_tokens=8, temperature=0),
        chat_line("bad", "Say hello.", model="no-such-model", max_tokens=8),
    ]
    uploaded = client.files.create(file=("typed.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"conquest_type": "support_reply"},
    )
    catalog = platform.resources["catalog"]
    wait_for(lambda: len(catalog.conquests.of_batch(batch.id)) == 2, 300, "the conquests")
    rows = {row["custom_id"]: row for row in catalog.conquests.of_batch(batch.id)}
    assert rows["ok"]["status"] == "COMPLETED"
    assert rows["ok"]["input_data"] == {"messages": lines[0]["body"]["messages"]}
    assert rows["bad"]["status"] == "FAILED" and rows["bad"]["prediction"] is None
    assert rows["bad"]["error"]["code"] == "model_not_found"
    # A failed conquest has no answer to be gold: refused, and never listed as a VICTORY.
    import httpx

    api = httpx.Client(
        base_url=platform.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    refused = api.post(f"/conquests/{rows['bad']['id']}/annotate", json={"isGoldStar": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "isGoldStar"
    said = api.post(f"/conquests/{rows['bad']['id']}/annotate", json={"feedback": "no answer"})
    assert said.status_code == 200 and said.json()["result"] is None
    victories = api.get("/conquests", params={"result": "VICTORY", "limit": 1000}).json()
    assert rows["bad"]["id"] not in [c["id"] for c in victories["data"]]


def test_the_conquest_api_lists_annotates_and_meets_label_studio_edits(platform):
    import httpx

    client = openai.OpenAI(base_url=platform.api_url, api_key=API_KEY)
    lines = [chat_line(f"api-{n}", f"Say {n}.", max_tokens=4, temperature=0) for n in range(3)]
    uploaded = client.files.create(file=("api.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"conquest_type": "support_reply"},
    )
    catalog = platform.resources["catalog"]
    wait_for(lambda: len(catalog.conquests.of_batch(batch.id)) == 3, 300, "the conquests")
    ids = {r["custom_id"]: r["id"] for r in catalog.conquests.of_batch(batch.id)}
    api = httpx.Client(
        base_url=platform.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )
    assert api.get("/conquests").status_code == 200
    assert httpx.get(f"{platform.api_url}/conquests").status_code == 401  # the Batch API's auth

    good = {"isGoldStar": True, "rating": 5, "feedback": "Spot on",
            "answers": {"resolves_issue": "yes", "needs_escalation": False}}  # fmt: skip
    answered = api.post(f"/conquests/{ids['api-0']}/annotate", json=good)
    assert answered.status_code == 200, answered.text
    body = answered.json()
    assert body["result"] == "VICTORY" and body["annotation"]["isGoldStar"] is True
    assert body["annotation"]["answers"] == {"resolves_issue": "yes", "needs_escalation": False}
    api.post(f"/conquests/{ids['api-1']}/annotate", json={"rating": 2})

    gold = api.get("/conquests", params={"type": "support_reply", "gold": "true"}).json()
    assert ids["api-0"] in [c["id"] for c in gold["data"]]
    assert ids["api-1"] not in [c["id"] for c in gold["data"]]
    low = api.get("/conquests", params={"result": "DEFEAT", "limit": 1000}).json()
    assert ids["api-1"] in [c["id"] for c in low["data"]]
    page = api.get("/conquests", params={"type": "support_reply", "limit": 1}).json()
    assert len(page["data"]) == 1 and page["has_more"] is True
    after = api.get("/conquests", params={"type": "support_reply", "after": page["last_id"]})
    assert page["last_id"] not in [c["id"] for c in after.json()["data"]]
    unknown = api.get("/conquests", params={"after": "cq_nobody"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"
    for body in (b"[1, 2]", b'"rating"', b"null", b"5"):
        odd = api.post(f"/conquests/{ids['api-2']}/annotate", content=body)
        message = odd.json()["error"]["message"]
        assert odd.status_code == 400 and "JSON object" in message and "None" not in message

    # An operator excludes a conquest (CLI), and takes it back (API): both in its history.
    excluded = vbs(platform, "conquests", "exclude", ids["api-0"], "--reason", "leaked a name")
    assert excluded.returncode == 0, excluded.stderr
    assert json.loads(excluded.stdout)["excluded_reason"] == "leaked a name"
    listed = api.get("/conquests", params={"excluded": "true", "limit": 1000}).json()["data"]
    assert [c["id"] for c in listed if c["id"] in ids.values()] == [ids["api-0"]]
    assert api.post(f"/conquests/{ids['api-0']}/exclude", json={"reason": ""}).status_code == 400
    assert api.post("/conquests/cq_nope/exclude", json={"reason": "x"}).status_code == 404
    back = api.post(f"/conquests/{ids['api-0']}/include")
    assert back.status_code == 200 and back.json()["excluded_at"] is None
    history = [(h["field"], h["after"], h["source"]) for h in back.json()["history"]]
    assert history == [("result", "VICTORY", "api"), ("excluded", "yes", "api"),
                       ("excluded", "no", "api")]  # fmt: skip
    missing = vbs(platform, "conquests", "exclude", "cq_nope", "--reason", "x")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    assert "Traceback" not in missing.stderr

    for bad, param in (
        ({"rating": 6}, "rating"),
        ({"isGoldStar": "yes"}, "isGoldStar"),
        ({"answers": {"resolves_issue": "maybe"}}, "answers.resolves_issue"),
        ({"answers": {"nope": 1}}, "answers.nope"),
        ({"stars": 5}, "stars"),
    ):
        refused = api.post(f"/conquests/{ids['api-2']}/annotate", json=bad)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, bad
    assert api.post("/conquests/cq_nope/annotate", json={"rating": 3}).status_code == 404
    assert api.get("/conquests/cq_nope").status_code == 404
    assert api.get(f"/conquests/{ids['api-2']}").json()["annotation"] is None

    # The same conquest edited later in Label Studio: the sensor brings it in, newest wins,
    # the API's edit stays in the history.
    ls = platform_label_studio(platform)
    tasks = wait_for(lambda: _tasks_of(ls, catalog, "support_reply", batch.id), 120, "the tasks")
    project = catalog.label_studio.project("support_reply", ls.url)["project_id"]
    (task,) = [t for t in ls.tasks(project) if t["data"]["conquest_id"] == ids["api-0"]]
    assert tasks[ids["api-0"]]
    ls._call("POST", f"/api/tasks/{task['id']}/annotations", json={"result": [
        {"from_name": "rating", "to_name": "prediction", "type": "rating", "value": {"rating": 3}},
    ]})  # fmt: skip

    def synced():
        one = api.get(f"/conquests/{ids['api-0']}").json()
        return one if one["annotation"]["source"] == "label_studio" else None

    one = wait_for(synced, 90, "the sensor to bring the Label Studio edit in")
    assert one["annotation"]["rating"] == 3 and one["annotation"]["isGoldStar"] is False
    assert one["result"] is None
    assert [h["source"] for h in one["annotation_history"]] == ["api"]
    assert one["annotation_history"][0]["feedback"] == "Spot on"
