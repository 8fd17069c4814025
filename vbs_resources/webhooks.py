"""Webhooks as a result handler: batch and fine-tuning events, signed as OpenAI signs its
webhooks.

Events come from the catalog's outbox (``events``), where a lifecycle writes each one in the same
transaction as the status change it announces, so an event exists exactly once. Delivery never
happens inside a run (a failing receiver would hold the run, and the ``gpu`` pool, while it
waits): the ``webhook_delivery`` sensor delivers what is due every few seconds, and the API sends
its own events at once from a small bounded pool of threads. A delivery is a *round*: one try to
each receiver that has not taken the event yet. A round that leaves a receiver without it is
tried again later, the wait doubling from ``first_backoff_seconds`` up to
``max_backoff_seconds``, for ``retry_hours`` (72 by default, as OpenAI retries) from the event or
from its last redelivery by hand; then the event is given up. Everything survives restarts: the
schedule is in the catalog. Receivers drop a repeat by its ``webhook-id`` (Standard Webhooks).

Signing follows Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so a receiver verifies vbs events with the
official client's ``client.webhooks.unwrap(body, headers, secret=...)``. Redirects are never
followed (that would resend the signed event as a GET to wherever the redirect points); every
attempt is logged in the catalog, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time

import dagster as dg
import httpx
from pydantic import Field

from vbs_resources.catalog import Catalog
from vbs_resources.settings import redact_url
from vbs_resources.wire import WebhookEvent, WebhookEventData

log = logging.getLogger(__name__)


def _secret_bytes(secret: str) -> bytes:
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one delivery."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_secret_bytes(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Webhooks(dg.ConfigurableResource):
    """Posts events to ``urls``; no URLs, no deliveries."""

    urls: list[str] = Field(default_factory=list)
    secret: str | None = Field(
        default=None,
        description="whsec_... : in Dagster an EnvVar('VBS_WEBHOOK_SECRET'), resolved in the run",
    )
    first_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 3600.0
    retry_hours: float = 72.0
    timeout_seconds: float = 10.0

    def _secret(self) -> str | None:
        secret = self.secret
        if isinstance(secret, dg.EnvVar):  # built outside Dagster: resolve it here
            secret = secret.get_value()
        return secret or None

    @property
    def lease_seconds(self) -> float:
        """How long one round of an event may take: one try to each receiver."""
        return len(self.urls) * self.timeout_seconds + 30

    def backoff(self, rounds: int) -> float:
        """The wait after ``rounds`` failed rounds: doubling, capped."""
        return min(self.max_backoff_seconds, self.first_backoff_seconds * 2 ** max(rounds - 1, 0))

    def deliver(self, catalog: Catalog, event_id: str, now: float | None = None) -> bool:
        """One round of an event: one try to each receiver that has not taken it. True when
        every receiver has it now; False when another process holds it, it ended already, or a
        receiver refused it (then the next round is scheduled, or the event is given up once
        its retry window has passed)."""
        if not catalog.events.claim(event_id, self.lease_seconds):
            return False
        event = catalog.events.get(event_id)
        if event is None:
            return False
        if not self.urls:
            catalog.events.finish(event_id, delivered=True)  # nothing to deliver to
            return True
        body = (
            WebhookEvent(
                id=event["id"],
                type=event["type"],
                created_at=event["created_at"],
                data=WebhookEventData(id=event["subject_id"]),
            )
            .model_dump_json()
            .encode()
        )
        errors = []
        for url in self.urls:
            if catalog.events.delivery_attempts(event_id, url, succeeded=True):
                continue  # this receiver has it from an earlier round
            error = self._post(catalog, url, event, body)
            if error is not None:
                errors.append(f"{redact_url(url)}: {error}")
        if not errors:
            catalog.events.finish(event_id, delivered=True)
            return True
        now = time.time() if now is None else now
        started = event["redelivered_at"] or event["created_at"]
        message = "; ".join(errors)
        if now - started >= self.retry_hours * 3600:
            catalog.events.finish(event_id, delivered=False, error=message)
            log.warning("webhook %s for %s given up: %s", event["type"], event["subject_id"],
                        message)  # fmt: skip
        else:
            catalog.events.retry_later(event_id, now + self.backoff(event["attempts"] + 1), message)
        return False

    def deliver_due(
        self,
        catalog: Catalog,
        now: float | None = None,
        budget_seconds: float = 20.0,
        workers: int = 8,
    ) -> tuple[int, int]:
        """One round of every event that is due, ``workers`` at a time, for at most
        ``budget_seconds`` (what is left waits for the next call): (delivered, failed)."""
        from concurrent.futures import ThreadPoolExecutor

        now = time.time() if now is None else now
        started = time.monotonic()
        due = catalog.events.due(now)
        if not due:
            return 0, 0
        done = failed = 0
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = []
            for event in due:
                if time.monotonic() - started > budget_seconds:
                    break
                futures.append(pool.submit(self.deliver, catalog, event["id"], now))
            for future in futures:
                if future.result():
                    done += 1
                else:
                    failed += 1
        return done, failed

    def _post(self, catalog: Catalog, url: str, event: dict, body: bytes) -> str | None:
        """One try; the error, or None when the receiver took it."""
        secret = self._secret()
        attempt = catalog.events.delivery_attempts(event["id"], url) + 1
        timestamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": "vbs-webhooks/1",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
        }
        if secret:
            headers["webhook-signature"] = sign(secret, event["id"], timestamp, body)
        status_code, error = None, None
        try:
            with httpx.Client(follow_redirects=False, timeout=self.timeout_seconds) as http:
                status_code = http.post(url, content=body, headers=headers).status_code
            if 300 <= status_code < 400:
                error = f"HTTP {status_code}: redirects are not followed"
            elif status_code >= 400:
                error = f"HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}"
        catalog.events.log_delivery(
            event_id=event["id"],
            subject_id=event["subject_id"],
            event_type=event["type"],
            url=url,
            attempt=attempt,
            status_code=status_code,
            error=error,
        )
        return error
