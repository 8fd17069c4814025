"""Where a model came from: model -> fine-tuning job (adapter) -> dataset version -> conquests ->
batches -> input files, with the sha256 of each input.

Everything is read from the catalog, which each asset writes as it materializes (the job row by
``fine_tuned_adapter`` and ``adapter_eval``, the lineage by ``deployed_model``, conquests by
``conquests``); the Dagster run of every step is named, so the same chain can be followed in
the Dagster UI, where the assets are partitioned by the dataset version they were made from.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from vbs_resources.catalog import Catalog


class LineageError(LookupError):
    pass


def _files_of_upload(catalog: Catalog, conquest_ids: list[str]) -> list[dict[str, Any]]:
    """An uploaded dataset's examples are ``<file id>#L<line>``: the files, with their hashes."""
    counts = Counter(cid.split("#", 1)[0] for cid in conquest_ids)
    found = []
    for file_id, n in sorted(counts.items()):
        row = catalog.files.get(file_id) or {}
        found.append({"file_id": file_id, "examples": n, "sha256": row.get("sha256"),
                      "filename": row.get("filename")})  # fmt: skip
    return found


def model_lineage(catalog: Catalog, name: str) -> dict[str, Any]:
    model = catalog.models.get(name)
    if model is None:
        raise LineageError(f"No model named {name[:100]!r} is registered.")
    lineage = model["lineage"] or {}
    chain: dict[str, Any] = {
        "model": {
            "id": model["name"],
            "kind": model["kind"],
            "status": model["status"],
            "base": model["base"],
            "path": model["path"],
            "created_at": model["created_at"],
            "retired_at": model["retired_at"],
            "deployments": lineage.get("deployments", []),
            "forced": lineage.get("forced", False),
        }
    }
    job = catalog.fine_tuning.get(lineage["job_id"]) if lineage.get("job_id") else None
    if job is None:
        chain["note"] = (
            "This model was not trained here (a configured or hand-registered model)."
            if model["kind"] != "adapter" or not lineage
            else "Its fine-tuning job is not in the catalog."
        )
        return chain
    chain["adapter"] = {
        "job_id": job["id"],
        "path": job["adapter_path"],
        "backend": job["backend"],
        "base_model": job["model"],
        "hyperparameters": job["hyperparameters"],
        "training_run_id": job["run_id"],
        "result": job["result"],
        "evaluation": job["evaluation"],
    }
    dataset = catalog.datasets.get(job["dataset_version"])
    if dataset is None:
        chain["note"] = f"The dataset version {job['dataset_version']} is not in the catalog."
        return chain
    ids = dataset["conquest_ids"] or {}
    all_ids = [*ids.get("train", []), *ids.get("eval", [])]
    chain["dataset"] = {
        "version": dataset["version"],
        "type": dataset["type"],
        "type_version": dataset["type_version"],
        "path": dataset["path"],
        "counts": {"train": dataset["train_count"], "eval": dataset["eval_count"]},
        "build_run_id": dataset["run_id"],
        "conquest_ids": ids,
    }
    if all_ids and "#" in all_ids[0]:
        chain["files"] = _files_of_upload(catalog, all_ids)
        return chain
    batches = []
    for batch_id, n in sorted(catalog.conquests.batches_of(all_ids).items()):
        row = catalog.batches.get(batch_id) or {}
        batches.append(
            {
                "batch_id": batch_id,
                "conquests": n,
                "input_file_id": row.get("input_file_id"),
                "original_filename": row.get("original_filename"),
                "input_sha256": row.get("input_sha256") or row.get("content_sha256"),
                "run_id": row.get("run_id"),
            }
        )
    chain["batches"] = batches
    return chain
