"""``batch_input``: a dropped batch file, validated line by line and normalized to Parquet."""

from dataclasses import dataclass

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from vbs_assets.guard import batch_step
from vbs_assets.partitions import batch_partitions
from vbs_assets.runner import RunRefused
from vbs_assets.validation import Limits, ValidationReport, validate_batch_file
from vbs_resources import Bucket, Catalog, Webhooks
from vbs_resources import layout as L
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.wire import TERMINAL_STATUSES, BatchErrorEntry

REQUESTS_SCHEMA = pa.schema(
    [
        ("line", pa.int32()),
        ("custom_id", pa.string()),
        ("model", pa.string()),
        ("body", pa.string()),
    ]
)


class IngestConfig(dg.Config):
    """Limits a batch file must respect (OpenAI's by default)."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024


class InvalidBatchFile(Exception):
    def __init__(self, report: ValidationReport) -> None:
        super().__init__(f"{report.error_count} validation errors")
        self.report = report


def ingest_batch_file(
    bucket: Bucket, batch_id: str, limits: Limits, endpoint: str | None = None
) -> ValidationReport:
    """Validate ``input.jsonl`` and write ``requests.parquet``, which appears only when every
    line is valid (raises ``InvalidBatchFile`` with the report otherwise)."""
    source = L.batch_file(batch_id, L.INPUT)
    with bucket.atomic_writer(L.batch_file(batch_id, L.REQUESTS)) as out:
        writer = pq.ParquetWriter(out, REQUESTS_SCHEMA, compression="zstd")
        try:
            with bucket.open(source, "rb") as fh:
                report = validate_batch_file(
                    fh,
                    size=bucket.size(source),
                    limits=limits,
                    endpoint=endpoint,
                    sink=lambda rows: writer.write_table(
                        pa.Table.from_pylist(rows, schema=REQUESTS_SCHEMA)
                    ),
                )
        finally:
            writer.close()
        if not report.ok:
            raise InvalidBatchFile(report)
    return report


@dataclass
class IngestReport:
    status: str
    request_count: int
    sha256: str
    endpoint: str | None
    models: dict[str, int]
    bytes: int
    # True when the batch was validated (or ended) before: nothing was read or written.
    recorded: bool = False


def ingest(
    bucket: Bucket, catalog: Catalog, lifecycle: BatchLifecycle, batch_id: str, limits: Limits
) -> IngestReport:
    """Validate a batch's input once. A batch that was validated before, or has ended, is
    reported as it is; a file that changed since it was taken, or fails validation, fails the
    batch (``InvalidBatchFile`` carries the report)."""
    row = catalog.batches.get(batch_id)
    if row is None:
        raise RunRefused(f"{batch_id} is not in the catalog")
    input_path = L.batch_file(batch_id, L.INPUT)
    validated = row.get("models") is not None and bucket.exists(L.batch_file(batch_id, L.REQUESTS))
    if row["status"] in TERMINAL_STATUSES or validated:
        sha256 = row.get("input_sha256") or ""
        if not sha256 and validated and row["status"] not in TERMINAL_STATUSES:
            # Validated by a vbs from before the hash was recorded: record it now, so that the
            # batch's run (and its checkpoint, tied to the hash) can go on.
            sha256 = bucket.sha256(input_path)
            lifecycle.record(batch_id, input_sha256=sha256)
        return IngestReport(
            row["status"],
            row["request_total"],
            sha256,
            row.get("endpoint"),
            dict(row.get("models") or {}),
            bucket.size(input_path) if bucket.exists(input_path) else 0,
            recorded=True,
        )
    if not bucket.exists(input_path):
        error = BatchErrorEntry(code="input_missing", message="The batch's input file is gone.")
        lifecycle.fail(batch_id, [error])
        raise InvalidBatchFile(ValidationReport(errors=[error], error_count=1))
    size = bucket.size(input_path)
    try:
        report = ingest_batch_file(bucket, batch_id, limits, row.get("endpoint"))
    except InvalidBatchFile as invalid:
        report = invalid.report
    taken = row.get("input_sha256")
    if taken and report.sha256 != taken:
        # Written to after it was taken (an appending writer that kept its handle): what ran
        # would not be what was submitted.
        report.errors = [
            BatchErrorEntry(
                code="input_changed",
                message=f"The file changed after it was taken (sha256 {taken[:12]}... then, "
                f"{report.sha256[:12]}... now): write it under another name and rename it "
                "into the inbox when it is complete.",
            )
        ]
        report.error_count = 1
        bucket.remove(L.batch_file(batch_id, L.REQUESTS))
    if not report.ok:
        lifecycle.fail(
            batch_id,
            report.listed_errors(),
            endpoint=report.endpoint,
            request_total=report.valid_requests,
        )
        raise InvalidBatchFile(report)
    lifecycle.record(
        batch_id,
        endpoint=report.endpoint,
        request_total=report.request_count,
        models=dict(report.models),
        input_sha256=report.sha256,
    )
    return IngestReport(
        "validating",
        report.request_count,
        report.sha256,
        report.endpoint,
        dict(report.models),
        size,
    )


def _errors_table(report: ValidationReport, limit: int = 20) -> str:
    rows = ["| line | code | param | message |", "|---|---|---|---|"]
    for e in report.errors[:limit]:
        message = e.message.replace("|", "\\|")
        rows.append(f"| {e.line or ''} | {e.code} | {e.param or ''} | {message} |")
    if report.error_count > limit:
        rows.append(f"| | | | ... and {report.error_count - limit} more |")
    return "\n".join(rows)


@dg.asset(
    partitions_def=batch_partitions,
    code_version="2",
    kinds={"parquet"},
    group_name=L.BATCH_GROUP,
)
def batch_input(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    bucket: Bucket,
    catalog: Catalog,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    """The requests of one batch, validated against the OpenAI batch line format.

    Reads ``batches/<id>/input.jsonl`` in constant memory and writes the valid requests to
    ``batches/<id>/requests.parquet``. Any format error fails the batch, as OpenAI does at its
    ``validating`` step, with each error's line, code and parameter in the catalog's ``errors``.
    A batch validated before, or already ended, is recorded as it is, untouched.
    """
    batch_id = context.partition_key
    lifecycle = BatchLifecycle(catalog, webhooks)
    limits = Limits(max_requests=config.max_requests, max_bytes=config.max_bytes)
    with batch_step(context, lifecycle, "validation_error"):
        try:
            report = ingest(bucket, catalog, lifecycle, batch_id, limits)
        except InvalidBatchFile as invalid:
            failed = invalid.report
            first = failed.errors[0]
            where = f"line {first.line}: " if first.line else ""
            raise dg.Failure(
                description=f"Batch {batch_id} failed validation with {failed.error_count} "
                f"error(s); first: {where}{first.code}: {first.message}",
                metadata={
                    "error_count": failed.error_count,
                    "errors": dg.MetadataValue.md(_errors_table(failed)),
                },
                allow_retries=False,
            ) from None
    if report.recorded:
        context.log.info(f"{batch_id} is {report.status}: recorded as it is, nothing re-read")
    else:
        context.log.info(
            f"{report.request_count} requests valid ({report.bytes / 1e6:.1f} MB) "
            f"for {report.endpoint}"
        )
    return dg.MaterializeResult(
        metadata={
            "status": report.status,
            "request_count": report.request_count,
            "bytes": report.bytes,
            "sha256": report.sha256,
            "endpoint": report.endpoint or "",
            "models": dg.MetadataValue.json(report.models),
            "path": bucket.uri(L.batch_file(batch_id, L.REQUESTS)),
            "recorded": report.recorded,
        },
        data_version=dg.DataVersion(report.sha256 or batch_id),
    )
