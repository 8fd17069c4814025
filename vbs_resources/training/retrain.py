"""When a conquest type deserves retraining: its gold conquests hold at least ``min_new`` that
the dataset of its deployed model did not (all of them, when no model of the type is deployed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vbs_resources.catalog import Catalog
from vbs_resources.lake import catalog_frame, gold_query


@dataclass(frozen=True)
class RetrainDecision:
    type_id: str
    retrain: bool
    reason: str
    gold: int
    new: int
    deployed_model: str | None = None
    deployed_dataset: str | None = None


def deployed_for_type(catalog: Catalog, type_id: str) -> dict[str, Any] | None:
    """The type's most recently deployed available fine-tuned model, if any."""
    found = [
        m
        for m in catalog.models.list()
        if m["kind"] == "adapter" and (m["lineage"] or {}).get("dataset_type") == type_id
    ]
    return max(found, key=lambda m: m["lineage"].get("deployed_at", 0), default=None)


def decide(catalog: Catalog, type_id: str, min_rating: int, min_new: int) -> RetrainDecision:
    gold = set(catalog_frame(catalog, gold_query(type_id, min_rating))["id"].to_list())
    model = deployed_for_type(catalog, type_id)
    trained: set[str] = set()
    dataset_version = None
    if model is not None:
        dataset_version = model["lineage"].get("dataset_version")
        dataset = catalog.datasets.get(dataset_version) if dataset_version else None
        ids = (dataset or {}).get("conquest_ids") or {}
        trained = {*ids.get("train", []), *ids.get("eval", [])}
    new = len(gold - trained)
    since = f"beyond {dataset_version} ({model['name']})" if model else "and no model deployed"
    if new >= min_new:
        reason = f"{type_id}: {new} new gold conquests {since}, at least {min_new}: retraining"
    else:
        reason = f"{type_id}: {new} new gold conquests {since}, fewer than {min_new}: skipped"
    return RetrainDecision(
        type_id,
        new >= min_new,
        reason,
        len(gold),
        new,
        model["name"] if model else None,
        dataset_version,
    )
