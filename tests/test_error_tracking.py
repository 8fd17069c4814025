"""Error tracking with sentry-sdk (``VBS_SENTRY_DSN``), against a local receiver of Sentry's
envelopes (Sentry's ingestion endpoint, ``POST /api/<project>/envelope/``): errors arrive, tagged
with their component, and no secret of the settings is in them, anywhere."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import subprocess
import sys
import threading
import zlib

import httpx
import pytest

from tests.conftest import chat_line, jsonl, wait_for
from tests.test_api_hardening import start_api_server
from vbs_resources.error_tracking import FILTERED, scrub, secret_values
from vbs_resources.settings import load_settings

API_KEY = "sk-vbs-api-key-77aa"
WEBHOOK = "whsec_dGhlLXdlYmhvb2stc2VjcmV0"
DB_PASSWORD = "db-pw-Xy7Qz"
CATALOG = f"postgresql://vbs:{DB_PASSWORD}@127.0.0.1:9/vbs"
SECRETS = (API_KEY, WEBHOOK, DB_PASSWORD)


class SentryReceiver:
    """Records the envelopes posted to it (gzip or deflate bodies, as the SDK sends them)."""

    def __init__(self) -> None:
        self.envelopes: list[bytes] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.envelopes.append(body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/42"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        """The error events of every envelope (one JSON line per header and item)."""
        found = []
        for envelope in self.envelopes:
            lines = envelope.split(b"\n")
            for header, payload in zip(lines[1::2], lines[2::2], strict=False):
                if json.loads(header).get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def raw(self) -> bytes:
        return b"\n".join(self.envelopes)


@pytest.fixture
def receiver():
    server = SentryReceiver()
    yield server
    server.server.shutdown()


def test_the_secret_values_include_database_passwords():
    settings = load_settings(
        {"VBS_API_KEYS": f"{API_KEY},other-key-123", "VBS_CATALOG_URL": CATALOG,
         "VBS_WEBHOOK_SECRET": WEBHOOK, "VBS_SENTRY_DSN": "http://k@127.0.0.1:1/1"}
    )  # fmt: skip
    secrets = secret_values(settings)
    assert {API_KEY, "other-key-123", WEBHOOK, DB_PASSWORD} <= set(secrets)
    event = {"a": [f"x {CATALOG} y", {"k": f"pw={DB_PASSWORD}"}], "n": 5}
    normalized = settings.catalog_url.get_secret_value()  # the URL as vbs opens it
    event["b"] = normalized
    assert scrub(event, secrets) == {
        # The URL as written by hand: its password is gone; as vbs uses it: all of it.
        "a": [f"x {CATALOG.replace(DB_PASSWORD, FILTERED)} y", {"k": f"pw={FILTERED}"}],
        "b": FILTERED,
        "n": 5,
    }


SCRIPT = """
import logging, sys, sentry_sdk
from vbs_resources.settings import load_settings
from vbs_resources.error_tracking import start_error_tracking
settings = load_settings()
assert start_error_tracking(settings, "probe")
log = logging.getLogger("vbs.api")
log.info("a breadcrumb naming %s", settings.catalog_url.get_secret_value())
log.error("the catalog at %s failed", settings.catalog_url.get_secret_value())
def failing(token):
    url = settings.catalog_url.get_secret_value()
    raise RuntimeError(f"cannot reach {url} with {token}")
try:
    failing(sys.argv[1])
except RuntimeError:
    sentry_sdk.capture_exception()
sentry_sdk.flush(10)
"""


def test_errors_and_error_logs_arrive_without_a_secret(receiver, tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VBS_")},
        "VBS_HOME": str(tmp_path),
        "VBS_SENTRY_DSN": receiver.dsn,
        "VBS_CATALOG_URL": CATALOG,
        "VBS_API_KEYS": API_KEY,
        "VBS_WEBHOOK_SECRET": WEBHOOK,
    }
    subprocess.run([sys.executable, "-c", SCRIPT, API_KEY], env=env, check=True, timeout=120)
    events = receiver.events()
    assert len(events) == 2, events
    logged, raised = events
    assert logged["logentry"]["message"] == "the catalog at %s failed"
    assert raised["exception"]["values"][-1]["type"] == "RuntimeError"
    assert all(e["tags"]["component"] == "probe" for e in events)
    assert all(e["release"].startswith("vbs@") for e in events)
    raw = receiver.raw()
    for secret in SECRETS:
        assert secret.encode() not in raw, secret
    assert FILTERED.encode() in raw


def test_the_api_reports_its_errors_without_the_callers_key(receiver, tmp_path):
    broken = tmp_path / "types"
    broken.mkdir()
    (broken / "bad.yaml").write_text("id: [unclosed\n")
    server = start_api_server(
        tmp_path / "vbs",
        VBS_SENTRY_DSN=receiver.dsn,
        VBS_API_KEYS=API_KEY,
        VBS_CONQUEST_TYPES_DIR=str(broken),
    )
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        upload = httpx.post(
            f"{server.base}/v1/files", headers=headers, data={"purpose": "batch"},
            files={"file": ("a.jsonl", jsonl([chat_line("a", "hi")]))},
        ).json()  # fmt: skip
        answer = httpx.post(
            f"{server.base}/v1/batches", headers=headers,
            json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h", "metadata": {"conquest_type": "support_reply"}},
        )  # fmt: skip
        assert answer.status_code == 500
        assert "bad.yaml" not in answer.text  # the client is told nothing of why
        [event] = wait_for(receiver.events, 30, "the API's event")
        assert event["tags"]["component"] == "api"
        assert "conquest types do not load" in event["logentry"]["message"]
        assert API_KEY.encode() not in receiver.raw()
    finally:
        server.stop()
