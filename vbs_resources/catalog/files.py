"""Files: uploads (``/v1/files``) and the result files of batches, by opaque id."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import files
from vbs_resources.catalog.store import Store, UnknownCursor
from vbs_resources.wire import FileObject

_FILE_BY_ID = sa.select(files).where(files.c.id == sa.bindparam("id"), files.c.deleted.is_(False))


class FileStore(Store):
    """The ``files`` table."""

    def create(
        self,
        file_id: str,
        *,
        filename: str,
        purpose: str,
        size: int,
        path: str,
        sha256: str | None = None,
    ) -> dict[str, Any]:
        row = dict(
            id=file_id,
            filename=filename,
            purpose=purpose,
            bytes=size,
            path=path,
            created_at=int(time.time()),
            deleted=False,
            sha256=sha256,
        )
        with self.engine.begin() as conn:
            # A batch's result files are registered under ids derived from the batch id.
            conn.execute(files.delete().where(files.c.id == file_id))
            conn.execute(files.insert().values(**row))
        return row

    def get(self, file_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        with self._reading(conn) as conn:
            row = conn.execute(_FILE_BY_ID, {"id": file_id}).mappings().first()
        return dict(row) if row else None

    def list(
        self,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        order: str = "desc",
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Files by ``created_at`` (then id) in ``order``; ``after`` is the last id of the
        previous page. Ask for one more than a page to learn whether there is another."""
        desc = order == "desc"
        keys = (files.c.created_at, files.c.id)
        query = sa.select(files).where(files.c.deleted.is_(False))
        if purpose:
            query = query.where(files.c.purpose == purpose)
        with self._reading(conn) as conn:
            if after is not None:
                anchor = conn.execute(sa.select(*keys).where(files.c.id == after)).first()
                if anchor is None:
                    raise UnknownCursor("file", after)
                beyond = (
                    sa.tuple_(*keys) < tuple(anchor) if desc else sa.tuple_(*keys) > tuple(anchor)
                )
                query = query.where(beyond)
            ordering = [k.desc() if desc else k.asc() for k in keys]
            query = query.order_by(*ordering).limit(limit)
            return [dict(r) for r in conn.execute(query).mappings()]

    def delete(self, file_id: str) -> dict[str, Any] | None:
        """Mark a file deleted; returns its row (the caller removes the bytes) or None."""
        with self.engine.begin() as conn:
            row = conn.execute(_FILE_BY_ID, {"id": file_id}).mappings().first()
            if row is None:
                return None
            conn.execute(files.update().where(files.c.id == file_id).values(deleted=True))
        return dict(row)


def file_object(row: dict[str, Any]) -> FileObject:
    return FileObject(
        id=row["id"],
        bytes=row["bytes"],
        created_at=row["created_at"],
        filename=row["filename"],
        purpose=row["purpose"],
    )
