"""``batch_output``: a batch's requests run through the inference engine, in OpenAI output format.

The work is ``vbs_assets.runner.BatchRunner``'s (checkpointed chunks, resume after a crash,
cancel and expiry at chunk boundaries); this module gives it resources and turns its report into
Dagster metadata. A batch that has ended is recorded as it is: materializing it again from the
UI, alone or in a backfill, computes nothing, rewrites nothing and sends no event.
"""

import json
from collections.abc import Iterator

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from vbs_assets.guard import batch_step
from vbs_assets.ingest import batch_input
from vbs_assets.partitions import ACTIVE_RUN_STATUSES, batch_partitions
from vbs_assets.runner import BatchRunner, RunReport, finish
from vbs_resources import Bucket, Catalog, InferenceEngine, Webhooks
from vbs_resources import layout as L
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.wire import BatchErrorEntry


class InferenceConfig(dg.Config):
    """How a batch is cut into checkpointed chunks."""

    chunk_size: int = Field(
        default=256,
        description="Requests handed to the engine at once; a checkpoint is written after each.",
    )


def _preview(bucket: Bucket, batch_id: str, rows: int = 5) -> str:
    lines = ["| custom_id | status | output |", "|---|---|---|"]
    for name in (L.OUTPUT, L.ERRORS):
        path = L.batch_file(batch_id, name)
        if not bucket.exists(path):
            continue
        with bucket.open(path, "rb") as fh:
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
                custom_id = line["custom_id"][:64].replace("|", "\\|")
                lines.append(f"| {custom_id} | {line['response']['status_code']} | {text} |")
    return "\n".join(lines)


def _metadata(
    context: dg.AssetExecutionContext, report: RunReport, bucket: Bucket, engine: InferenceEngine
) -> dict[str, object]:
    metadata: dict[str, object] = {
        "status": report.status,
        "request_counts": dg.MetadataValue.json(
            {"total": report.total, "completed": report.completed, "failed": report.failed}
        ),
        "completed": report.completed,
        "failed": report.failed,
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "recorded": report.recorded,
        "output_path": bucket.uri(L.batch_file(report.batch_id, L.OUTPUT)),
        **engine.describe(),
    }
    if not report.recorded:
        metadata.update(
            resumed_requests=report.resumed,
            output_tokens_per_s=report.output_tokens_per_s,
            engine_start_seconds=round(report.engine_start_seconds, 2),
            engine_seconds=round(report.engine_seconds, 2),
            wall_seconds=round(report.wall_seconds, 2),
        )
    try:  # the batch has ended: a preview that cannot be made must not change that
        metadata["preview"] = dg.MetadataValue.md(_preview(bucket, report.batch_id))
    except Exception:  # noqa: BLE001
        context.log.exception("could not build the preview")
    return metadata


@dg.asset(
    partitions_def=batch_partitions,
    deps=[batch_input],
    pool="gpu",
    code_version="2",
    kinds={"vllm", "jsonl"},
    group_name=L.BATCH_GROUP,
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
    a crash; a batch that has ended is recorded as it is.
    """
    batch_id = context.partition_key
    lifecycle = BatchLifecycle(catalog, webhooks)

    def run_is_active(run_id: str) -> bool:
        run = context.instance.get_run_by_id(run_id)
        return run is not None and run.status in ACTIVE_RUN_STATUSES

    runner = BatchRunner(
        bucket, catalog, lifecycle, engine, context.run_id, run_is_active, context.log
    )

    def fail_keeping_results(errors: list[BatchErrorEntry]) -> bool:
        sha256 = (catalog.batches.get(batch_id) or {}).get("input_sha256")
        return finish(bucket, catalog, lifecycle, batch_id, "failed", sha256, errors=errors)

    with batch_step(context, lifecycle, "engine_error", fail_keeping_results):
        report = runner.run(batch_id, config.chunk_size)
    if report.recorded:
        context.log.info(f"{batch_id} is {report.status}: recorded as it is, nothing recomputed")
    return dg.MaterializeResult(
        metadata=_metadata(context, report, bucket, engine),
        # Same input and same engine model: same results (up to sampling randomness).
        data_version=dg.DataVersion(f"{report.sha256[:32]}:{engine.describe()['model']}"),
    )


def _iter_output_ids(bucket: Bucket, batch_id: str) -> Iterator[str]:
    for name in (L.OUTPUT, L.ERRORS):
        path = L.batch_file(batch_id, name)
        if bucket.exists(path):
            with bucket.open(path, "rb") as fh:
                for raw in fh:
                    yield json.loads(raw)["custom_id"]


@dg.asset_check(asset=batch_output, blocking=True)
def output_complete(
    context: dg.AssetCheckExecutionContext, bucket: Bucket, catalog: Catalog
) -> dg.AssetCheckResult:
    """Every input custom_id appears exactly once across output.jsonl and errors.jsonl (at most
    once for a batch that stopped early: cancelled or failed)."""
    batch_id = context.op_execution_context.partition_key
    status = (catalog.batches.get(batch_id) or {}).get("status")
    partial = status in ("cancelled", "failed")
    requests = L.batch_file(batch_id, L.REQUESTS)
    expected: set[str] = set()
    if bucket.exists(requests):
        with bucket.open(requests, "rb") as fh:
            expected = set(pq.read_table(fh, columns=["custom_id"]).column("custom_id").to_pylist())
    seen: dict[str, int] = {}
    for custom_id in _iter_output_ids(bucket, batch_id):
        seen[custom_id] = seen.get(custom_id, 0) + 1
    missing = sorted(expected - seen.keys())
    duplicated = sorted(k for k, n in seen.items() if n > 1)
    unexpected = sorted(seen.keys() - expected)
    return dg.AssetCheckResult(
        passed=not ((missing and not partial) or duplicated or unexpected),
        metadata={
            "status": status or "unknown",
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
    row = catalog.batches.get(context.op_execution_context.partition_key) or {}
    total = row.get("request_total") or 0
    rate = (row.get("request_failed") or 0) / total if total else 0.0
    return dg.AssetCheckResult(
        passed=rate <= config.max_error_rate,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"error_rate": round(rate, 4), "failed": row.get("request_failed") or 0},
    )
