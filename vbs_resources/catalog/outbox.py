"""The outbox: one row per event, written in the transaction that changed the status it
announces, so an event exists exactly once whatever crashes; its delivery is claimed, retried
and logged here (``vbs_resources.webhooks`` delivers)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import event_deliveries, events
from vbs_resources.catalog.store import Store


class EventStore(Store):
    """The ``events`` outbox and the ``event_deliveries`` log."""

    @staticmethod
    def add(conn: sa.Connection, event_id: str, subject_id: str, event_type: str) -> None:
        """Record an event on ``conn``, inside the transaction of the change it announces."""
        conn.execute(
            events.insert().values(
                id=event_id, subject_id=subject_id, type=event_type, created_at=int(time.time())
            )
        )

    def get(self, event_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(events).where(events.c.id == event_id))
            found = row.mappings().first()
        return dict(found) if found else None

    def of_subject(self, subject_id: str) -> list[dict[str, Any]]:
        """The events of one batch or job, oldest first."""
        return self._all(
            sa.select(events).where(events.c.subject_id == subject_id).order_by(events.c.created_at)
        )

    def undelivered(self, older_than: float) -> list[dict[str, Any]]:
        """Events nobody delivered or gave up on, created before ``older_than``, oldest first."""
        query = (
            sa.select(events)
            .where(
                events.c.delivered_at.is_(None),
                events.c.gave_up_at.is_(None),
                events.c.created_at < older_than,
                sa.or_(
                    events.c.claimed_until.is_(None),
                    events.c.claimed_until < time.time(),
                ),
            )
            .order_by(events.c.created_at)
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
                events.update()
                .where(
                    events.c.id == event_id,
                    events.c.delivered_at.is_(None),
                    events.c.gave_up_at.is_(None),
                    sa.or_(
                        events.c.claimed_until.is_(None),
                        events.c.claimed_until < now,
                    ),
                )
                .values(claimed_until=now + seconds)
            ).rowcount
        return bool(changed)

    def finish(self, event_id: str, delivered: bool) -> None:
        column = "delivered_at" if delivered else "gave_up_at"
        with self.engine.begin() as conn:
            conn.execute(
                events.update()
                .where(events.c.id == event_id)
                .values({column: time.time(), "claimed_until": None})
            )

    def release(self, event_id: str) -> None:
        """Give an event's delivery back for a later try."""
        with self.engine.begin() as conn:
            conn.execute(events.update().where(events.c.id == event_id).values(claimed_until=None))

    def delivery_attempts(
        self, event_id: str, url: str | None = None, succeeded: bool = False
    ) -> int:
        """Delivery tries logged for an event (to ``url``; only the successful ones)."""
        query = sa.select(sa.func.count()).where(event_deliveries.c.event_id == event_id)
        if url is not None:
            query = query.where(event_deliveries.c.url == url)
        if succeeded:
            query = query.where(event_deliveries.c.error.is_(None))
        with self.engine.connect() as conn:
            return conn.execute(query).scalar_one()

    def log_delivery(self, **fields: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(event_deliveries.insert().values(at=time.time(), **fields))

    def deliveries_of(self, subject_id: str) -> list[dict[str, Any]]:
        return self._all(
            sa.select(event_deliveries)
            .where(event_deliveries.c.subject_id == subject_id)
            .order_by(event_deliveries.c.id)
        )
