"""A typed batch's results as conquests: one per result line, joined with the request it
answered and, for batches made by ``vbs conquests submit``, the record its prompt came from."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from vbs_resources import layout as L
from vbs_resources.bucket import Bucket
from vbs_resources.catalog import Catalog
from vbs_resources.curation.types import ConquestType

# Endpoints whose answers people can judge (an embedding is not curated).
CURATED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
COMPLETED, FAILED = "COMPLETED", "FAILED"


class ConquestSourceError(ValueError):
    """A typed batch whose conquests cannot be made (its records file is gone, say)."""


def _requests(bucket: Bucket, batch_id: str) -> dict[str, dict[str, Any]]:
    """Each request's body by custom_id, from the validated ``requests.parquet``."""
    import pyarrow.parquet as pq

    path = L.batch_file(batch_id, L.REQUESTS)
    if not bucket.exists(path):
        return {}
    bodies: dict[str, dict[str, Any]] = {}
    with bucket.open(path, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        for group in parquet.iter_batches(columns=["custom_id", "body"], batch_size=4096):
            for custom_id, body in zip(
                group.column("custom_id").to_pylist(), group.column("body").to_pylist(), strict=True
            ):
                bodies[custom_id] = json.loads(body)
    return bodies


def records_of(bucket: Bucket, catalog: Catalog, file_id: str) -> dict[str, dict[str, Any]]:
    """The records file a submit uploaded (purpose ``user_data``): each record by custom_id."""
    row = catalog.get_file(file_id)
    if row is None:
        raise ConquestSourceError(f"the records file {file_id} is gone")
    records: dict[str, dict[str, Any]] = {}
    with bucket.open(row["path"], "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise ConquestSourceError(f"{file_id} line {number}: {exc}") from None
            if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
                raise ConquestSourceError(f"{file_id} line {number}: a record names its custom_id")
            records[record.pop("custom_id")] = record
    return records


def _answer(line: dict[str, Any]) -> tuple[str, str | None, dict[str, Any] | None, str | None]:
    """(status, prediction, error, model) of one output or error line."""
    response = line.get("response") or {}
    body = response.get("body") or {}
    if response.get("status_code") == 200 and body.get("choices"):
        choice = body["choices"][0]
        message = choice.get("message") or {}
        text = message.get("content") if "message" in choice else choice.get("text")
        return COMPLETED, text or "", None, body.get("model")
    error = body.get("error") or line.get("error") or {"message": "no answer"}
    shown = {k: error.get(k) for k in ("code", "message", "param") if error.get(k) is not None}
    return FAILED, None, shown, body.get("model")


def build_conquests(
    bucket: Bucket,
    batch: dict[str, Any],
    conquest_type: ConquestType,
    records: dict[str, dict[str, Any]] | None = None,
) -> Iterator[dict[str, Any]]:
    """One conquest row per line of the batch's output and error files."""
    batch_id = batch["id"]
    bodies = _requests(bucket, batch_id)
    now = time.time()
    for name in (L.OUTPUT, L.ERRORS):
        path = L.batch_file(batch_id, name)
        if not bucket.exists(path):
            continue
        with bucket.open(path, "rb") as fh:
            for raw in fh:
                line = json.loads(raw)
                custom_id = line["custom_id"]
                body = bodies.get(custom_id) or {}
                status, prediction, error, model = _answer(line)
                prompt = body.get("messages", body.get("prompt"))
                if records is not None and custom_id in records:
                    input_data = records[custom_id]
                elif "messages" in body:
                    input_data = {"messages": body["messages"]}
                else:
                    input_data = {"prompt": body.get("prompt")}
                yield {
                    "id": L.conquest_id(batch_id, custom_id),
                    "type": conquest_type.id,
                    "type_version": conquest_type.version,
                    "status": status,
                    "result": None,
                    "input_data": input_data,
                    "prompt": prompt if prompt is not None else [],
                    "prediction": prediction,
                    "error": error,
                    "model": model or body.get("model"),
                    "batch_id": batch_id,
                    "custom_id": custom_id,
                    "created_at": int(now),
                    "updated_at": now,
                }
