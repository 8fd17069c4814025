"""Curation: conquests, what curators said of them (the newest edit and the history it
replaced), and the Label Studio project and task of each."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from vbs_resources.catalog.schema import (
    ANNOTATION_FIELDS,
    annotation_history,
    annotations,
    conquest_history,
    conquests,
    label_studio_projects,
    label_studio_tasks,
)
from vbs_resources.catalog.store import Store, UnknownCursor


def _is(column: sa.Column, value: str | None) -> sa.ColumnElement:
    return column.is_(None) if value is None else column == value


def _shown(value: str | None) -> str | None:
    return None if value is None else str(value)[:16]


class ConquestStore(Store):
    """The ``conquests``, ``annotations`` and ``annotation_history`` tables."""

    def add(self, rows: list[dict[str, Any]]) -> int:
        """Insert the conquests not there yet (by id); the number inserted. Rows already there
        keep their state (annotations, result): making a batch's conquests again adds nothing."""
        if not rows:
            return 0
        ids = [row["id"] for row in rows]
        with self.engine.begin() as conn:
            known = set(
                conn.execute(sa.select(conquests.c.id).where(conquests.c.id.in_(ids))).scalars()
            )
            new = [row for row in rows if row["id"] not in known]
            if new:
                conn.execute(conquests.insert(), new)
        return len(new)

    def get(self, conquest_id: str, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        rows = self._all(sa.select(conquests).where(conquests.c.id == conquest_id), conn)
        return rows[0] if rows else None

    def of_batch(self, batch_id: str) -> list[dict[str, Any]]:
        query = sa.select(conquests).where(conquests.c.batch_id == batch_id)
        return self._all(query.order_by(conquests.c.id))

    def record_annotation(
        self,
        conquest_id: str,
        values: dict[str, Any],
        result: str | None,
        results_on: tuple[str, ...],
        source: str,
    ) -> str:
        """Record an edit (``ANNOTATION_FIELDS``). The newest edit (by ``edited_at``) is the
        conquest's annotation and sets its ``result`` when its status is one of ``results_on``
        (a change written to ``conquest_history`` in the same transaction); every edit it
        replaces, and an edit older than the current one, goes to the annotation history.
        Returns ``new``, ``updated``, ``older`` (kept in the history only) or ``unchanged``
        (the same edit seen again). Only the conquest lifecycle calls this."""
        now = time.time()
        row = {name: values.get(name) for name in ANNOTATION_FIELDS}
        with self.engine.begin() as conn:
            current = (
                conn.execute(sa.select(annotations).where(annotations.c.conquest_id == conquest_id))
                .mappings()
                .first()
            )
            if current is not None:
                kept = {name: current[name] for name in ANNOTATION_FIELDS}
                if kept == row:
                    return "unchanged"
                if (current["edited_at"] or 0) > (row["edited_at"] or 0):
                    conn.execute(
                        annotation_history.insert().values(
                            conquest_id=conquest_id, replaced_at=now, **row
                        )
                    )
                    return "older"
                conn.execute(
                    annotation_history.insert().values(
                        conquest_id=conquest_id, replaced_at=now, **kept
                    )
                )
                conn.execute(
                    annotations.update()
                    .where(annotations.c.conquest_id == conquest_id)
                    .values(recorded_at=now, **row)
                )
            else:
                conn.execute(
                    annotations.insert().values(conquest_id=conquest_id, recorded_at=now, **row)
                )
            self._change(conn, conquest_id, "result", result, {"status": results_on}, source, None)
        return "new" if current is None else "updated"

    @staticmethod
    def _change(
        conn: sa.Connection,
        conquest_id: str,
        column: str,
        to: str | None,
        where: dict[str, tuple[str | None, ...]],
        source: str,
        note: str | None,
        **fields: Any,
    ) -> bool:
        """One conditional update of ``column`` (and ``fields``) where each column of ``where``
        holds one of its values and ``column`` is not ``to`` already, with its history row."""
        before = conn.execute(
            sa.select(conquests.c[column]).where(conquests.c.id == conquest_id)
        ).scalar()
        conditions = [conquests.c.id == conquest_id, _is(conquests.c[column], before)]
        for name, allowed in where.items():
            conditions.append(sa.or_(*(_is(conquests.c[name], value) for value in allowed)))
        if before == to:
            return False
        changed = conn.execute(
            conquests.update()
            .where(*conditions)
            .values({column: to, "updated_at": time.time(), **fields})
        ).rowcount
        if changed:
            conn.execute(
                conquest_history.insert().values(
                    conquest_id=conquest_id,
                    field=column,
                    before=_shown(before),
                    after=_shown(to),
                    source=source,
                    note=note,
                    at=time.time(),
                )
            )
        return bool(changed)

    def transition(
        self,
        conquest_id: str,
        column: str,
        to: str | None,
        allowed_from: tuple[str | None, ...],
        *,
        source: str,
        note: str | None = None,
        **fields: Any,
    ) -> bool:
        """Change a conquest's ``column`` (``status``, ``result``) to ``to`` if it holds one of
        ``allowed_from``, with its history row, in one transaction. Only the conquest lifecycle
        calls this."""
        with self.engine.begin() as conn:
            return self._change(
                conn, conquest_id, column, to, {column: allowed_from}, source, note, **fields
            )

    def set_excluded(self, conquest_id: str, reason: str | None, source: str) -> bool:
        """Exclude a conquest (with its ``reason``) or take it back (None), with its history row;
        False when it already is as asked. Only the conquest lifecycle calls this."""
        excluding = reason is not None
        now = time.time()
        with self.engine.begin() as conn:
            changed = conn.execute(
                conquests.update()
                .where(
                    conquests.c.id == conquest_id,
                    conquests.c.excluded_at.is_(None)
                    if excluding
                    else conquests.c.excluded_at.is_not(None),
                )
                .values(
                    excluded_at=now if excluding else None,
                    excluded_reason=reason,
                    updated_at=now,
                )
            ).rowcount
            if changed:
                conn.execute(
                    conquest_history.insert().values(
                        conquest_id=conquest_id,
                        field="excluded",
                        before="no" if excluding else "yes",
                        after="yes" if excluding else "no",
                        source=source,
                        note=reason,
                        at=now,
                    )
                )
        return bool(changed)

    def history_of(self, conquest_id: str) -> list[dict[str, Any]]:
        query = sa.select(conquest_history).where(conquest_history.c.conquest_id == conquest_id)
        return self._all(query.order_by(conquest_history.c.id))

    def annotation_of(self, conquest_id: str) -> dict[str, Any] | None:
        rows = self._all(sa.select(annotations).where(annotations.c.conquest_id == conquest_id))
        return rows[0] if rows else None

    def annotation_history_of(self, conquest_id: str) -> list[dict[str, Any]]:
        query = sa.select(annotation_history).where(annotation_history.c.conquest_id == conquest_id)
        return self._all(query.order_by(annotation_history.c.id))

    def list(
        self,
        type_id: str | None = None,
        status: str | None = None,
        result: str | None = None,
        gold: bool | None = None,
        min_rating: int | None = None,
        excluded: bool | None = None,
        limit: int = 100,
        after: str | None = None,
        conn: sa.Connection | None = None,
    ) -> list[dict[str, Any]]:
        """Conquests with their annotation (``annotation_*`` keys), oldest first, after the
        conquest ``after``; ``limit + 1`` rows at most (the caller tells whether more follow)."""
        labelled = [annotations.c[name].label(f"annotation_{name}") for name in ANNOTATION_FIELDS]
        query = sa.select(conquests, *labelled).select_from(
            conquests.outerjoin(annotations, annotations.c.conquest_id == conquests.c.id)
        )
        if type_id is not None:
            query = query.where(conquests.c.type == type_id)
        if status is not None:
            query = query.where(conquests.c.status == status)
        if result is not None:
            query = query.where(conquests.c.result == result)
        if gold is True:
            query = query.where(annotations.c.is_gold_star.is_(True))
        elif gold is False:
            query = query.where(annotations.c.is_gold_star.is_not(True))
        if min_rating is not None:
            query = query.where(annotations.c.rating >= min_rating)
        if excluded is True:
            query = query.where(conquests.c.excluded_at.is_not(None))
        elif excluded is False:
            query = query.where(conquests.c.excluded_at.is_(None))
        if after is not None:
            anchor = self.get(after, conn)
            if anchor is None:
                raise UnknownCursor("conquest", after)
            query = query.where(
                sa.tuple_(conquests.c.created_at, conquests.c.id)
                > sa.tuple_(sa.literal(anchor["created_at"]), sa.literal(after))
            )
        query = query.order_by(conquests.c.created_at, conquests.c.id).limit(limit + 1)
        return self._all(query, conn)

    def batches_of(self, conquest_ids: list[str]) -> dict[str, int]:
        """The batches the given conquests came from, with how many came from each."""
        counts: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(conquest_ids), 500):
                chunk = conquest_ids[start : start + 500]
                query = (
                    sa.select(conquests.c.batch_id, sa.func.count())
                    .where(conquests.c.id.in_(chunk))
                    .group_by(conquests.c.batch_id)
                )
                for batch_id, n in conn.execute(query):
                    counts[batch_id] = counts.get(batch_id, 0) + n
        return counts


