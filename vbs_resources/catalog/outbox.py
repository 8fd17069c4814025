"""The outbox: one row per event, written in the transaction that changed the status it
announces, so an event exists exactly once whatever crashes; its delivery is claimed, retried
and logged here (``vbs_resources.webhooks`` delivers)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import batch_events, webhook_deliveries
from vbs_resources.catalog.store import Store


class EventStore(Store):
    """The ``batch_events`` outbox and the ``webhook_deliveries`` log."""

    def get(self, event_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(batch_events).where(batch_events.c.id == event_id))
            found = row.mappings().first()
        return dict(found) if found else None

    def of_batch(self, batch_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(batch_events)
            .where(batch_events.c.batch_id == batch_id)
            .order_by(batch_events.c.created_at)
        )

    def undelivered(self, older_than: float) -> list[dict[str, Any]]:
        """Events nobody delivered or gave up on, created before ``older_than``, oldest first."""
        query = (
            sa.select(batch_events)
            .where(
                batch_events.c.delivered_at.is_(None),
                batch_events.c.gave_up_at.is_(None),
                batch_events.c.created_at < older_than,
                sa.or_(
                    batch_events.c.claimed_until.is_(None),
                    batch_events.c.claimed_until < time.time(),
                ),
            )
            .order_by(batch_events.c.created_at)
            .limit(100)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def claim(self, event_id: str, seconds: float) -> bool:
        """Take the delivery of an event for ``seconds``; False when another process has it or
        it is done."""
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(
                batch_events.update()
                .where(
                    batch_events.c.id == event_id,
                    batch_events.c.delivered_at.is_(None),
                    batch_events.c.gave_up_at.is_(None),
                    sa.or_(
                        batch_events.c.claimed_until.is_(None),
                        batch_events.c.claimed_until < now,
                    ),
                )
                .values(claimed_until=now + seconds)
            ).rowcount
        return bool(changed)

    def finish(self, event_id: str, delivered: bool) -> None:
        column = "delivered_at" if delivered else "gave_up_at"
        with self.engine.begin() as conn:
            conn.execute(
                batch_events.update()
                .where(batch_events.c.id == event_id)
                .values({column: time.time(), "claimed_until": None})
            )

    def release(self, event_id: str) -> None:
        """Give an event's delivery back for a later try."""
        with self.engine.begin() as conn:
            conn.execute(
                batch_events.update()
                .where(batch_events.c.id == event_id)
                .values(claimed_until=None)
            )

    def delivery_attempts(
        self, event_id: str, url: str | None = None, succeeded: bool = False
    ) -> int:
        """Delivery tries logged for an event (to ``url``; only the successful ones)."""
        query = sa.select(sa.func.count()).where(webhook_deliveries.c.event_id == event_id)
        if url is not None:
            query = query.where(webhook_deliveries.c.url == url)
        if succeeded:
            query = query.where(webhook_deliveries.c.error.is_(None))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def log_delivery(self, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(webhook_deliveries.insert().values(at=time.time(), **fields))

    def deliveries_of(self, batch_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(webhook_deliveries)
            .where(webhook_deliveries.c.batch_id == batch_id)
            .order_by(webhook_deliveries.c.id)
        )
