"""Webhooks as a result handler: batch events, signed as OpenAI signs its webhooks.

Signing follows Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "id.timestamp.body">``), so a receiver verifies vbs events with the
official client's ``client.webhooks.unwrap(body, headers, secret=...)``. Deliveries are retried
with exponential backoff; every attempt is logged in the catalog (never the secret).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable

import dagster as dg
from pydantic import Field

from vbs_resources.catalog import Catalog

log = logging.getLogger(__name__)

BATCH_EVENTS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}


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
    secret: str | None = Field(default=None, description="whsec_... from VBS_WEBHOOK_SECRET")
    max_attempts: int = 5
    first_backoff_seconds: float = 1.0
    timeout_seconds: float = 10.0

    def batch_event(
        self,
        catalog: Catalog,
        batch_id: str,
        status: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """Deliver the event of a batch that reached ``status`` (if it has one) to every URL."""
        event_type = BATCH_EVENTS.get(status)
        if event_type is None or not self.urls:
            return
        event_id = f"evt_{uuid.uuid4().hex}"
        created = int(time.time())
        body = json.dumps(
            {
                "object": "event",
                "id": event_id,
                "type": event_type,
                "created_at": created,
                "data": {"id": batch_id},
            }
        ).encode()
        for url in self.urls:
            self._deliver(catalog, url, batch_id, event_type, event_id, body, sleep)

    def _deliver(
        self,
        catalog: Catalog,
        url: str,
        batch_id: str,
        event_type: str,
        event_id: str,
        body: bytes,
        sleep: Callable[[float], None],
    ) -> bool:
        for attempt in range(1, self.max_attempts + 1):
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "user-agent": "vbs-webhooks/1",
                "webhook-id": event_id,
                "webhook-timestamp": str(timestamp),
            }
            if self.secret:
                headers["webhook-signature"] = sign(self.secret, event_id, timestamp, body)
            status_code, error = None, None
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    status_code = response.status
            except urllib.error.HTTPError as exc:
                status_code, error = exc.code, f"HTTP {exc.code}"
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
            ok = status_code is not None and 200 <= status_code < 300
            catalog.log_webhook_delivery(
                event_id=event_id,
                batch_id=batch_id,
                event_type=event_type,
                url=url,
                attempt=attempt,
                status_code=status_code,
                error=error,
            )
            if ok:
                return True
            if attempt < self.max_attempts:
                sleep(self.first_backoff_seconds * 2 ** (attempt - 1))
        log.warning(
            "webhook %s for %s to %s failed after %d attempts",
            event_type,
            batch_id,
            url,
            self.max_attempts,
        )
        return False
