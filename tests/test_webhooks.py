"""Webhook deliveries from the event outbox: Standard Webhooks signatures the official client
verifies, retries, no redirects, and late delivery of an event whose delivery was cut short."""

import json
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
def catalog(tmp_path):
    return Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}")


def event_for(catalog, batch_id, status="completed"):
    """A batch that reached ``status``, through a lifecycle that delivers nothing itself."""
    lifecycle = BatchLifecycle(catalog)
    lifecycle.create(batch_id, source="api", input_file_id="file-x")
    lifecycle.start(batch_id)
    if status == "failed":
        lifecycle.fail(batch_id, [])
    else:
        lifecycle.finish(batch_id, status)
    [event] = catalog.events.of_subject(batch_id)
    return event["id"]


def undeliver(catalog, event_id):
    """Make an event undelivered again (the lifecycle above had no URL to send it to)."""
    import sqlalchemy as sa

    from vbs_resources.catalog import events

    with catalog.engine.begin() as conn:
        conn.execute(
            sa.update(events).where(events.c.id == event_id).values(delivered_at=None, created_at=0)
        )


def test_signed_event_verifies_with_the_openai_client_after_retries(catalog):
    event_id = event_for(catalog, "batch_abc12345")
    undeliver(catalog, event_id)
    receiver = WebhookReceiver(fail_first=2)
    waits = []
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET, first_backoff_seconds=0.5)
        assert hooks.deliver(catalog, event_id, sleep=waits.append)
    finally:
        receiver.close()
    assert len(receiver.received) == 3 and waits == [0.5, 1.0]
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
    undeliver(catalog, event_id)
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
    undeliver(catalog, event_id)
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url], secret=dg.EnvVar("VBS_TEST_WEBHOOK_SECRET"))
        hooks.deliver(catalog, event_id)
    finally:
        receiver.close()
    headers, body = receiver.received[0]
    assert unwrap(body, headers).data.id == "batch_env12345"


def test_unreachable_url_gives_up_and_logs_every_attempt(catalog):
    event_id = event_for(catalog, "batch_y1234567", "expired")
    undeliver(catalog, event_id)
    hooks = Webhooks(urls=["http://127.0.0.1:9/none"], max_attempts=3, timeout_seconds=1)
    assert not hooks.deliver(catalog, event_id, sleep=lambda _: None)
    deliveries = catalog.events.deliveries_of("batch_y1234567")
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert all(d["status_code"] is None and d["error"] for d in deliveries)
    assert catalog.events.get(event_id)["gave_up_at"] is not None
    assert hooks.deliver_pending(catalog) == 0  # given up: not tried again


def test_redirects_are_not_followed(catalog):
    """A receiver answering 307 does not get the signed event resent elsewhere."""
    import http.server
    import threading

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
    undeliver(catalog, event_id)
    try:
        hooks = Webhooks(urls=[f"http://127.0.0.1:{server.server_address[1]}/"], max_attempts=2)
        assert not hooks.deliver(catalog, event_id, sleep=lambda _: None)
    finally:
        server.shutdown()
        elsewhere.close()
    assert elsewhere.received == []
    errors = [d["error"] for d in catalog.events.deliveries_of("batch_r1234567")]
    assert errors and all("redirect" in e for e in errors)


def test_a_delivery_cut_short_is_finished_later_once(catalog):
    """A process that claimed an event and died: once its claim runs out, the sweep (the
    reconciler's) delivers it, once, and a second sweep sends nothing."""
    event_id = event_for(catalog, "batch_z1234567")
    undeliver(catalog, event_id)
    assert catalog.events.claim(event_id, seconds=0.2)  # the process that died
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET)
        assert hooks.deliver_pending(catalog) == 0  # still claimed
        time.sleep(0.3)
        assert hooks.deliver_pending(catalog) == 1
        assert hooks.deliver_pending(catalog) == 0
    finally:
        receiver.close()
    assert [unwrap(b, h).id for h, b in receiver.received] == [event_id]


def test_an_event_is_given_up_once_each_failing_receiver_had_all_its_tries(catalog):
    """One receiver takes the event, the other never does: after the failing one had its five
    tries (over sweeps, one try each), the event is done and sweeps stop sending it."""
    event_id = event_for(catalog, "batch_two12345")
    undeliver(catalog, event_id)
    receiver = WebhookReceiver()
    try:
        hooks = Webhooks(urls=[receiver.url, "http://127.0.0.1:9/none"], timeout_seconds=1)
        for _ in range(5):
            assert hooks.deliver_pending(catalog) == 0
        assert catalog.events.get(event_id)["gave_up_at"] is not None
        assert hooks.deliver_pending(catalog) == 0
    finally:
        receiver.close()
    assert len(receiver.received) == 1  # the receiver that took it got it once
    tries = [d["url"] for d in catalog.events.deliveries_of("batch_two12345")]
    assert tries.count("http://127.0.0.1:9/none") == 5
