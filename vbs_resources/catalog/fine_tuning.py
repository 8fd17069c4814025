"""Fine-tuning jobs, in OpenAI's job shape, and their events."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import fine_tuning_events, fine_tuning_jobs
from vbs_resources.catalog.store import Store

JOB_TERMINAL = ("succeeded", "failed", "cancelled")


class FineTuningStore(Store):
    """The ``fine_tuning_jobs`` and ``fine_tuning_events`` tables."""

    def insert(self, row: dict[str, Any]) -> dict[str, Any]:
        with self.engine.begin() as conn:
            conn.execute(fine_tuning_jobs.insert().values(updated_at=time.time(), **row))
        return self.get(row["id"])

    def get(self, job_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(fine_tuning_jobs).where(fine_tuning_jobs.c.id == job_id), conn)
        return rows[0] if rows else None

    def list(
        self,
        limit: int = 20,
        after: str | None = None,
        dataset_version: str | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs, newest first, after the job ``after``; ``limit + 1`` rows at most."""
        query = sa.select(fine_tuning_jobs)
        if dataset_version is not None:
            query = query.where(fine_tuning_jobs.c.dataset_version == dataset_version)
        if status is not None:
            query = query.where(fine_tuning_jobs.c.status == status)
        if after is not None:
            anchor = self.get(after)
            if anchor is None:
                return []
            query = query.where(
                sa.tuple_(fine_tuning_jobs.c.created_at, fine_tuning_jobs.c.id)
                < sa.tuple_(sa.literal(anchor["created_at"]), sa.literal(anchor["id"]))
            )
        query = query.order_by(
            fine_tuning_jobs.c.created_at.desc(), fine_tuning_jobs.c.id.desc()
        ).limit(limit + 1)
        return self._all(query)

    def update(self, job_id: str, **values: Any) -> bool:
        """Change a job that has not ended (its status, run, result); False when it has ended,
        and so nothing was changed: a finished job's outcome is never rewritten."""
        with self.engine.begin() as conn:
            done = conn.execute(
                fine_tuning_jobs.update()
                .where(
                    fine_tuning_jobs.c.id == job_id,
                    fine_tuning_jobs.c.status.not_in(JOB_TERMINAL),
                )
                .values(updated_at=time.time(), **values)
            )
        return bool(done.rowcount)

    def reopen(self, job_id: str, run_id: str) -> bool:
        """Give a job whose run died (ended ``failed`` with ``run_failed`` by whoever noticed)
        to the run that retries it; a job that failed for a reason of its own stays failed."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(fine_tuning_jobs.c.error).where(
                    fine_tuning_jobs.c.id == job_id, fine_tuning_jobs.c.status == "failed"
                )
            ).first()
            if row is None or (row.error or {}).get("code") != "run_failed":
                return False
            conn.execute(
                fine_tuning_jobs.update()
                .where(fine_tuning_jobs.c.id == job_id)
                .values(
                    status="running", run_id=run_id, error=None, finished_at=None,
                    updated_at=time.time(),
                )
            )  # fmt: skip
        return True

    def annotate(self, job_id: str, **values: Any) -> None:
        """Record what happens after a job ended (its evaluation, its deployment)."""
        with self.engine.begin() as conn:
            conn.execute(
                fine_tuning_jobs.update()
                .where(fine_tuning_jobs.c.id == job_id)
                .values(updated_at=time.time(), **values)
            )

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
                fine_tuning_events.insert().values(
                    job_id=job_id,
                    created_at=int(time.time()),
                    level=level,
                    type=kind,
                    message=message[:2000],
                    data=data,
                )
            )

    def events(
        self, job_id: str, limit: int = 20, after: int | None = None
    ) -> list[dict[str, Any]]:
        """A job's events, newest first (as OpenAI lists them), ``limit + 1`` at most."""
        query = sa.select(fine_tuning_events).where(fine_tuning_events.c.job_id == job_id)
        if after is not None:
            query = query.where(fine_tuning_events.c.id < after)
        query = query.order_by(fine_tuning_events.c.id.desc()).limit(limit + 1)
        return self._all(query)
