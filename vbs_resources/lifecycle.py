"""The batch lifecycle: the one place where a batch's status changes.

Every change is one conditional update (``Catalog.transition``) that refuses to leave a
terminal status, stamps the status's ``*_at`` column, and records the status's webhook event in
the same transaction, so whatever races (a cancel against a completion, two runs, a sensor and
a run) exactly one side wins and exactly one event exists. The sensor, the assets, the API and
the reconciler all go through ``BatchLifecycle``; nothing else writes ``status``.

```
validating -> in_progress -> finalizing -> completed
     |              |             |
     +--------------+-------------+--> failed | expired | cancelling -> cancelled
```
A batch whose run is terminated from Dagster goes straight to ``cancelled``; a ``cancelling``
batch may still fail (its file was invalid).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from vbs_resources.catalog import Catalog
from vbs_resources.layout import new_event_id
from vbs_resources.webhooks import Webhooks
from vbs_resources.wire import BatchErrorEntry

log = logging.getLogger(__name__)

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")

# Which statuses each status may be entered from.
ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "in_progress": ("validating",),
    "finalizing": ("in_progress",),
    "completed": ("in_progress", "finalizing"),
    "failed": UNFINISHED,
    "cancelling": ("validating", "in_progress", "finalizing"),
    "cancelled": UNFINISHED,
    "expired": ("validating", "in_progress", "finalizing"),
}

EVENTS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "cancelled": "batch.cancelled",
    "expired": "batch.expired",
}

# A batch's errors are kept bounded whatever the input: at most this many entries.
MAX_ERRORS = 1000


# The API's deliveries, a few at a time whatever happens to receivers (a receiver that hangs
# once made one thread per event: 114 threads for 40 cancels).
DELIVERY_THREADS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _delivery_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="vbs-webhooks")
        return _pool


class EventSender:
    """What happens to an event the outbox has just recorded. With no receivers it is done at
    once. Otherwise, ``in_background`` (the API, which answers at once) sends it now from a
    bounded pool of threads; else (runs) it is left in the outbox, where the
    ``webhook_delivery`` sensor sends it within seconds: a run never waits for a receiver."""

    def __init__(
        self, catalog: Catalog, webhooks: Webhooks | None, in_background: bool = False
    ) -> None:
        self.catalog, self.webhooks, self.in_background = catalog, webhooks, in_background

    def send(self, event_id: str) -> None:
        webhooks = self.webhooks
        if webhooks is None or not webhooks.urls:
            self.catalog.events.finish(event_id, delivered=True)  # nothing to deliver to
            return
        if self.in_background:
            _delivery_pool().submit(self._deliver, webhooks, event_id)

    def _deliver(self, webhooks: Webhooks, event_id: str) -> None:
        # A delivery problem never undoes the status change it announces; the event stays in
        # the outbox and the delivery sensor tries again.
        try:
            webhooks.deliver(self.catalog, event_id)
        except Exception:  # noqa: BLE001
            log.exception("delivering event %s failed; it stays in the outbox", event_id)


class BatchLifecycle:
    """Status changes of batches, with their events.

    ``deliver_in_background``: send events at once from a bounded pool of threads (the API,
    sensors); without it (runs) they wait in the outbox for the ``webhook_delivery`` sensor.
    """

    def __init__(
        self,
        catalog: Catalog,
        webhooks: Webhooks | None = None,
        deliver_in_background: bool = False,
    ) -> None:
        self.catalog, self.webhooks = catalog, webhooks
        self.sender = EventSender(catalog, webhooks, deliver_in_background)

    # ---- creation ----------------------------------------------------------------------------

    def create(
        self,
        batch_id: str,
        *,
        source: str,
        input_file_id: str,
        original_filename: str | None = None,
        content_sha256: str = "",
        input_sha256: str | None = None,
        endpoint: str | None = None,
        completion_window: str = "24h",
        metadata: dict[str, str] | None = None,
        options: dict[str, Any] | None = None,
        created_by: str | None = None,
    ) -> bool:
        """Record a new batch in ``validating``; False when the id exists already."""
        now = int(time.time())
        window_s = 24 * 3600 if completion_window == "24h" else None
        return self.catalog.batches.insert(
            dict(
                id=batch_id,
                status="validating",
                source=source,
                endpoint=endpoint,
                content_sha256=content_sha256,
                input_sha256=input_sha256,
                original_filename=original_filename,
                completion_window=completion_window,
                created_at=now,
                expires_at=now + window_s if window_s else None,
                batch_metadata=metadata or {},
                options=options or {},
                input_file_id=input_file_id,
                request_total=0,
                request_completed=0,
                request_failed=0,
                created_by=created_by,
            )
        )

    # ---- transitions -------------------------------------------------------------------------

    def start(self, batch_id: str, **fields: Any) -> bool:
        """``validating -> in_progress``."""
        return self._move(batch_id, "in_progress", **fields)

    def finalizing(self, batch_id: str, **fields: Any) -> bool:
        return self._move(batch_id, "finalizing", **fields)

    def fail(self, batch_id: str, errors: list[BatchErrorEntry], **fields: Any) -> bool:
        """``* -> failed`` with its ``errors`` (at most ``MAX_ERRORS``)."""
        data = [e.model_dump() for e in errors[:MAX_ERRORS]]
        return self._move(batch_id, "failed", errors=data, **fields)

    def request_cancel(self, batch_id: str) -> str | None:
        """Ask for a batch to stop (its run stops at the next chunk boundary); returns the status
        the batch has afterwards, None for an unknown batch. A batch that already ended keeps its
        status: the caller reports it."""
        self._move(batch_id, "cancelling")
        row = self.catalog.batches.get(batch_id)
        return row["status"] if row else None

    def finish(self, batch_id: str, status: str, **fields: Any) -> bool:
        """Enter one of the ending statuses by name (``completed``, ``cancelled``, ``expired``)."""
        if status not in ("completed", "cancelled", "expired"):
            raise ValueError(f"{status!r} is not an ending status")
        return self._move(batch_id, status, **fields)

    def record(self, batch_id: str, **fields: Any) -> bool:
        """Write progress (counts, usage, endpoint, ...) of an unfinished batch; refused (False)
        once the batch is in a terminal status."""
        return self.catalog.batches.update_unfinished(batch_id, **fields)

    def _move(self, batch_id: str, to: str, **fields: Any) -> bool:
        event = (new_event_id(), EVENTS[to]) if to in EVENTS else None
        changed = self.catalog.batches.transition(
            batch_id, to, ALLOWED_FROM[to], event=event, **fields
        )
        if changed and event is not None:
            self.sender.send(event[0])
        return changed
