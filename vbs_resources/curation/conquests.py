"""A typed batch's results as conquests: one per result (from the results lake), joined with
the request it answered and, for batches made by ``vbs conquests submit``, the record its
prompt came from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from vbs_resources import layout as L
from vbs_resources.bucket import Bucket
from vbs_resources.catalog import Catalog
from vbs_resources.curation.records import check_records, matches_request
from vbs_resources.curation.types import ConquestType
from vbs_resources.lake import batch_answers

# Endpoints whose answers people can judge (an embedding is not curated).
CURATED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETED, FAILED = "COMPLETED", "FAILED"


class ConquestSourceError(ValueError):
    """A typed batch whose conquests cannot be made (its records file is gone, say)."""


def records_of(
    bucket: Bucket, catalog: Catalog, file_id: str, conquest_type: ConquestType
) -> dict[str, dict[str, Any]]:
    """The records file a submit uploaded (purpose ``user_data``): each record by custom_id,
    read by strict JSON and checked against the type (``ConquestSourceError`` naming the line
    otherwise)."""
    row = catalog.files.get(file_id)
    if row is None:
        raise ConquestSourceError(f"the records file {file_id} is gone")
    with bucket.open(row["path"], "rb") as fh:
        good, errors = check_records(conquest_type, fh)
    if errors:
        raise ConquestSourceError(f"{file_id} {errors[0]}")
    return {custom_id: data for custom_id, data, _ in good}


def _error(answer: dict[str, Any]) -> dict[str, Any]:
    shown = {k: answer[f"error_{k}"] for k in ("code", "message", "param")}
    found = {k: v for k, v in shown.items() if v is not None}
    if found:
        return found
    return {
        "message": "the answer holds no text" if answer["status"] == "completed" else "no answer"
    }


def build_conquests(
    bucket: Bucket,
    batch: dict[str, Any],
    conquest_type: ConquestType,
    records: dict[str, dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One conquest row per result of the batch, read from the results lake."""
    batch_id = batch["id"]
    now = time.time()
    ended_at = next(
        (
            batch[k]
            for k in ("completed_at", "cancelled_at", "expired_at", "failed_at")
            if batch.get(k)
        ),
        None,
    )
    for answer in batch_answers(bucket, batch_id, ended_at):
        custom_id = answer["custom_id"]
        body = json.loads(answer["body"]) if answer["body"] else {}
        # An answer without text (no choices, only tool calls) has nothing to judge.
        completed = answer["status"] == "completed" and answer["text"] is not None
        prompt = body.get("messages", body.get("prompt"))
        record = (records or {}).get(custom_id)
        if record is not None and matches_request(conquest_type, record, prompt):
            input_data = record
        elif "messages" in body:
            input_data = {"messages": body["messages"]}
        else:
            input_data = {"prompt": body.get("prompt")}
        yield {
            "id": L.conquest_id(batch_id, custom_id),
            "type": conquest_type.id,
            "type_version": conquest_type.version,
            "status": COMPLETED if completed else FAILED,
            "result": None,
            "input_data": input_data,
            "prompt": prompt if prompt is not None else [],
            "prediction": answer["text"] if completed else None,
            "error": None if completed else _error(answer),
            "model": answer["model"] or body.get("model"),
            "batch_id": batch_id,
            "custom_id": custom_id,
            "created_at": int(now),
            "updated_at": now,
        }
