"""Limits per API key (the seed's ENABLE_RATE_LIMITING and MAX_CONCURRENT_BATCHES): requests
per second, and batches in flight. A refusal is 429 with Retry-After, as OpenAI answers, and
the official client waits and retries on it. Against real `python -m vbs_api.server` processes
with no Dagster behind them (the batches stay unfinished until the test ends them)."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import chat_line, jsonl
from tests.test_api_hardening import start_api_server
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.settings import SettingsError, load_settings
from vbs_resources.wire import BatchErrorEntry

KEYS = ("key-alpha-0123456789", "key-beta-0123456789", "key-gamma-0123456789")
# 5 requests per 3 s: a window long enough that a loaded machine (the suite's other worker
# busy) still sends a test's six requests inside one; 5 per second flaked there.
WINDOW_S = 3


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    home = tmp_path_factory.mktemp("rate") / "vbs"
    server = start_api_server(
        home, VBS_API_KEYS=",".join(KEYS), VBS_RATE_LIMIT=f"5 per {WINDOW_S} seconds"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def in_flight(tmp_path_factory):
    home = tmp_path_factory.mktemp("flight") / "vbs"
    server = start_api_server(home, VBS_API_KEYS=",".join(KEYS), VBS_MAX_BATCHES_IN_FLIGHT="2")
    yield server
    server.stop()


def get(server, key: str | None, path: str = "/v1/models") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{server.base}{path}", headers=headers)


def test_each_key_has_its_own_budget_and_a_refusal_says_when_to_come_back(limited):
    time.sleep(WINDOW_S + 0.1)  # a window of our own
    answers = [get(limited, KEYS[0]) for _ in range(6)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    refused = answers[5]
    assert refused.status_code == 429
    assert refused.json()["error"] == {
        "message": refused.json()["error"]["message"],
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert f"5 per {WINDOW_S} second" in refused.json()["error"]["message"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= WINDOW_S + 1
    # Another key, unauthenticated callers, and the open paths are not charged for it.
    assert get(limited, KEYS[1]).status_code == 200
    for _ in range(10):
        assert get(limited, "not-a-key").status_code == 401
        assert get(limited, None, "/health").status_code == 200
    time.sleep(wait)
    assert get(limited, KEYS[0]).status_code == 200


def test_the_official_client_waits_and_retries(limited):
    time.sleep(WINDOW_S + 0.1)
    client = OpenAI(base_url=f"{limited.base}/v1", api_key=KEYS[2], max_retries=3)
    started = time.monotonic()
    for _ in range(8):
        client.models.list()
    assert time.monotonic() - started >= 0.9  # it waited for the window to move
    hasty = OpenAI(base_url=f"{limited.base}/v1", api_key=KEYS[2], max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(6):
            hasty.models.list()
    assert info.value.code == "rate_limit_exceeded"


def test_concurrent_requests_never_pass_the_limit_together(limited):
    time.sleep(WINDOW_S + 0.1)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: get(limited, KEYS[1]).status_code, range(16)))
    assert codes.count(200) == 5 and codes.count(429) == 11, codes


def _create(server, key: str, file_id: str) -> httpx.Response:
    return httpx.post(
        f"{server.base}/v1/batches",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )


def test_batches_in_flight_are_limited_per_key_and_counted_exactly(in_flight):
    upload = httpx.post(
        f"{in_flight.base}/v1/files",
        headers={"Authorization": f"Bearer {KEYS[0]}"},
        files={"file": ("a.jsonl", jsonl([chat_line("a", "hi")]))},
        data={"purpose": "batch"},
    ).json()
    first = [_create(in_flight, KEYS[0], upload["id"]) for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    before = in_flight.catalog.batches.list(limit=1000)
    over = _create(in_flight, KEYS[0], upload["id"])
    assert over.status_code == 429 and over.headers["retry-after"] == "30"
    assert over.json()["error"]["code"] == "batch_limit_exceeded"
    assert in_flight.catalog.batches.list(limit=1000) == before  # nothing stored
    # Twelve at once from another key: exactly two are created.
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        racing = list(pool.map(lambda _: _create(in_flight, KEYS[1], upload["id"]), range(12)))
    assert sorted(r.status_code for r in racing) == [200] * 2 + [429] * 10
    # One of the first key's batches ends: it may create one more, and only one.
    ended = first[0].json()["id"]
    BatchLifecycle(in_flight.catalog).fail(
        ended, [BatchErrorEntry(code="test", message="ended by the test")]
    )
    assert _create(in_flight, KEYS[0], upload["id"]).status_code == 200
    assert _create(in_flight, KEYS[0], upload["id"]).status_code == 429
    # A key's hash is recorded, never the key.
    rows = in_flight.catalog.batches.list(limit=1000)
    assert all(r["created_by"] and r["created_by"].startswith("key-") for r in rows)
    assert not any(key in str(rows) for key in KEYS)
    assert len({r["created_by"] for r in rows}) == 2


@pytest.mark.parametrize("value", ["lots", "5/fortnight", "0/second", "-1/second", "5/second;x"])
def test_a_rate_that_means_nothing_is_refused_naming_the_setting(value):
    with pytest.raises(SettingsError, match=r"^VBS_RATE_LIMIT: "):
        load_settings({"VBS_RATE_LIMIT": value})
    with pytest.raises(SettingsError, match=r"^VBS_MAX_BATCHES_IN_FLIGHT: "):
        load_settings({"VBS_MAX_BATCHES_IN_FLIGHT": "0"})
