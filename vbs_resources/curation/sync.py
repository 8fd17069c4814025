"""Annotations from Label Studio into the catalog, incrementally: per project, the tasks
updated since the last sync (new and edited annotations move a task's ``updated_at``).

Every annotation of such a task is recorded, oldest first, so the newest edit wins and the
ones it replaced stay in the history. An annotation of a task that names no known conquest, or
with values outside its type's options, is skipped and reported; the sync goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from vbs_resources.catalog import Catalog
from vbs_resources.curation.annotations import AnnotationError, from_label_studio
from vbs_resources.curation.label_studio import LabelStudio
from vbs_resources.curation.lifecycle import ConquestLifecycle, ConquestRefused
from vbs_resources.curation.registry import TaskRegistry

# Tasks are fetched again from a little before the newest one seen: an edit committed a moment
# after a sync read its neighbours is not missed (edits seen twice are recorded once).
OVERLAP = timedelta(seconds=5)


@dataclass
class SyncReport:
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        counted = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        text = f"annotations: {counted or 'nothing new'}"
        if self.problems:
            text += f"; {len(self.problems)} skipped: " + "; ".join(self.problems[:5])
        return text


def _format(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def sync_annotations(
    label_studio: LabelStudio,
    catalog: Catalog,
    registry: TaskRegistry,
    cursor: dict[str, str],
    gold_rating: int = 4,
) -> tuple[SyncReport, dict[str, str]]:
    """Record what changed in every project of this Label Studio; the report and the new
    cursor (project id -> the ``updated_after`` of the next sync)."""
    report = SyncReport()
    lifecycle = ConquestLifecycle(catalog, gold_rating)
    url = label_studio.url.rstrip("/")
    cursor = dict(cursor)
    for project in catalog.label_studio.projects_at(url):
        project_id = project["project_id"]
        key = str(project_id)
        try:
            conquest_type = registry.get(project["type"])
        except KeyError as exc:
            report.problems.append(str(exc.args[0]))
            continue
        tasks = label_studio.tasks(project_id, updated_after=cursor.get(key))
        newest = None
        for task in tasks:
            stamp = _parse(task["updated_at"]) if task.get("updated_at") else None
            if stamp is not None and (newest is None or stamp > newest):
                newest = stamp
            _record_task(lifecycle, url, conquest_type, project_id, task, report)
        if newest is not None:
            cursor[key] = _format(newest - OVERLAP)
    return report, cursor


def _record_task(
    lifecycle: ConquestLifecycle,
    url: str,
    conquest_type: Any,
    project_id: int,
    task: dict[str, Any],
    report: SyncReport,
) -> None:
    catalog = lifecycle.catalog
    made = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not made:
        return
    conquest_id = (task.get("data") or {}).get("conquest_id")
    where = f"task {task.get('id')} of project {project_id}"
    if not isinstance(conquest_id, str) or catalog.conquests.get(conquest_id) is None:
        report.problems.append(f"{where}: no conquest {str(conquest_id)[:80]!r}")
        return
    # Only the task vbs made for the conquest speaks for it: a task imported by hand that names
    # another conquest's id is not that conquest's.
    recorded = catalog.label_studio.task_of(url, conquest_id)
    if recorded != (project_id, task.get("id")):
        sent = f"task {recorded[1]} of project {recorded[0]}" if recorded else "no task"
        report.problems.append(f"{where}: names conquest {conquest_id}, sent as {sent}; skipped")
        return
    made.sort(key=lambda a: a.get("updated_at") or a.get("created_at") or "")
    for annotation in made:
        try:
            values = from_label_studio(conquest_type, annotation)
        except (AnnotationError, KeyError, ValueError) as exc:
            what = getattr(exc, "field", None)
            report.problems.append(
                f"{where}, annotation {annotation.get('id')}"
                + (f" ({what})" if what else "")
                + f": {exc}"
            )
            continue
        try:
            outcome = lifecycle.annotate(conquest_id, values, "label_studio")
        except ConquestRefused as exc:
            report.problems.append(f"{where}, annotation {annotation.get('id')}: {exc.message}")
            continue
        report.counts[outcome] = report.counts.get(outcome, 0) + 1
