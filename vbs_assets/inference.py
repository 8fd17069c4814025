"""``batch_output``: a batch's requests run through the inference engine, in OpenAI output format.

Work goes in chunks. Each finished chunk is written whole (temporary file, then rename) to
``batches/<id>/checkpoint/chunk-NNNNN.jsonl`` before the next starts, so a run that dies, and
the retry the daemon launches for it, resumes after the last finished chunk: no request is run
twice for the same input, and no ``custom_id`` is written twice or dropped. The checkpoint is
tied to the input's sha256; when the final files are in place it is removed, and a later
re-materialization recomputes the partition from scratch.
"""

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from vbs_assets.ingest import batch_input
from vbs_assets.partitions import batch_partitions
from vbs_assets.schemas import BatchErrorEntry
from vbs_resources import (
    Bucket,
    Catalog,
    EngineRequest,
    EngineResult,
    InferenceEngine,
    Webhooks,
    batch_file,
)

CHECKPOINT = "checkpoint"


class InferenceConfig(dg.Config):
    """How a batch is cut into checkpointed chunks."""

    chunk_size: int = Field(
        default=256,
        description="Requests handed to the engine at once; a checkpoint is written after each.",
    )


def output_line(result: EngineResult) -> dict[str, Any]:
    """The OpenAI batch output line of one request's result."""
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": result.custom_id,
        "response": {
            "status_code": result.status_code,
            "request_id": f"req_{uuid.uuid4().hex}",
            "body": result.body,
        },
        "error": None,
    }


@dataclass
class Progress:
    """Counts over all finished chunks, whether computed by this run or an earlier one."""

    done: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0

    def add(self, line: dict[str, Any]) -> None:
        self.done.add(line["custom_id"])
        response = line["response"]
        if response and 200 <= response["status_code"] < 300:
            self.completed += 1
            usage = (response["body"] or {}).get("usage") or {}
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.completion_tokens += usage.get("completion_tokens", 0)
        else:
            self.failed += 1

    @property
    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }


def _chunk_name(index: int) -> str:
    return f"{CHECKPOINT}/chunk-{index:05d}.jsonl"


def _load_checkpoint(bucket: Bucket, batch_id: str, sha256: str) -> Progress:
    """Progress from a checkpoint of the same input; a stale or absent one is started afresh."""
    manifest = batch_file(batch_id, f"{CHECKPOINT}/manifest.json")
    progress = Progress()
    if bucket.exists(manifest) and json.loads(bucket.read_text(manifest)).get("sha256") == sha256:
        for entry in bucket.list_files(batch_file(batch_id, CHECKPOINT)):
            if entry.name.startswith("chunk-") and entry.name.endswith(".jsonl"):
                for raw in bucket.read_text(
                    batch_file(batch_id, f"{CHECKPOINT}/{entry.name}")
                ).splitlines():
                    progress.add(json.loads(raw))
                progress.chunks = max(progress.chunks, int(entry.name[6:11]) + 1)
        return progress
    bucket.remove_tree(batch_file(batch_id, CHECKPOINT))
    bucket.write_bytes(manifest, json.dumps({"sha256": sha256}).encode())
    return progress