class LabelStudioStore(Store):
    """Each conquest type's Label Studio project, and the task of each conquest sent there."""

    def project(self, type_id: str, url: str) -> dict[str, Any] | None:
        query = sa.select(label_studio_projects).where(
            label_studio_projects.c.type == type_id, label_studio_projects.c.url == url
        )
        rows = self._all(query)
        return rows[0] if rows else None

    def projects_at(self, url: str) -> list[dict[str, Any]]:
        query = sa.select(label_studio_projects).where(label_studio_projects.c.url == url)
        return self._all(query.order_by(label_studio_projects.c.project_id))

    def save_project(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            key = (label_studio_projects.c.type == row["type"]) & (
                label_studio_projects.c.url == row["url"]
            )
            if conn.execute(label_studio_projects.update().where(key).values(**row)).rowcount:
                return
            conn.execute(label_studio_projects.insert().values(**row))

    def tasks_of(self, url: str, project_id: int, conquest_ids: list[str]) -> dict[str, int | None]:
        """conquest id -> task id in ``project_id`` (None: its import was started, not
        confirmed). Rows of another project (the type's project was deleted in Label Studio
        and made again) are dropped, so those conquests are imported into this one."""
        if not conquest_ids:
            return {}
        mine = (label_studio_tasks.c.url == url) & label_studio_tasks.c.conquest_id.in_(
            conquest_ids
        )
        with self.engine.begin() as conn:
            conn.execute(
                label_studio_tasks.delete().where(
                    mine, label_studio_tasks.c.project_id != project_id
                )
            )
            query = sa.select(label_studio_tasks.c.conquest_id, label_studio_tasks.c.task_id)
            return {row.conquest_id: row.task_id for row in conn.execute(query.where(mine))}

    def task_of(self, url: str, conquest_id: str) -> tuple[int, int | None] | None:
        """The (project id, task id) vbs recorded for a conquest in the Label Studio at ``url``."""
        query = sa.select(label_studio_tasks.c.project_id, label_studio_tasks.c.task_id).where(
            label_studio_tasks.c.url == url, label_studio_tasks.c.conquest_id == conquest_id
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row.project_id, row.task_id) if row else None

    def start_tasks(self, url: str, project_id: int, conquest_ids: list[str]) -> None:
        now = int(time.time())
        rows = [
            {
                "conquest_id": c,
                "url": url,
                "project_id": project_id,
                "task_id": None,
                "created_at": now,
            }
            for c in conquest_ids
        ]
        if rows:
            with self.engine.begin() as conn:
                conn.execute(label_studio_tasks.insert(), rows)

    def finish_tasks(self, url: str, task_ids: dict[str, int]) -> None:
        with self.engine.begin() as conn:
            for conquest_id, task_id in task_ids.items():
                conn.execute(
                    label_studio_tasks.update()
                    .where(
                        label_studio_tasks.c.conquest_id == conquest_id,
                        label_studio_tasks.c.url == url,
                    )
                    .values(task_id=task_id)
                )
