"""Curated dataset versions: one row per version (the content hash of its files) with the
conquests it was made of; every build of a version with its blocking checks; and the side each
prompt of a type was first given."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import dataset_builds, dataset_splits, datasets
from vbs_resources.catalog.store import Store, UnknownCursor


class DatasetStore(Store):
    """The ``datasets``, ``dataset_builds`` and ``dataset_splits`` tables."""

    def record(
        self,
        row: dict[str, Any],
        checks: dict[str, Any] | None = None,
        splits: dict[str, str] | None = None,
    ) -> bool:
        """Record a built version, the build (by its ``run_id``, with its blocking ``checks``)
        and the sides of the prompts it gave one first (``splits``: prompt key -> side), in one
        transaction; True when the version is new. Building a version again keeps its row (its
        conquests, its first build) and notes the run, time and checks of this build."""
        passed = all(c.get("passed") for c in (checks or {}).values())
        again = (
            datasets.update()
            .where(datasets.c.version == row["version"])
            .values(run_id=row.get("run_id"), built_at=row["built_at"], checks=checks)
        )
        for attempt in range(2):
            try:
                with self.engine.begin() as conn:
                    new = not conn.execute(again).rowcount
                    if new:
                        conn.execute(datasets.insert().values(**row, checks=checks))
                    if row.get("run_id") and checks is not None:
                        conn.execute(
                            dataset_builds.delete().where(dataset_builds.c.run_id == row["run_id"])
                        )
                        conn.execute(
                            dataset_builds.insert().values(
                                run_id=row["run_id"],
                                version=row["version"],
                                type=row["type"],
                                checks=checks,
                                passed=passed,
                                built_at=row["built_at"],
                            )
                        )
                    if splits:
                        self._assign(conn, row["type"], row["version"], splits)
                    return new
            except sa.exc.IntegrityError:
                # The same version (or the same prompt's side) recorded by a build running
                # alongside: once more, finding its rows.
                if attempt:
                    raise
        return False

    @staticmethod
    def _assign(conn: sa.Connection, type_id: str, version: str, splits: dict[str, str]) -> None:
        known = set(
            conn.execute(
                sa.select(dataset_splits.c.prompt_key).where(
                    dataset_splits.c.type == type_id,
                    dataset_splits.c.prompt_key.in_(list(splits)),
                )
            ).scalars()
        )
        now = time.time()
        new = [
            {"type": type_id, "prompt_key": k, "side": s, "version": version, "assigned_at": now}
            for k, s in splits.items()
            if k not in known
        ]
        if new:
            conn.execute(dataset_splits.insert(), new)

    def sides(self, type_id: str) -> dict[str, str]:
        """The side (``train`` or ``eval``) each prompt of a type was first given."""
        query = sa.select(dataset_splits.c.prompt_key, dataset_splits.c.side).where(
            dataset_splits.c.type == type_id
        )
        with self.engine.connect() as conn:
            return {key: side for key, side in conn.execute(query)}

    def build_of_run(self, run_id: str) -> dict[str, Any] | None:
        """The build a Dagster run made (its version and blocking checks)."""
        return self._first(sa.select(dataset_builds).where(dataset_builds.c.run_id == run_id))

    def get(self, version: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        return self._first(sa.select(datasets).where(datasets.c.version == version), conn)

    def list(
        self,
        type_id: str | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Versions, the most recently built first, after the version ``after``
        (``UnknownCursor`` if there is none); ``limit + 1`` rows at most (the caller tells
        whether more follow)."""
        query = sa.select(datasets)
        if type_id is not None:
            query = query.where(datasets.c.type == type_id)
        if after is not None:
            anchor = self.get(after, conn)
            if anchor is None:
                raise UnknownCursor("dataset version", after)
            query = query.where(
                sa.tuple_(datasets.c.built_at, datasets.c.version)
                < sa.tuple_(sa.literal(anchor["built_at"]), sa.literal(after))
            )
        query = query.order_by(datasets.c.built_at.desc(), datasets.c.version.desc())
        return self._all(query.limit(limit + 1), conn)
