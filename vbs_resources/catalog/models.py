"""The model registry's rows: what the engine serves, by the name requests use. Rows are never
deleted: a retired model keeps its row (and its files), so lineage always resolves."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import models
from vbs_resources.catalog.store import Store


class ModelStore(Store):
    """The ``models`` table."""

    def get(self, name: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(models).where(models.c.name == name), conn)
        return rows[0] if rows else None

    def list(
        self, include_retired: bool = False, conn: sa.Connection | None = None
    ) -> list[dict[str, Any]]:
        query = sa.select(models).order_by(models.c.created_at, models.c.name)
        if not include_retired:
            query = query.where(models.c.status == "available")
        return self._all(query, conn)

    def insert(self, row: dict[str, Any]) -> bool:
        """Register a model; False when the name is taken (retired names stay taken). An
        adapter gets the next free ``lora_id`` in the same transaction."""
        try:
            with self.engine.begin() as conn:
                if row.get("kind") == "adapter":
                    highest = conn.execute(sa.select(sa.func.max(models.c.lora_id))).scalar()
                    row = {**row, "lora_id": (highest or 0) + 1}
                conn.execute(models.insert().values(**row))
        except sa.exc.IntegrityError:
            return False
        return True

    def update_configured(
        self, name: str, kind: str, path: str, options: dict[str, Any] | None
    ) -> None:
        """Keep a configured (base or embedding) model's path and serving options in step with
        the settings; a model retired by hand stays retired."""
        with self.engine.begin() as conn:
            conn.execute(
                models.update()
                .where(models.c.name == name, models.c.kind == kind)
                .values(path=path, options=options)
            )

    def retire(self, name: str) -> bool:
        with self.engine.begin() as conn:
            changed = conn.execute(
                models.update()
                .where(models.c.name == name, models.c.status == "available")
                .values(status="retired", retired_at=int(time.time()))
            ).rowcount
        return bool(changed)

    def redeploy(self, name: str, lineage: dict[str, Any]) -> bool:
        """Make a retired adapter available again, with the same files and LoRA id (a rollback
        deploys an earlier fine-tuned model once more); its lineage gains this deployment."""
        with self.engine.begin() as conn:
            changed = conn.execute(
                models.update()
                .where(models.c.name == name, models.c.kind == "adapter")
                .values(status="available", retired_at=None, lineage=lineage)
            ).rowcount
        return bool(changed)
