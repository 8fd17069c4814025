"""The conquest lifecycle: the one place where a conquest's status, result or exclusion changes.

A conquest is made ``COMPLETED`` (the model answered) or ``FAILED`` (it did not) from its
batch's result line. Its ``result`` follows its newest annotation (``VICTORY``, ``DEFEAT`` or
none) and exists only on a ``COMPLETED`` conquest: a failed one has no answer to be gold. An
operator may exclude a conquest (it then never enters a dataset and is not sent to curators) and
take it back. Each change is one conditional update in ``ConquestStore`` with its row in
``conquest_history``, in one transaction; the API, the Label Studio sync and the CLI all go
through ``ConquestLifecycle``.

```
PENDING -> IN_PROGRESS -> COMPLETED | FAILED        result: none <-> VICTORY <-> DEFEAT
                                                            (COMPLETED only)
```
"""

from __future__ import annotations

from typing import Any

from vbs_resources.catalog import Catalog
from vbs_resources.curation.annotations import VICTORY, result_of

STATUS_ALLOWED_FROM: dict[str, tuple[str, ...]] = {
    "IN_PROGRESS": ("PENDING",),
    "COMPLETED": ("PENDING", "IN_PROGRESS"),
    "FAILED": ("PENDING", "IN_PROGRESS"),
}
# The statuses on which a conquest has a result.
RESULTS_ON = ("COMPLETED",)
MAX_REASON = 1000


class ConquestRefused(ValueError):
    """A change the lifecycle does not allow; ``field`` names what is at fault."""

    def __init__(self, message: str, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.field, self.status = message, field, status


class ConquestLifecycle:
    """Changes of conquests, each with its history."""

    def __init__(self, catalog: Catalog, gold_rating: int = 4) -> None:
        self.catalog, self.gold_rating = catalog, gold_rating

    def _get(self, conquest_id: str) -> dict[str, Any]:
        row = self.catalog.conquests.get(conquest_id)
        if row is None:
            raise ConquestRefused(f"No such conquest: {conquest_id[:100]}", "conquest_id", 404)
        return row

    def annotate(self, conquest_id: str, values: dict[str, Any], source: str) -> str:
        """Record an annotation (the newest edit sets the result); an edit that would make a
        conquest with no answer ``VICTORY`` is refused, naming the field that would."""
        row = self._get(conquest_id)
        result = result_of(values, self.gold_rating)
        if row["status"] not in RESULTS_ON and result == VICTORY:
            field = "isGoldStar" if values.get("is_gold_star") else "rating"
            raise ConquestRefused(
                f"The conquest is {row['status']}: it has no answer to be gold, so it cannot "
                "be a VICTORY.",
                field,
            )
        return self.catalog.conquests.record_annotation(
            conquest_id, values, result, RESULTS_ON, source
        )

    def exclude(self, conquest_id: str, reason: str, source: str) -> bool:
        """Keep a conquest out of every dataset and of Label Studio; False if it was already."""
        self._get(conquest_id)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
            raise ConquestRefused(f"reason must be a string of 1 to {MAX_REASON} characters.")
        return self.catalog.conquests.set_excluded(conquest_id, reason, source)

    def include(self, conquest_id: str, source: str) -> bool:
        """Take an excluded conquest back; False if it was not excluded."""
        self._get(conquest_id)
        return self.catalog.conquests.set_excluded(conquest_id, None, source)

    def set_status(self, conquest_id: str, status: str, source: str) -> bool:
        """``PENDING -> IN_PROGRESS -> COMPLETED | FAILED``."""
        if status not in STATUS_ALLOWED_FROM:
            raise ConquestRefused(f"{status!r} is not a status a conquest moves to.", "status")
        return self.catalog.conquests.transition(
            conquest_id, "status", status, STATUS_ALLOWED_FROM[status], source=source
        )
