"""Fine-tuning jobs (OpenAI's job shape) with their events, and their deployments.

A job's and a deployment's ``status`` change only through ``transition``, one conditional update
that ``vbs_resources.training.lifecycle`` drives, with the job's event (and, for an ending, the
webhook event in the outbox) written in the same transaction. Every other write is refused once
the job or the deployment has ended.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.outbox import EventStore
from vbs_resources.catalog.schema import (
    DEPLOYMENT_IN_FLIGHT,
    deployments,
    fine_tuning_events,
    fine_tuning_jobs,
)
from vbs_resources.catalog.store import Store, UnknownCursor

JOB_TERMINAL = ("succeeded", "failed", "cancelled")
DEPLOYMENT_TERMINAL = ("succeeded", "failed")


def _event_row(
    job_id: str, message: str, level: str, kind: str, data: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "created_at": int(time.time()),
        "level": level,
        "type": kind,
        "message": message[:2000],
        "data": data,
    }


class FineTuningStore(Store):
    """The ``fine_tuning_jobs`` and ``fine_tuning_events`` tables."""

    def count_by_status(self, conn: sa.Connection | None = None) -> dict[str, int]:
        return self._count_by(fine_tuning_jobs.c.status, conn)

    def insert(self, row: dict[str, Any], message: str) -> dict[str, Any]:
        """Record a new job with its first event."""
        with self.engine.begin() as conn:
            conn.execute(fine_tuning_jobs.insert().values(updated_at=time.time(), **row))
            conn.execute(
                fine_tuning_events.insert().values(
                    **_event_row(row["id"], message, "info", "message", None)
                )
            )
        return self.get(row["id"])

    def get(self, job_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        return self._first(sa.select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id), conn)

    def list(
        self,
        limit: int = 20,
        after: str | None = None,
        dataset_version: str | None = None,
        status: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, after the job ``after`` (``UnknownCursor`` if there is no such
        job); ``limit + 1`` rows at most."""
        query = sa.select(fine_tuning_jobs)
        if dataset_version is not None:
            query = query.where(fine_tuning_jobs.c.dataset_version == dataset_version)
        if status is not None:
            query = query.where(fine_tuning_jobs.c.status == status)
        if after is not None:
            anchor = self.get(after, conn)
            if anchor is None:
                raise UnknownCursor("fine-tuning job", after)
            query = query.where(
                sa.tuple_(fine_tuning_jobs.c.created_at, fine_tuning_jobs.c.id)
                < sa.tuple_(sa.literal(anchor["created_at"]), sa.literal(anchor["id"]))
            )
        query = query.order_by(
            fine_tuning_jobs.c.created_at.desc(), fine_tuning_jobs.c.id.desc()
        ).limit(limit + 1)
        return self._all(query, conn)

    def unfinished(self) -> list[dict[str, Any]]:
        """Jobs that have not ended, oldest first."""
        query = sa.select(fine_tuning_jobs).where(fine_tuning_jobs.c.status.not_in(JOB_TERMINAL))
        return self._all(query.order_by(fine_tuning_jobs.c.created_at))

    def transition(
        self,
        job_id: str,
        to: str,
        allowed_from: Iterable[str],
        *,
        message: str,
        level: str = "info",
        data: dict[str, Any] | None = None,
        webhook: tuple[str, str] | None = None,
        expect: dict[str, Any] | None = None,
        **fields: Any,
    ) -> bool:
        """Move a job to ``to`` if its status is one of ``allowed_from`` (and its columns equal
        ``expect``), in one conditional update that writes ``fields``, the job's event
        ``message`` and, with ``webhook`` (id, type), the outbox's event, all in one
        transaction. Only the fine-tuning lifecycle calls this. True when this call made the
        change."""
        where = [fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status.in_(list(allowed_from))]
        where += [fine_tuning_jobs.c[k] == v for k, v in (expect or {}).items()]
        with self.engine.begin() as conn:
            changed = conn.execute(
                fine_tuning_jobs.update()
                .where(*where)
                .values(**fields, status=to, updated_at=time.time())
            ).rowcount
            if changed:
                conn.execute(
                    fine_tuning_events.insert().values(
                        **_event_row(job_id, message, level, "message", data)
                    )
                )
                if webhook is not None:
                    EventStore.add(conn, webhook[0], job_id, webhook[1])
        return bool(changed)

    def update_unfinished(
        self, job_id: str, *, expect: dict[str, Any] | None = None, **values: Any
    ) -> bool:
        """Write ``values`` (the run, the adapter, a cancel request) to a job that has not ended
        (and whose columns equal ``expect``); False when nothing was changed: a finished job's
        outcome is never rewritten."""
        if "status" in values:
            raise ValueError("status changes go through the fine-tuning lifecycle")
        where = [fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status.not_in(JOB_TERMINAL)]
        where += [fine_tuning_jobs.c[k] == v for k, v in (expect or {}).items()]
        with self.engine.begin() as conn:
            done = conn.execute(
                fine_tuning_jobs.update().where(*where).values(updated_at=time.time(), **values)
            )
        return bool(done.rowcount)

    def record_evaluation(self, job_id: str, evaluation: dict[str, Any], message: str) -> bool:
        """Replace the evaluation of a job that succeeded (its adapter evaluated again), with
        its event; False for a job that has not succeeded."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                fine_tuning_jobs.update()
                .where(fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status == "succeeded")
                .values(evaluation=evaluation, updated_at=time.time())
            ).rowcount
            if changed:
                conn.execute(
                    fine_tuning_events.insert().values(
                        **_event_row(job_id, message, "info", "metrics", evaluation)
                    )
                )
        return bool(changed)

    def add_event(
        self,
        job_id: str,
        message: str,
        level: str = "info",
        kind: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                fine_tuning_events.insert().values(**_event_row(job_id, message, level, kind, data))
            )

    def events(
        self,
        job_id: str,
        limit: int = 20,
        after: int | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """A job's events, newest first (as OpenAI lists them), ``limit + 1`` at most, after the
        event ``after`` of this job (``UnknownCursor`` if it has no such event)."""
        query = sa.select(fine_tuning_events).where(fine_tuning_events.c.job_id == job_id)
        if after is not None:
            known = sa.select(fine_tuning_events.c.id).where(
                fine_tuning_events.c.id == after, fine_tuning_events.c.job_id == job_id
            )
            if self._first(known, conn) is None:
                raise UnknownCursor("event of this job", f"ftevent-{after}")
            query = query.where(fine_tuning_events.c.id < after)
        query = query.order_by(fine_tuning_events.c.id.desc()).limit(limit + 1)
        return self._all(query, conn)


class DeploymentStore(Store):
    """The ``deployments`` table: at most one deployment of a job in flight (a unique index)."""

    def count_by_status(self, conn: sa.Connection | None = None) -> dict[str, int]:
        return self._count_by(deployments.c.status, conn)

    def insert(self, row: dict[str, Any], message: str) -> tuple[dict[str, Any], bool]:
        """Record a deployment in ``queued`` with its event on the job; when the job has one in
        flight already, that one and False (concurrent deploys collapse into one)."""
        try:
            with self.engine.begin() as conn:
                conn.execute(deployments.insert().values(updated_at=time.time(), **row))
                conn.execute(
                    fine_tuning_events.insert().values(
                        **_event_row(row["job_id"], message, "info", "message", None)
                    )
                )
        except sa.exc.IntegrityError:
            found = self.in_flight_of(row["job_id"])
            if found is None:  # it ended in between: a new one may start now
                return self.insert(row, message)
            return found, False
        return self.get(row["id"]), True

    def get(self, deployment_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        return self._first(sa.select(deployments).where(deployments.c.id == deployment_id), conn)

    def in_flight_of(self, job_id: str) -> dict[str, Any] | None:
        query = sa.select(deployments).where(
            deployments.c.job_id == job_id, deployments.c.status.in_(DEPLOYMENT_IN_FLIGHT)
        )
        return self._first(query)

    def of_job(self, job_id: str, conn: sa.Connection | None = None) -> list[dict[str, Any]]:
        """A job's deployments, newest first."""
        query = sa.select(deployments).where(deployments.c.job_id == job_id)
        return self._all(query.order_by(deployments.c.created_at.desc(), deployments.c.id), conn)

    def in_flight(self) -> list[dict[str, Any]]:
        query = sa.select(deployments).where(deployments.c.status.in_(DEPLOYMENT_IN_FLIGHT))
        return self._all(query.order_by(deployments.c.created_at))

    def transition(
        self,
        deployment_id: str,
        to: str,
        allowed_from: Iterable[str],
        *,
        message: str,
        level: str = "info",
        **fields: Any,
    ) -> bool:
        """Move a deployment to ``to`` if its status is one of ``allowed_from``, with its event on
        the job, in one transaction. Only the fine-tuning lifecycle calls this."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(deployments.c.job_id).where(deployments.c.id == deployment_id)
            ).first()
            if row is None:
                return False
            changed = conn.execute(
                deployments.update()
                .where(
                    deployments.c.id == deployment_id,
                    deployments.c.status.in_(list(allowed_from)),
                )
                .values(**fields, status=to, updated_at=time.time())
            ).rowcount
            if changed:
                conn.execute(
                    fine_tuning_events.insert().values(
                        **_event_row(row.job_id, message, level, "message", None)
                    )
                )
        return bool(changed)

    def update_in_flight(self, deployment_id: str, **values: Any) -> bool:
        """Write ``values`` (its run) to a deployment that has not ended."""
        if "status" in values:
            raise ValueError("status changes go through the fine-tuning lifecycle")
        with self.engine.begin() as conn:
            done = conn.execute(
                deployments.update()
                .where(
                    deployments.c.id == deployment_id,
                    deployments.c.status.in_(DEPLOYMENT_IN_FLIGHT),
                )
                .values(updated_at=time.time(), **values)
            )
        return bool(done.rowcount)
