"""Webhooks as a result handler: batch events, signed as OpenAI signs its webhooks.

Events come from the catalog's outbox (``events``), where the lifecycle writes each one in
the same transaction as the status change it announces, so an event exists exactly once. The
process that made the change delivers it at once; an event whose delivery was cut short (the
process died) is delivered by the reconciler sensor later, with the same ``webhook-id``, which
receivers use to drop a repeat (Standard Webhooks).

Signing follows Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so a receiver verifies vbs events with the
official client's ``client.webhooks.unwrap(body, headers, secret=...)``. Deliveries are retried
with exponential backoff and never follow a redirect (which would resend the signed event as a
GET to wherever the redirect points); every attempt is logged in the catalog, never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable

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
    """Posts batch events to ``urls``; no URLs, no deliveries."""

    urls: list[str] = Field(default_factory=list)
    secret: str | None = Field(
        default=None,
        description="whsec_... : in Dagster an EnvVar('VBS_WEBHOOK_SECRET'), resolved in the run",
    )
    max_attempts: int = 5
    first_backoff_seconds: float = 1.0
    timeout_seconds: float = 10.0

    def _secret(self) -> str | None:
        secret = self.secret
        if isinstance(secret, dg.EnvVar):  # built outside Dagster: resolve it here
            secret = secret.get_value()
        return secret or None

    @property
    def lease_seconds(self) -> float:
        """How long one delivery of an event may take, all attempts and backoffs included."""
        backoff = self.first_backoff_seconds * (2 ** max(self.max_attempts - 1, 0))
        return len(self.urls) * self.max_attempts * self.timeout_seconds + backoff + 30

    def deliver(
        self,
        catalog: Catalog,
        event_id: str,
        sleep: Callable[[float], None] = time.sleep,
        attempts: int | None = None,
    ) -> bool:
        """Deliver one event from the outbox to every URL, with up to ``attempts`` tries each
        (``max_attempts`` by default); False when another process has it, it was delivered
        already, or a URL refused it. An event is given up once ``max_attempts`` tries were
        made in all, by whichever processes made them."""
        if not catalog.events.claim(event_id, self.lease_seconds):
            return False
        event = catalog.events.get(event_id)
        if event is None:
            return False
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
        delivered, spent = True, True
        for url in self.urls:
            if catalog.events.delivery_attempts(event_id, url, succeeded=True):
                continue  # this receiver has it from an earlier try
            if not self._post(catalog, url, event, body, sleep, attempts or self.max_attempts):
                delivered = False
                spent &= catalog.events.delivery_attempts(event_id, url) >= self.max_attempts
        if delivered or spent:
            # Done: every receiver has it, or every one that has not refused it every time.
            catalog.events.finish(event_id, delivered=delivered)
        else:
            catalog.events.release(event_id)
        return delivered

    def deliver_pending(
        self, catalog: Catalog, older_than_seconds: float = 30.0, budget_seconds: float = 10.0
    ) -> int:
        """One more try for each event whose delivery never happened or was cut short (the
        reconciler calls this every tick, so ticks are the retries); returns how many went
        through. Stops after ``budget_seconds``, leaving the rest for the next tick."""
        done, started = 0, time.monotonic()
        for event in catalog.events.undelivered(time.time() - older_than_seconds):
            if time.monotonic() - started > budget_seconds:
                break
            if not self.urls:
                catalog.events.finish(event["id"], delivered=True)
                continue
            done += self.deliver(catalog, event["id"], attempts=1)
        return done

    def _post(
        self,
        catalog: Catalog,
        url: str,
        event: dict,
        body: bytes,
        sleep: Callable[[float], None],
        attempts: int,
    ) -> bool:
        secret = self._secret()
        first = catalog.events.delivery_attempts(event["id"], url) + 1
        last = min(first + attempts - 1, self.max_attempts)
        with httpx.Client(follow_redirects=False, timeout=self.timeout_seconds) as http:
            for attempt in range(first, last + 1):
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
                if error is None:
                    return True
                if attempt < last:
                    sleep(self.first_backoff_seconds * 2 ** (attempt - first))
        log.warning(
            "webhook %s for %s to %s failed (attempt %d of %d)",
            event["type"],
            event["subject_id"],
            redact_url(url),
            last,
            self.max_attempts,
        )
        return False
