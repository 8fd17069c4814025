"""Curated dataset versions: one row per version (the content hash of its files) with the
conquests it was made of."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import datasets
from vbs_resources.catalog.store import Store


class DatasetStore(Store):
    """The ``datasets`` table."""

    def record(self, row: dict[str, Any]) -> bool:
        """Record a built version; True when it is new. Building a version again keeps its row
        (its conquests, its first build) and notes the run and time of this build."""
        again = (
            datasets.update()
            .where(datasets.c.version == row["version"])
            .values(run_id=row.get("run_id"), built_at=row["built_at"])
        )
        try:
            with self.engine.begin() as conn:
                if conn.execute(again).rowcount:
                    return False
                conn.execute(datasets.insert().values(**row))
                return True
        except sa.exc.IntegrityError:  # the same version recorded by a build running alongside
            with self.engine.begin() as conn:
                conn.execute(again)
            return False

    def get(self, version: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(datasets).where(datasets.c.version == version), conn)
        return rows[0] if rows else None

    def list(
        self,
        type_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Versions, the most recently built first, after the version ``after``; ``limit + 1``
        rows at most (the caller tells whether more follow)."""
        query = sa.select(datasets)
        if type_id is not None:
            query = query.where(datasets.c.type == type_id)
        if after is not None:
            anchor = sa.select(datasets.c.built_at).where(datasets.c.version == after)
            query = query.where(
                sa.tuple_(datasets.c.built_at, datasets.c.version)
                < sa.tuple_(anchor.scalar_subquery(), sa.literal(after))
            )
        query = query.order_by(datasets.c.built_at.desc(), datasets.c.version.desc())
        return self._all(query.limit(limit + 1), conn)
