"""The adversarial corpus (tests/corpus.py) through the public surfaces of a running platform:
inbox drops (one batch per error code and per file-level oddity) and the Batch API (one file
holding every class). For every bad input class: the batch ends within a bound, its error
names the line and the field, the API never answers 5xx, and nothing else in the catalog
changes. Lines that only look hostile run to completion."""

import json
import re
import time

import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, wait_for
from tests.corpus import (
    BAD_LINES,
    HOSTILE_CURSORS,
    HOSTILE_VALUES,
    ODD_BUT_VALID,
    ODD_ERRORS,
    bad_file,
    body_with,
    param_matches,
)

pytestmark = pytest.mark.slow

ENDED = {"completed", "failed", "expired", "cancelled"}
BOUND_SECONDS = 300  # every batch of the corpus ends within this, all queued at once


@pytest.fixture(scope="module")
def client(platform):
    return OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)


def catalog_state(platform):
    catalog = platform.resources["catalog"]
    batches = {
        r["id"]: {k: v for k, v in r.items() if k not in ("updated_at", "run_id")}
        for r in catalog.batches.list(limit=10_000)
        if r["status"] in ENDED
    }
    files = {f["id"]: f for f in catalog.files.list(limit=10_000)}
    return batches, files


def assert_named(row, bad):
    assert row["status"] == "failed", (bad.name, row["status"])
    [error] = row["errors"]
    assert (error["code"], error["line"]) == (bad.code, 2), (bad.name, error)
    assert param_matches(bad.param, error["param"]), (bad.name, error)
    assert len(error["message"]) < 400


# Through the inbox, one batch (one run) each: a class of every error code, and the oddities
# that meet the inbox's own reading of the file (its hash, its move) before validation. Every
# class goes through the same validation in the API test below, all in one file.
INBOX_CLASSES = (
    "bom-mid-file",
    "nul-bytes",
    "truncated",
    "deep-nesting-100k",
    "huge-unknown-field",
)
DROPPED = [
    bad
    for n, bad in enumerate(BAD_LINES)
    if bad.name in INBOX_CLASSES or bad.code not in {b.code for b in BAD_LINES[:n]}
]


def test_bad_lines_dropped_in_the_inbox_fail_their_batch_naming_them(platform):
    before_batches, before_files = catalog_state(platform)
    started = time.monotonic()
    assert {bad.code for bad in DROPPED} == {bad.code for bad in BAD_LINES}
    for bad in DROPPED:
        platform.drop(f"corpus-{bad.name}.jsonl", bad_file(bad))
    ids = {bad.name: platform.wait_batch(f"corpus-{bad.name}.jsonl", timeout=60) for bad in DROPPED}
    rows = {
        name: platform.wait_status(batch_id, ENDED, timeout=BOUND_SECONDS)
        for name, batch_id in ids.items()
    }
    elapsed = time.monotonic() - started
    for bad in DROPPED:
        assert_named(rows[bad.name], bad)
    after_batches, after_files = catalog_state(platform)
    assert {k: v for k, v in after_batches.items() if k in before_batches} == before_batches
    # Each drop's file is registered as its batch's input; nothing else changed.
    inputs = {r["input_file_id"] for r in rows.values()}
    assert {k: v for k, v in after_files.items() if k not in inputs} == before_files
    print(f"{len(DROPPED)} hostile drops ended in {elapsed:.0f}s")


