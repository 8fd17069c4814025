"""The outbox: one row per event, written in the transaction that changed the status it
announces, so an event exists exactly once whatever crashes; its delivery is claimed, retried
and logged here (``vbs_resources.webhooks`` delivers)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import event_deliveries, events
from vbs_resources.catalog.store import Store, UnknownCursor


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

    def due(self, now: float, limit: int = 100) -> list[dict[str, Any]]:
        """Events nobody delivered or gave up on whose next try is due (and nobody holds), the
        longest waiting first."""
        query = (
            sa.select(events)
            .where(
                events.c.delivered_at.is_(None),
                events.c.gave_up_at.is_(None),
                sa.or_(events.c.next_attempt_at.is_(None), events.c.next_attempt_at <= now),
                sa.or_(events.c.claimed_until.is_(None), events.c.claimed_until < now),
            )
            .order_by(sa.func.coalesce(events.c.next_attempt_at, events.c.created_at))
            .limit(limit)
        )
        return self._all(query)

    def listing(
        self,
        state: str | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Events newest first (``state``: ``pending``, ``delivered`` or ``given_up``), after the
        event ``after`` (``UnknownCursor`` if there is none); ``limit + 1`` at most."""
        query = sa.select(events)
        if state == "pending":
            query = query.where(events.c.delivered_at.is_(None), events.c.gave_up_at.is_(None))
        elif state == "delivered":
            query = query.where(events.c.delivered_at.is_not(None))
        elif state == "given_up":
            query = query.where(events.c.gave_up_at.is_not(None))
        if after is not None:
            anchor = self._first(sa.select(events).where(events.c.id == after), conn)
            if anchor is None:
                raise UnknownCursor("event", after)
            query = query.where(
                sa.tuple_(events.c.created_at, events.c.id)
                < sa.tuple_(sa.literal(anchor["created_at"]), sa.literal(after))
            )
        query = query.order_by(events.c.created_at.desc(), events.c.id.desc())
        return self._all(query.limit(limit + 1), conn)

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

    def finish(self, event_id: str, delivered: bool, error: str | None = None) -> None:
        """Delivered to every receiver, or given up (with the last ``error``)."""
        column = "delivered_at" if delivered else "gave_up_at"
        values: dict[str, Any] = {column: time.time(), "claimed_until": None}
        if error is not None:
            values["last_error"] = error[:500]
        with self.engine.begin() as conn:
            conn.execute(events.update().where(events.c.id == event_id).values(values))

    def retry_later(self, event_id: str, at: float, error: str) -> None:
        """One more round failed: the next one is due at ``at``."""
        with self.engine.begin() as conn:
            conn.execute(
                events.update()
                .where(events.c.id == event_id)
                .values(
                    attempts=events.c.attempts + 1,
                    next_attempt_at=at,
                    last_error=error[:500],
                    claimed_until=None,
                )
            )

    def redeliver(self, event_id: str) -> dict[str, Any] | None:
        """Make an event that was given up, or not delivered yet, due again now, with a new
        retry window; None for an unknown event. A delivered one stays delivered."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                events.update()
                .where(events.c.id == event_id, events.c.delivered_at.is_(None))
                .values(
                    gave_up_at=None,
                    next_attempt_at=None,
                    attempts=0,
                    redelivered_at=now,
                    claimed_until=None,
                )
            )
        return self.get(event_id)

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
