"""What every store of the catalog shares: the catalog's one engine, and reads that may run on a
connection the caller holds."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from vbs_resources.catalog import Catalog


class Store:
    """One entity's tables and the queries on them, over the catalog's engine."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    @property
    def engine(self) -> sa.Engine:
        return self._catalog.engine

    def _reading(self, conn: sa.Connection | None) -> AbstractContextManager[sa.Connection]:
        return nullcontext(conn) if conn is not None else self.engine.connect()

    def _all(self, query: sa.Select, conn: sa.Connection | None = None) -> list[dict[str, Any]]:
        with self._reading(conn) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def _first(self, query: sa.Select, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(query.limit(1), conn)
        return rows[0] if rows else None

    def _count_by(self, column: sa.Column, conn: sa.Connection | None = None) -> dict[str, int]:
        """Rows of ``column``'s table by its value (for /metrics)."""
        query = sa.select(column, sa.func.count()).group_by(column)
        with self._reading(conn) as conn:
            return {value: n for value, n in conn.execute(query)}


class UnknownCursor(LookupError):
    """A list's ``after`` names nothing it lists: the API answers 400, naming ``after``."""

    def __init__(self, what: str, cursor: str) -> None:
        super().__init__(f"No {what} {cursor[:100]!r} to list after.")
        self.message = str(self)
