"""The Label Studio result handler: one project per conquest type, one task per conquest.

Nothing is imported twice: each conquest's task is recorded in the catalog before its import
(task id empty) and completed after. A run cut short between the two finds its tasks again in
Label Studio by ``conquest_id`` instead of importing them again. A type whose labeling config
changed (a new version) gets its project's config updated in place, keeping its tasks and
annotations; Label Studio refuses a config that would orphan existing labels, and that refusal
is reported with the type named.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from vbs_resources.catalog import Catalog
from vbs_resources.curation.label_studio import LabelStudio, LabelStudioError
from vbs_resources.curation.labeling import labeling_config, task_data
from vbs_resources.curation.types import ConquestType

IMPORT_CHUNK = 500


@dataclass
class Export:
    project_id: int
    imported: int = 0
    already: int = 0
    recovered: int = 0
    config_updated: bool = False
    project_created: bool = False


class LabelStudioHandler:
    def __init__(self, label_studio: LabelStudio, catalog: Catalog) -> None:
        self.label_studio, self.catalog = label_studio, catalog
        self.url = label_studio.url.rstrip("/")

    def project_for(self, conquest_type: ConquestType, export: Export | None = None) -> int:
        """The type's project, made (or its config updated) as needed."""
        config = labeling_config(conquest_type)
        digest = hashlib.sha256(config.encode()).hexdigest()
        row = self.catalog.label_studio.project(conquest_type.id, self.url)
        now = time.time()
        title = f"{conquest_type.name} ({conquest_type.id})"
        if row is not None and self.label_studio.get_project(row["project_id"]) is not None:
            if row["config_sha256"] != digest:
                try:
                    self.label_studio.update_project(
                        row["project_id"], label_config=config, title=title
                    )
                except LabelStudioError as exc:
                    raise LabelStudioError(
                        f"conquest type {conquest_type.id} version {conquest_type.version}: "
                        f"Label Studio keeps the old config: {exc}"
                    ) from None
                self.catalog.label_studio.save_project(
                    {**row, "type_version": conquest_type.version, "config_sha256": digest,
                     "updated_at": now}
                )  # fmt: skip
                if export is not None:
                    export.config_updated = True
            return int(row["project_id"])
        project_id = self.label_studio.create_project(title, config, conquest_type.description)
        self.catalog.label_studio.save_project(
            {
                "type": conquest_type.id,
                "url": self.url,
                "project_id": project_id,
                "type_version": conquest_type.version,
                "config_sha256": digest,
                "created_at": int(now),
                "updated_at": now,
            }
        )
        if export is not None:
            export.project_created = True
        return project_id

    def export(self, conquest_type: ConquestType, conquests: list[dict[str, Any]]) -> Export:
        """Each conquest as a task of its type's project, once."""
        export = Export(project_id=0)
        project_id = export.project_id = self.project_for(conquest_type, export)
        known = self.catalog.label_studio.tasks_of(
            self.url, project_id, [c["id"] for c in conquests]
        )
        export.already = sum(1 for task_id in known.values() if task_id is not None)
        unconfirmed = {c for c, task_id in known.items() if task_id is None}
        if unconfirmed:
            found = {
                task["data"].get("conquest_id"): int(task["id"])
                for task in self.label_studio.tasks(project_id)
                if task["data"].get("conquest_id") in unconfirmed
            }
            self.catalog.label_studio.finish_tasks(self.url, found)
            export.recovered = len(found)
            unconfirmed -= found.keys()
        new = [c for c in conquests if c["id"] not in known]
        self.catalog.label_studio.start_tasks(self.url, project_id, [c["id"] for c in new])
        todo = [c for c in conquests if c["id"] in unconfirmed] + new
        for start in range(0, len(todo), IMPORT_CHUNK):
            chunk = todo[start : start + IMPORT_CHUNK]
            tasks = [{"data": task_data(conquest_type, c)} for c in chunk]
            task_ids = self.label_studio.import_tasks(project_id, tasks)
            if len(task_ids) != len(chunk):
                raise LabelStudioError(
                    f"Label Studio made {len(task_ids)} tasks of {len(chunk)} (project {project_id})"
                )
            self.catalog.label_studio.finish_tasks(
                self.url, {c["id"]: t for c, t in zip(chunk, task_ids, strict=True)}
            )
            export.imported += len(chunk)
        return export