def _pending_chunks(
    bucket: Bucket, batch_id: str, done: set[str], chunk_size: int
) -> Iterator[list[EngineRequest]]:
    with bucket.open(batch_file(batch_id, "requests.parquet"), "rb") as fh:
        parquet = pq.ParquetFile(fh)
        chunk: list[EngineRequest] = []
        for record_batch in parquet.iter_batches(batch_size=4096, columns=["custom_id", "body"]):
            for custom_id, body in zip(
                record_batch.column("custom_id").to_pylist(),
                record_batch.column("body").to_pylist(),
                strict=True,
            ):
                if custom_id in done:
                    continue
                chunk.append(EngineRequest(custom_id, json.loads(body)))
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def _finalize(bucket: Bucket, batch_id: str) -> None:
    """Merge the checkpoint chunks, in order, into output.jsonl and errors.jsonl."""
    chunks = sorted(
        e.name
        for e in bucket.list_files(batch_file(batch_id, CHECKPOINT))
        if e.name.startswith("chunk-")
    )
    with (
        bucket.atomic_writer(batch_file(batch_id, "output.jsonl")) as out,
        bucket.atomic_writer(batch_file(batch_id, "errors.jsonl")) as err,
    ):
        for name in chunks:
            with bucket.open(batch_file(batch_id, f"{CHECKPOINT}/{name}"), "rb") as fh:
                for raw in fh:
                    response = json.loads(raw)["response"]
                    ok = response is not None and 200 <= response["status_code"] < 300
                    (out if ok else err).write(raw)


def _stop_reason(catalog: Catalog, batch_id: str) -> str | None:
    """'cancelled' once a cancel was requested, 'expired' past the completion window."""
    row = catalog.get_batch(batch_id) or {}
    if row.get("status") in ("cancelling", "cancelled"):
        return "cancelled"
    if row.get("expires_at") and time.time() > row["expires_at"]:
        return "expired"
    return None


def _register_result_files(bucket: Bucket, catalog: Catalog, batch_id: str) -> dict[str, str]:
    """Give output.jsonl and errors.jsonl file ids, so the Files API can serve them."""
    ids = {}
    for name, column, purpose in (
        ("output.jsonl", "output_file_id", "batch_output"),
        ("errors.jsonl", "error_file_id", "batch_output"),
    ):
        path = batch_file(batch_id, name)
        file_id = f"file-{name.split('.')[0]}-{batch_id.removeprefix('batch_')}"
        catalog.create_file(
            file_id,
            filename=f"{batch_id}_{name}",
            purpose=purpose,
            size=bucket.size(path),
            path=path,
        )
        ids[column] = file_id
    return ids


def _preview(bucket: Bucket, batch_id: str, rows: int = 5) -> str:
    lines = ["| custom_id | status | output |", "|---|---|---|"]
    for name in ("output.jsonl", "errors.jsonl"):
        with bucket.open(batch_file(batch_id, name), "rb") as fh:
            for raw in fh:
                if len(lines) >= rows + 2:
                    break
                line = json.loads(raw)
                if line["response"] is None:
                    lines.append(f"| {line['custom_id']} | - | {line['error']['code']} |")
                    continue
                body = line["response"]["body"] or {}
                if "error" in body:
                    text = f"{body['error']['code']}: {body['error']['message']}"
                elif body.get("object") == "list":
                    text = (
                        f"{len(body['data'])} embedding(s) of {len(body['data'][0]['embedding'])}"
                    )
                else:
                    choice = body["choices"][0]
                    text = choice.get("message", {}).get("content") or choice.get("text") or ""
                text = text.replace("\n", " ").replace("|", "\\|")[:120]
                lines.append(
                    f"| {line['custom_id']} | {line['response']['status_code']} | {text} |"
                )
    return "\n".join(lines)


