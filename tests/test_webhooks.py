"""Webhook deliveries: Standard Webhooks signatures the official client verifies, retries."""

import json

import openai
import pytest
from openai import OpenAI

from tests.conftest import WEBHOOK_SECRET, WebhookReceiver
from vbs_resources import Catalog, Webhooks


@pytest.fixture
def catalog(tmp_path):
    return Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}")


def test_signed_event_verifies_with_the_openai_client_after_retries(catalog):
    receiver = WebhookReceiver(fail_first=2)
    waits = []
    try:
        hooks = Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET, first_backoff_seconds=0.5)
        hooks.batch_event(catalog, "batch_abc12345", "completed", sleep=waits.append)
    finally:
        receiver.close()
    assert len(receiver.received) == 3 and waits == [0.5, 1.0]
    headers, body = receiver.received[-1]
    event = OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET).webhooks.unwrap(body, headers)
    assert (event.type, event.data.id) == ("batch.completed", "batch_abc12345")
    deliveries = catalog.webhook_deliveries("batch_abc12345")
    assert [(d["attempt"], d["status_code"]) for d in deliveries] == [(1, 500), (2, 500), (3, 200)]
    assert all(WEBHOOK_SECRET not in json.dumps(d) for d in deliveries)


def test_tampered_body_fails_verification(catalog):
    receiver = WebhookReceiver()
    try:
        Webhooks(urls=[receiver.url], secret=WEBHOOK_SECRET).batch_event(
            catalog, "batch_x1234567", "failed"
        )
    finally:
        receiver.close()
    headers, body = receiver.received[0]
    verifier = OpenAI(api_key="unused", webhook_secret=WEBHOOK_SECRET)
    assert verifier.webhooks.unwrap(body, headers).type == "batch.failed"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        verifier.webhooks.unwrap(body.replace(b"failed", b"completed"), headers)


def test_unreachable_url_gives_up_and_logs_every_attempt(catalog):
    hooks = Webhooks(urls=["http://127.0.0.1:9/none"], max_attempts=3, timeout_seconds=1)
    hooks.batch_event(catalog, "batch_y1234567", "expired", sleep=lambda _: None)
    deliveries = catalog.webhook_deliveries("batch_y1234567")
    assert [d["attempt"] for d in deliveries] == [1, 2, 3]
    assert all(d["status_code"] is None and d["error"] for d in deliveries)
