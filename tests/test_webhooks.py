"""Webhook deliveries from the event outbox, outside every run: Standard Webhooks signatures the
official client verifies, rounds retried with backoff for hours (surviving a receiver that is down
for ten minutes), no redirects, a bounded pool of threads in the API, runs that never wait for a
receiver, and the events listed and sent again through the API."""

import json
import threading
import time

import dagster as dg
import openai
import pytest
from openai import OpenAI

from tests.conftest import WEBHOOK_SECRET, WebhookReceiver
from vbs_resources import Catalog, Webhooks
from vbs_resources.lifecycle import BatchLifecycle

unwrap = OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET).webhooks.unwrap


@pytest.fixture
def catalog(catalog_url):
    catalog = Catalog(url=catalog_url)
    yield catalog
    catalog.engine.dispose()


def event_for(catalog, batch_id, status="completed", webhooks=None):
    """A batch that reached ``status``, through a run's lifecycle (which sends nothing itself:
    with receivers the event waits in the outbox; without, it is done at once)."""
    lifecycle = BatchLifecycle(catalog, webhooks or Webhooks(urls=["http://127.0.0.1:9/x"]))
    lifecycle.create(batch_id, source="api", input_file_id="file-x")
    lifecycle.start(batch_id)
    if status == "failed":
        lifecycle.fail(batch_id, [])
    else:
        lifecycle.finish(batch_id, status)
    [event] = catalog.events.of_subject(batch_id)
    return event["id"]


class SwitchableReceiver(WebhookReceiver):
    """A receiver that answers 503 while ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        receiver = self

        class Handler(self.server.RequestHandlerClass):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(503 if receiver.down else 200)
                self.end_headers()

        self.server.RequestHandlerClass = Handler


def test_signed_event_verifies_with_the_openai_client_after_failed_rounds(catalog):
    event_id = event_for(catalog, "batch_abc12345")
    receiver = WebhookReceiver(fail_first=2)
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET, first_backoff_seconds=5)
        now = time.time()
        assert not hooks.deliver(catalog, event_id, now=now)
        row = catalog.events.get(event_id)
        assert row["attempts"] == 1 and row["next_attempt_at"] == pytest.approx(now + 5)
        assert catalog.events.due(now + 1) == []  # not before its backoff
        assert hooks.deliver_due(catalog, now=now + 5) == (0, 1)
        assert catalog.events.get(event_id)["next_attempt_at"] == pytest.approx(now + 15)
        assert hooks.deliver_due(catalog, now=now + 15) == (1, 0)
    finally:
        receiver.close()
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    event = unwrap(body, headers)
    assert (event.type, event.data.id, event.id) == ("batch.completed", "batch_abc12345", event_id)
    deliveries = catalog.events.deliveries_of("batch_abc12345")
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(1, 500), (2, 500), (3, 200)]
    assert all(WEBHOOK_SECRET not in json.dumps(d) for d in deliveries)
    assert catalog.events.get(event_id)["delivered_at"] is not None
    assert not hooks.deliver(catalog, event_id)  # delivered: never again


def test_tampered_body_fails_verification(catalog):
    event_id = event_for(catalog, "batch_x1234567", "failed")
    receiver = WebhookReceiver()
    try:
        Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET).deliver(catalog, event_id)
    finally:
        receiver.close()
    headers, body = receiver.received[0]
    assert unwrap(body, headers).type == "batch.failed"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(body.replace(b"failed", b"completed"), headers)


def test_a_secret_given_as_an_environment_variable_is_resolved(catalog, monkeypatch):
    """Built outside Dagster with ``dg.EnvVar`` (as the code location builds it), the resource
    signs with the variable's value, never with its name."""
    monkeypatch.setenv("VBS_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
    event_id = event_for(catalog, "batch_env12345")
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url], secret=dg.EnvVar("VBS_TEST_WEBHOOK_SECRET"))
        hooks.deliver(catalog, event_id)
    finally:
        receiver.close()
    headers, body = receiver.received[0]
    assert unwrap(body, headers).data.id == "batch_env12345"


def test_an_event_survives_a_receiver_down_for_ten_minutes(catalog):
    """Before, an event was given up after five tries over 15 s (one receiver lost 60 events).
    Rounds now back off (1, 2, 4, ... s, capped) and go on for the retry window; the clock is
    moved as the delivery sensor's ticks would see it."""
    event_id = event_for(catalog, "batch_down12345")
    receiver = SwitchableReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET, max_backoff_seconds=120)
        start = time.time()
        now, rounds = start, 0
        while now - start < 600:
            delivered, failed = hooks.deliver_due(catalog, now=now)
            rounds += failed
            assert delivered == 0
            now += 5  # a tick every five seconds
        row = catalog.events.get(event_id)
        assert row["gave_up_at"] is None and row["delivered_at"] is None
        assert 5 < rounds < 20 and row["last_error"].endswith("HTTP 503"), (rounds, row)
        receiver.down = False
        while catalog.events.get(event_id)["delivered_at"] is None:
            hooks.deliver_due(catalog, now=now)
            now += 5
            assert now - start < 900, "not delivered within 5 minutes of the receiver's return"
    finally:
        receiver.close()
    assert [unwrap(b, h).id for h, b in receiver.received[-1:]] == [event_id]