@dg.asset(
    partitions_def=batch_partitions,
    deps=[batch_input],
    pool="gpu",
    code_version="1",
    kinds={"vllm", "jsonl"},
    group_name="batches",
)
def batch_output(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    bucket: Bucket,
    catalog: Catalog,
    engine: InferenceEngine,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    """The batch's results from vLLM: ``output.jsonl`` and ``errors.jsonl`` in OpenAI format.

    A request that fails (unknown model, prompt longer than the context, invalid parameter)
    becomes a line of ``errors.jsonl`` and the batch goes on. Resumes from its checkpoint after
    a crash.
    """
    batch_id = context.partition_key
    try:
        return _run_batch(context, config, bucket, catalog, engine, webhooks)
    except Exception as exc:
        # Asset failures are not retried (dagster.yaml), so the batch ends here; a process
        # that dies is another matter: it is retried, and never reaches this line.
        message = f"{type(exc).__name__}: {exc}"[:500]
        catalog.update_batch(
            batch_id,
            "failed",
            errors=[BatchErrorEntry(code="engine_error", message=message).model_dump()],
        )
        webhooks.batch_event(catalog, batch_id, "failed")
        raise


def _run_batch(
    context: dg.AssetExecutionContext,
    config: InferenceConfig,
    bucket: Bucket,
    catalog: Catalog,
    engine: InferenceEngine,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    batch_id = context.partition_key
    row = catalog.get_batch(batch_id) or {}
    endpoint = row.get("endpoint") or "/v1/chat/completions"
    total = row.get("request_total") or 0
    sha256 = _input_sha256(context)
    progress = _load_checkpoint(bucket, batch_id, sha256)
    resumed = len(progress.done)
    if resumed:
        context.log.info(f"resuming {batch_id}: {resumed}/{total} requests already done")
    catalog.update_batch(
        batch_id,
        "in_progress",
        request_completed=progress.completed,
        request_failed=progress.failed,
    )

    started = time.perf_counter()
    engine.start(endpoint)
    start_seconds = time.perf_counter() - started
    context.log.info(f"engine ready in {start_seconds:.1f}s ({engine.describe()['engine']})")
    engine_seconds = 0.0
    new_completion_tokens = 0
    stop = _stop_reason(catalog, batch_id)
    for requests in _pending_chunks(bucket, batch_id, progress.done, config.chunk_size):
        if stop := stop or _stop_reason(catalog, batch_id):
            break
        chunk_started = time.perf_counter()
        results = engine.run(endpoint, requests)
        engine_seconds += time.perf_counter() - chunk_started
        lines = [output_line(r) for r in results]
        bucket.write_bytes(
            batch_file(batch_id, _chunk_name(progress.chunks)),
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode(),
        )
        progress.chunks += 1
        for line in lines:
            progress.add(line)
        new_completion_tokens += sum(r.completion_tokens for r in results)
        catalog.update_batch(
            batch_id,
            request_completed=progress.completed,
            request_failed=progress.failed,
            usage=progress.usage,
        )
        done = len(progress.done)
        context.log.info(
            f"chunk {progress.chunks}: {done}/{total} requests "
            f"({100 * done / max(total, 1):.0f}%), {progress.failed} failed, "
            f"{new_completion_tokens / max(engine_seconds, 1e-9):.0f} output tok/s"
        )

    if stop == "expired":
        # OpenAI's semantics: what did not run before the window closed is an error line.
        expired = [
            {
                "id": f"batch_req_{uuid.uuid4().hex}",
                "custom_id": request.custom_id,
                "response": None,
                "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the "
                    "completion window expired.",
                },
            }
            for chunk in _pending_chunks(bucket, batch_id, progress.done, 4096)
            for request in chunk
        ]
        bucket.write_bytes(
            batch_file(batch_id, _chunk_name(progress.chunks)),
            "".join(json.dumps(line) + "\n" for line in expired).encode(),
        )
        for line in expired:
            progress.add(line)
    if stop:
        context.log.warning(f"{batch_id} {stop}: keeping {len(progress.done)}/{total} results")
    else:
        catalog.update_batch(batch_id, "finalizing")
    _finalize(bucket, batch_id)
    wall = time.perf_counter() - started
    file_ids = _register_result_files(bucket, catalog, batch_id)
    catalog.update_batch(
        batch_id,
        stop or "completed",
        **file_ids,
        request_completed=progress.completed,
        request_failed=progress.failed,
        usage=progress.usage,
    )
    bucket.remove_tree(batch_file(batch_id, CHECKPOINT))
    webhooks.batch_event(catalog, batch_id, stop or "completed")
    return dg.MaterializeResult(
        metadata={
            "request_counts": dg.MetadataValue.json(
                {"total": total, "completed": progress.completed, "failed": progress.failed}
            ),
            "completed": progress.completed,
            "failed": progress.failed,
            "resumed_requests": resumed,
            "prompt_tokens": progress.prompt_tokens,
            "completion_tokens": progress.completion_tokens,
            "output_tokens_per_s": round(new_completion_tokens / max(engine_seconds, 1e-9), 1),
            "engine_start_seconds": round(start_seconds, 2),
            "engine_seconds": round(engine_seconds, 2),
            "wall_seconds": round(wall, 2),
            **engine.describe(),
            "output_path": bucket.path(batch_file(batch_id, "output.jsonl")),
            "preview": dg.MetadataValue.md(_preview(bucket, batch_id)),
        },
        # Same input and same engine model: same results (up to sampling randomness).
        data_version=dg.DataVersion(f"{sha256[:32]}:{engine.describe()['model']}"),
    )


def _input_sha256(context: dg.AssetExecutionContext) -> str:
    """The sha256 batch_input recorded for this partition in its latest materialization."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=batch_input.key, asset_partitions=[context.partition_key]),
        limit=1,
    ).records
    materialization = records[0].asset_materialization if records else None
    if materialization is None:
        raise dg.Failure(f"batch_input has no materialization for {context.partition_key}")
    return str(materialization.metadata["sha256"].value)


def _iter_output_ids(bucket: Bucket, batch_id: str) -> Iterator[str]:
    for name in ("output.jsonl", "errors.jsonl"):
        path = batch_file(batch_id, name)
        if bucket.exists(path):
            with bucket.open(path, "rb") as fh:
                for raw in fh:
                    yield json.loads(raw)["custom_id"]


@dg.asset_check(asset=batch_output, blocking=True)
def output_complete(
    context: dg.AssetCheckExecutionContext, bucket: Bucket, catalog: Catalog
) -> dg.AssetCheckResult:
    """Every input custom_id appears exactly once across output.jsonl and errors.jsonl (at most
    once for a cancelled batch, which keeps only what finished)."""
    batch_id = context.op_execution_context.partition_key
    cancelled = (catalog.get_batch(batch_id) or {}).get("status") == "cancelled"
    with bucket.open(batch_file(batch_id, "requests.parquet"), "rb") as fh:
        expected = set(pq.read_table(fh, columns=["custom_id"]).column("custom_id").to_pylist())
    seen: dict[str, int] = {}
    for custom_id in _iter_output_ids(bucket, batch_id):
        seen[custom_id] = seen.get(custom_id, 0) + 1
    missing = sorted(expected - seen.keys())
    duplicated = sorted(k for k, n in seen.items() if n > 1)
    unexpected = sorted(seen.keys() - expected)
    return dg.AssetCheckResult(
        passed=not ((missing and not cancelled) or duplicated or unexpected),
        metadata={
            "expected": len(expected),
            "written": sum(seen.values()),
            "missing": dg.MetadataValue.json(missing[:20]),
            "duplicated": dg.MetadataValue.json(duplicated[:20]),
            "unexpected": dg.MetadataValue.json(unexpected[:20]),
        },
    )


class ErrorRateConfig(dg.Config):
    max_error_rate: float = 0.05


@dg.asset_check(asset=batch_output)
def error_rate(
    context: dg.AssetCheckExecutionContext, config: ErrorRateConfig, catalog: Catalog
) -> dg.AssetCheckResult:
    """Warns when more than ``max_error_rate`` of a batch's requests failed."""
    row = catalog.get_batch(context.op_execution_context.partition_key) or {}
    total = row.get("request_total") or 0
    rate = (row.get("request_failed") or 0) / total if total else 0.0
    return dg.AssetCheckResult(
        passed=rate <= config.max_error_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"error_rate": round(rate, 4), "failed": row.get("request_failed") or 0},
    )