def test_a_file_of_every_bad_line_sent_through_the_api_names_each(platform, client):
    """All classes in one file uploaded through the API (the surfaces differ before
    validation, not in it): one failed batch whose errors name every line and field."""
    before_batches, before_files = catalog_state(platform)
    data = b"".join(bad.raw + b"\n" for bad in BAD_LINES)
    file = client.files.create(file=("corpus.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(
        lambda: (b := client.batches.retrieve(batch.id)).status in ENDED and b,  # 5xx raises
        BOUND_SECONDS,
        "the corpus batch to end",
    )
    assert done.status == "failed"
    errors = {e.line: e for e in done.errors.data}
    assert len(errors) == len(BAD_LINES)
    for line, bad in enumerate(BAD_LINES, start=1):
        error = errors[line]
        assert error.code == bad.code, (bad.name, error)
        assert param_matches(bad.param, error.param), (bad.name, error)
    assert client.batches.list(limit=100).data  # listing hostile rows still works
    after_batches, after_files = catalog_state(platform)
    assert {k: v for k, v in after_batches.items() if k in before_batches} == before_batches
    assert {k: v for k, v in after_files.items() if k in before_files} == before_files


def test_odd_but_valid_lines_run_to_completion(platform, client):
    data = b"\n".join(ODD_BUT_VALID) + b"\n"
    file = client.files.create(file=("odd.jsonl", data), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = wait_for(
        lambda: (b := client.batches.retrieve(batch.id)).status in ENDED and b, BOUND_SECONDS, "it"
    )
    assert done.status == "completed", done
    assert done.request_counts.total == len(ODD_BUT_VALID)
    errors = {
        (line := json.loads(x))["custom_id"]: line["response"]["body"]["error"]
        for x in client.files.content(done.error_file_id).text.splitlines()
    }
    assert {k: e["code"] for k, e in errors.items()} == {k: c for k, (c, _) in ODD_ERRORS.items()}
    for custom_id, (_, param) in ODD_ERRORS.items():
        if param is not None:
            assert errors[custom_id]["param"] == param, (custom_id, errors[custom_id])
        # No internals: a class pydantic tried, a union member, a server's command-line flag.
        message = errors[custom_id]["message"]
        assert not re.search(r"[a-z][A-Z]\w*Param|\.str\b|(?<![\w-])--[a-z]", message), message
    output = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert "unicode-custom-id-\u00e9\u4e2d" in {line["custom_id"] for line in output}


# ---- every other surface that reads JSON ------------------------------------------------------

SURFACES = (
    ("POST", "/fine_tuning/jobs",
     '{"model": "SmolLM2-135M-Instruct", "training_file": "file-x0000000", "metadata": {"k": $V}}'),
    ("POST", "/fine_tuning/jobs",
     '{"model": "SmolLM2-135M-Instruct", "training_file": "file-x0000000", '
     '"hyperparameters": {"n_epochs": $V}}'),
    ("POST", "/fine_tuning/jobs", '{"model": $V, "training_file": "file-x0000000"}'),
    ("POST", "/fine_tuning/jobs/ftjob-x0000000/deploy", '{"force": $V}'),
    ("POST", "/conquests/cq_x/annotate", '{"feedback": $V}'),
    ("POST", "/conquests/cq_x/annotate", '{"rating": $V}'),
    ("POST", "/conquests/cq_x/annotate", '{"answers": {"resolves_issue": $V}}'),
    ("POST", "/conquests/cq_x/exclude", '{"reason": $V}'),
    ("POST", "/batches", '{"input_file_id": "file-x0000000", "endpoint": "/v1/chat/completions", '
                         '"completion_window": "24h", "metadata": {"k": $V}}'),
)  # fmt: skip
LISTS = ("/batches", "/files", "/conquests", "/datasets", "/fine_tuning/jobs")


def stored(platform) -> dict[str, int]:
    catalog = platform.resources["catalog"]
    return {
        "jobs": len(catalog.fine_tuning.list(limit=10_000)),
        "batches": len(catalog.batches.list(limit=10_000)),
        "conquests": len(catalog.conquests.list(limit=100_000)),
        "datasets": len(catalog.datasets.list(limit=10_000)),
    }


def test_every_json_body_refuses_the_hostile_values_and_stores_nothing(platform, client):
    """Every JSON body of the API (fine-tuning, deploy, annotate, exclude, batches) with each
    hostile value where a value goes: 400 in OpenAI's shape, nothing stored, every list still
    readable."""
    import httpx

    api = httpx.Client(base_url=platform.api_url, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    before = stored(platform)
    answered = []
    for method, path, template in SURFACES:
        for name, value in HOSTILE_VALUES.items():
            got = api.request(method, path, content=body_with(template, value))
            answered.append((path, name, got.status_code))
            assert got.status_code == 400, (path, template, name, got.text[:300])
            assert got.json()["error"]["type"] == "invalid_request_error"
            assert len(got.json()["error"]["message"]) < 1200, (path, name)
    assert stored(platform) == before
    for path in LISTS:
        assert api.get(path).status_code == 200, path
    # A cursor that names nothing: 400 naming after, on every list and on a job's events.
    job = platform.resources["catalog"].fine_tuning.list(limit=1)
    events = [f"/fine_tuning/jobs/{job[0]['id']}/events"] if job else []
    for path in (*LISTS, *events):
        for cursor in HOSTILE_CURSORS:
            got = api.get(path, params={"after": cursor})
            assert got.status_code == 400, (path, cursor, got.text[:200])
            assert got.json()["error"]["param"] == "after", (path, cursor)
    raw = api.get("/conquests?after=%ED%A0%80")  # a lone surrogate, as UTF-8 bytes
    assert raw.status_code == 400, raw.text[:200]
    print(f"{len(answered)} hostile bodies answered 400")


def test_a_records_file_of_hostile_values_is_refused_by_line(platform, client):
    line = {"custom_id": "t-1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    batch_file = client.files.create(file=("typed.jsonl", json.dumps(line).encode()),
                                     purpose="batch")  # fmt: skip
    before = stored(platform)
    template = '{"custom_id": "t-1", "ticket_subject": $V, "ticket_body": "b"}'
    for name, value in HOSTILE_VALUES.items():
        records = b'{"custom_id": "t-0", "ticket_subject": "a", "ticket_body": "b"}\n'
        records += body_with(template, value) + b"\n"
        uploaded = client.files.create(file=("records.jsonl", records), purpose="user_data")
        with pytest.raises(openai.BadRequestError) as caught:
            client.batches.create(
                input_file_id=batch_file.id, endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"conquest_type": "support_reply", "conquest_records_file": uploaded.id},
            )  # fmt: skip
        assert "line 2" in caught.value.body["message"], (name, caught.value.body)
    assert stored(platform) == before


def test_adapter_configs_of_hostile_values_are_refused_at_registration(tmp_path, model_dir):
    from tests.adapters import make_adapter
    from tests.conftest import resources_for
    from vbs_resources.registry import ModelRegistry, RegistryError

    resources = resources_for(tmp_path / "vbs", model_dir)
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(resources["engine"].configured_models())
    folder = make_adapter(tmp_path / "hostile", model_dir)
    config = (folder / "adapter_config.json").read_text()
    for field in ('"r": 8', '"lora_alpha": 8', '"peft_type": "LORA"'):
        for name, value in HOSTILE_VALUES.items():
            key = field.split(":")[0]
            (folder / "adapter_config.json").write_bytes(
                config.replace(field, f"{key}: $V").encode().replace(b"$V", value)
            )
            with pytest.raises(RegistryError) as caught:
                registry.add_adapter(f"hostile-{name}", str(folder))
            assert caught.value.field in ("adapter_config.json", "r", "peft_type"), (field, name)
    assert [m["name"] for m in registry.list() if m["kind"] == "adapter"] == []