def test_an_event_is_given_up_once_its_retry_window_has_passed(catalog):
    event_id = event_for(catalog, "batch_y1234567", "expired")
    hooks = Webhooks(urls=["http://127.0.0.1:9/none"], retry_hours=1, timeout_seconds=1)
    start = time.time()
    assert not hooks.deliver(catalog, event_id, now=start)
    assert catalog.events.get(event_id)["gave_up_at"] is None
    assert hooks.deliver_due(catalog, now=start + 3601) == (0, 1)
    row = catalog.events.get(event_id)
    assert row["gave_up_at"] is not None and "ConnectError" in row["last_error"]
    assert hooks.deliver_due(catalog, now=start + 7200) == (0, 0)  # given up: not tried again
    # Sent again by hand: due now, with a new window.
    assert catalog.events.redeliver(event_id)["gave_up_at"] is None
    assert [e["id"] for e in catalog.events.due(time.time())] == [event_id]


def test_redirects_are_not_followed(catalog):
    """A receiver answering 307 does not get the signed event resent elsewhere."""
    import http.server

    elsewhere = WebhookReceiver()

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(307)
            self.send_header("location", elsewhere.url)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    event_id = event_for(catalog, "batch_r1234567")
    try:
        hooks = Webhooks(urls=[f"http://127.0.0.1:{server.server_address[1]}/"])
        assert not hooks.deliver(catalog, event_id)
    finally:
        server.shutdown()
        elsewhere.close()
    assert elsewhere.received == []
    errors = [d["error"] for d in catalog.events.deliveries_of("batch_r1234567")]
    assert errors and all("redirect" in e for e in errors)


def test_a_delivery_cut_short_is_finished_later_once(catalog):
    """A process that claimed an event and died: once its claim runs out, the delivery sensor
    delivers it, once, and a second pass sends nothing."""
    event_id = event_for(catalog, "batch_z1234567")
    assert catalog.events.claim(event_id, seconds=0.2)  # the process that died
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET)
        assert hooks.deliver_due(catalog) == (0, 0)  # still claimed
        time.sleep(0.3)
        assert hooks.deliver_due(catalog) == (1, 0)
        assert hooks.deliver_due(catalog) == (0, 0)
    finally:
        receiver.close()
    assert [unwrap(b, h).id for h, b in receiver.received] == [event_id]


def test_a_receiver_that_took_an_event_never_gets_it_again(catalog):
    """One receiver takes the event, the other never does: later rounds try only the other,
    until the window ends."""
    event_id = event_for(catalog, "batch_two12345")
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url, "http://127.0.0.1:9/none"], timeout_seconds=1,
                         retry_hours=1)  # fmt: skip
        start = time.time()
        for step in range(5):
            assert hooks.deliver_due(catalog, now=start + step * 3600 / 4) == (0, 1)
        assert catalog.events.get(event_id)["gave_up_at"] is not None
    finally:
        receiver.close()
    assert len(receiver.received) == 1  # the receiver that took it got it once
    tries = [d["url"] for d in catalog.events.deliveries_of("batch_two12345")]
    assert tries.count("http://127.0.0.1:9/none") == 5


def test_a_run_never_waits_for_a_receiver(catalog):
    """A receiver that never answers added 5 tries x 10 s to every batch's run (67 s between
    one batch's end and the next one's start). A run's lifecycle now only records the event;
    the delivery sensor sends it."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/hooks"
    hooks = Webhooks(urls=[url], timeout_seconds=2)
    started = time.monotonic()
    event_id = event_for(catalog, "batch_hang12345", webhooks=hooks)
    assert time.monotonic() - started < 1.5
    row = catalog.events.get(event_id)
    assert row["delivered_at"] is None and row["attempts"] == 0  # waiting for the sensor
    silent.close()


def test_the_api_sends_from_a_bounded_pool_of_threads(catalog):
    """40 cancels with a receiver that hangs grew the API from 19 to 114 threads: now at most
    ``DELIVERY_THREADS`` deliveries run at once, whatever the receivers do."""
    import socket

    from vbs_resources.lifecycle import DELIVERY_THREADS

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    hooks = Webhooks(urls=[f"http://127.0.0.1:{silent.getsockname()[1]}/"], timeout_seconds=2)
    lifecycle = BatchLifecycle(catalog, hooks, deliver_in_background=True)
    before = threading.active_count()
    for n in range(40):
        batch_id = f"batch_pool{n:06d}"
        lifecycle.create(batch_id, source="api", input_file_id="file-x")
        lifecycle.request_cancel(batch_id)
        lifecycle.finish(batch_id, "cancelled")
    time.sleep(0.5)
    assert threading.active_count() - before <= DELIVERY_THREADS
    silent.close()


def test_events_are_listed_and_sent_again_through_the_api(tmp_path, catalog):
    from fastapi.testclient import TestClient

    from tests.conftest import settings_for
    from vbs_api.app import create_app

    settings = settings_for(tmp_path / "vbs")
    app = create_app(settings)
    catalog = app.state.vbs.catalog
    event_id = event_for(catalog, "batch_api12345")
    hooks = Webhooks(urls=["http://127.0.0.1:9/none"], retry_hours=1, timeout_seconds=1)
    hooks.deliver(catalog, event_id, now=time.time() + 7200)  # its window long past
    with TestClient(app, base_url="http://127.0.0.1") as client:
        listed = client.get("/v1/webhooks/events", params={"status": "given_up"}).json()
        [shown] = listed["data"]
        assert (shown["id"], shown["status"], shown["subject_id"]) == (
            event_id, "given_up", "batch_api12345")  # fmt: skip
        assert "ConnectError" in shown["last_error"]
        again = client.post(f"/v1/webhooks/events/{event_id}/redeliver")
        assert again.status_code == 200 and again.json()["status"] == "pending"
        assert client.post("/v1/webhooks/events/evt_nope/redeliver").status_code == 404
        assert client.get("/v1/webhooks/events", params={"after": "evt_nope"}).status_code == 400
        catalog.events.finish(event_id, delivered=True)
        assert client.post(f"/v1/webhooks/events/{event_id}/redeliver").status_code == 409
