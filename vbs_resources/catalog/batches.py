"""Batches, OpenAI's Batch objects. A batch's ``status`` changes only through ``transition``, one
conditional update that ``vbs_resources.lifecycle`` drives; every other write to a batch row is
refused once the batch is in a terminal status."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.outbox import EventStore
from vbs_resources.catalog.schema import batches, inbox_problems
from vbs_resources.catalog.store import Store, UnknownCursor
from vbs_resources.wire import (
    BATCH_STATUSES,
    TERMINAL_STATUSES,
    BatchErrors,
    BatchObject,
    RequestCounts,
)

# The timestamp column each status stamps when a batch enters it.
STATUS_TIMESTAMP = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}

# Point reads answer every API poll: built once, so each call only binds the id.
_BATCH_BY_ID = sa.select(batches).where(batches.c.id == sa.bindparam("id"))
_NOT_TERMINAL = batches.c.status.not_in(sorted(TERMINAL_STATUSES))


class BatchStore(Store):
    """The ``batches`` table."""

    def insert(self, row: dict[str, Any]) -> bool:
        """Insert a batch row; False when the id exists already (a re-drop, a repeated tick, or
        another process inserting the same id at the same moment)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(batches.insert().values(**row, updated_at=time.time()))
        except sa.exc.IntegrityError:
            return False
        return True

    def unfinished_by(self, created_by: str) -> int:
        """How many batches ``created_by`` created that have not ended."""
        query = sa.select(sa.func.count()).where(
            batches.c.created_by == created_by,
            batches.c.status.in_(("validating", "in_progress", "finalizing", "cancelling")),
        )
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    def delete_new(self, batch_id: str) -> None:
        """Undo ``insert_batch`` for a batch whose input could not be put in place: only while it
        is ``validating`` and no run has taken it."""
        with self.engine.begin() as conn:
            conn.execute(
                batches.delete().where(
                    batches.c.id == batch_id,
                    batches.c.status == "validating",
                    batches.c.run_id.is_(None),
                )
            )

    def latest_named(self, filename: str) -> dict[str, Any] | None:
        query = (
            sa.select(batches)
            .where(batches.c.original_filename == filename)
            .order_by(batches.c.created_at.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    def get(self, batch_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        with self._reading(conn) as conn:
            row = conn.execute(_BATCH_BY_ID, {"id": batch_id}).mappings().first()
        return dict(row) if row else None

    def list(
        self, limit: int = 100, after: str | None = None, conn: sa.Connection | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; ``after`` is the id of the last batch of the previous page."""
        order = (batches.c.created_at.desc(), batches.c.id.desc())
        query = sa.select(batches).order_by(*order).limit(limit)
        with self._reading(conn) as conn:
            if after is not None:
                anchor = conn.execute(
                    sa.select(batches.c.created_at, batches.c.id).where(batches.c.id == after)
                ).first()
                if anchor is None:
                    raise UnknownCursor("batch", after)
                query = query.where(
                    sa.or_(
                        batches.c.created_at < anchor.created_at,
                        sa.and_(
                            batches.c.created_at == anchor.created_at, batches.c.id < anchor.id
                        ),
                    )
                )
            return [dict(r) for r in conn.execute(query).mappings()]

    def unfinished(self) -> list[dict[str, Any]]:
        """Batches not yet in a terminal status, oldest first."""
        return self._all(sa.select(batches).where(_NOT_TERMINAL).order_by(batches.c.created_at))

    def ended_since(self, updated_after: float, limit: int = 500) -> list[dict[str, Any]]:
        """Batches in a terminal status, last changed at or after ``updated_after``, the oldest
        change first (id, status, metadata and when they changed)."""
        query = (
            sa.select(
                batches.c.id, batches.c.status, batches.c.batch_metadata, batches.c.updated_at
            )
            .where(~_NOT_TERMINAL, batches.c.updated_at >= updated_after)
            .order_by(batches.c.updated_at, batches.c.id)
            .limit(limit)
        )
        return self._all(query)

    def transition(
        self,
        batch_id: str,
        to: str,
        allowed_from: Iterable[str],
        event: tuple[str, str] | None = None,
        **fields: Any,
    ) -> bool:
        """Move a batch to ``to`` if its status is one of ``allowed_from``, in one conditional
        update that also stamps the status's ``*_at`` column and writes ``fields``; with
        ``event`` (id, type) the event is recorded in the same transaction. Only
        ``vbs_resources.lifecycle`` calls this. True when this call made the change."""
        if to not in BATCH_STATUSES:
            raise ValueError(f"unknown batch status {to!r}")
        values: dict[str, Any] = dict(fields, status=to, updated_at=time.time())
        now = int(time.time())
        if to in STATUS_TIMESTAMP:
            column = batches.c[STATUS_TIMESTAMP[to]]
            values[column.name] = sa.func.coalesce(column, now)
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, batches.c.status.in_(list(allowed_from)))
                .values(**values)
            ).rowcount
            if changed and event is not None:
                EventStore.add(conn, event[0], batch_id, event[1])
        return bool(changed)

    def update_unfinished(self, batch_id: str, **fields: Any) -> bool:
        """Write ``fields`` (counts, usage, endpoint, ...) unless the batch is in a terminal
        status, which no write may change. True when the row was updated."""
        if "status" in fields:
            raise ValueError("status changes go through the lifecycle")
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, _NOT_TERMINAL)
                .values(**fields, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def claim(self, batch_id: str, run_id: str, holder: str | None) -> bool:
        """Make ``run_id`` the batch's run if the run holding it is still ``holder`` (compare
        and swap, so of two runs racing for a batch one wins). Refused for terminal batches."""
        holder_is = batches.c.run_id.is_(None) if holder is None else batches.c.run_id == holder
        with self.engine.begin() as conn:
            changed = conn.execute(
                batches.update()
                .where(batches.c.id == batch_id, _NOT_TERMINAL, holder_is)
                .values(run_id=run_id, updated_at=time.time())
            ).rowcount
        return bool(changed)

    def count_by_status(self, conn: sa.Connection | None = None) -> dict[str, int]:
        return self._count_by(batches.c.status, conn)

    def durations(
        self, buckets: tuple[float, ...], conn: sa.Connection | None = None
    ) -> dict[tuple[str, str], tuple[list[int], int, float]]:
        """Ended batches' durations as cumulative histograms, counted in the database: by
        ``(phase, status)``, phase ``total`` (created to ended) or ``running`` (in progress to
        ended), each ``(count at or under each bucket, count, sum of seconds)``."""
        ended = sa.func.coalesce(
            batches.c.completed_at, batches.c.failed_at, batches.c.cancelled_at,
            batches.c.expired_at,
        )  # fmt: skip
        found = {}
        for phase, start in (
            ("total", batches.c.created_at),
            ("running", batches.c.in_progress_at),
        ):
            seconds = ended - start
            columns = [sa.func.sum(sa.case((seconds <= b, 1), else_=0)) for b in buckets]
            query = (
                sa.select(batches.c.status, sa.func.count(), sa.func.sum(seconds), *columns)
                .where(batches.c.status.in_(sorted(TERMINAL_STATUSES)), start.is_not(None))
                .where(ended.is_not(None))
                .group_by(batches.c.status)
            )
            with self._reading(conn) as c:
                for status, count, total, *cumulative in c.execute(query):
                    found[(phase, status)] = ([int(n or 0) for n in cumulative], count, total or 0)
        return found

    def output_tokens_per_second(self, since: float, conn: sa.Connection | None = None) -> float:
        """Output tokens over running seconds of the batches that ended after ``since``."""
        ended = sa.func.coalesce(
            batches.c.completed_at, batches.c.cancelled_at, batches.c.expired_at
        )
        query = sa.select(batches.c.usage, batches.c.in_progress_at, ended).where(
            ended >= since, batches.c.in_progress_at.is_not(None)
        )
        tokens, seconds = 0, 0.0
        with self._reading(conn) as c:
            for usage, started, stopped in c.execute(query):
                tokens += (usage or {}).get("output_tokens", 0)
                seconds += max(stopped - started, 1)
        return tokens / seconds if seconds else 0.0

    def totals(self) -> dict[str, int]:
        """Requests and tokens processed over all batches (for /metrics)."""
        query = sa.select(
            sa.func.coalesce(sa.func.sum(batches.c.request_completed), 0),
            sa.func.coalesce(sa.func.sum(batches.c.request_failed), 0),
        )
        with self.engine.connect() as conn:
            completed, failed = conn.execute(query).one()
            usages = conn.execute(sa.select(batches.c.usage)).scalars()
            tokens = {"input_tokens": 0, "output_tokens": 0}
            for usage in usages:
                for key in tokens:
                    tokens[key] += (usage or {}).get(key, 0)
        return {"requests_completed": completed, "requests_failed": failed, **tokens}


def batch_object(row: dict[str, Any]) -> BatchObject:
    """The OpenAI Batch object of a catalog row."""
    errors = row.get("errors")
    return BatchObject(
        id=row["id"],
        endpoint=row["endpoint"],
        errors=BatchErrors(data=errors) if errors else None,
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        status=row["status"],
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        created_at=row["created_at"],
        in_progress_at=row["in_progress_at"],
        expires_at=row["expires_at"],
        finalizing_at=row["finalizing_at"],
        completed_at=row["completed_at"],
        failed_at=row["failed_at"],
        expired_at=row["expired_at"],
        cancelling_at=row["cancelling_at"],
        cancelled_at=row["cancelled_at"],
        request_counts=RequestCounts(
            total=row["request_total"],
            completed=row["request_completed"],
            failed=row["request_failed"],
        ),
        usage=row["usage"],
        metadata=row["batch_metadata"] or None,
    )


class InboxStore(Store):
    """What the inbox sensor could not take, and why: shown in its ticks and by ``vbs inbox``."""

    def set_problems(self, problems: dict[str, tuple[str, str]]) -> dict[str, str]:
        """Replace the recorded problems with ``problems`` (name -> (kind, message)); returns the
        ones that are new or whose message changed, to be reported once."""
        now = time.time()
        fresh: dict[str, str] = {}
        with self.engine.begin() as conn:
            known = {
                r.name: r
                for r in conn.execute(sa.select(inbox_problems.c.name, inbox_problems.c.message))
            }
            gone = set(known) - set(problems)
            if gone:
                conn.execute(inbox_problems.delete().where(inbox_problems.c.name.in_(gone)))
            for name, (kind, message) in problems.items():
                message = message[:1000]
                if name not in known:
                    conn.execute(
                        inbox_problems.insert().values(
                            name=name, kind=kind, message=message, first_seen=now, last_seen=now
                        )
                    )
                    fresh[name] = message
                else:
                    conn.execute(
                        inbox_problems.update()
                        .where(inbox_problems.c.name == name)
                        .values(kind=kind, message=message, last_seen=now)
                    )
                    if known[name].message != message:
                        fresh[name] = message
        return fresh

    def problems(self, conn: sa.Connection | None = None) -> list[dict[str, Any]]:
        return self._all(sa.select(inbox_problems).order_by(inbox_problems.c.name), conn)
