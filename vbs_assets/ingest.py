"""``batch_input``: a dropped batch file, validated line by line and normalized to Parquet."""

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from vbs_assets.partitions import batch_partitions
from vbs_assets.validation import Limits, ValidationReport, validate_batch_file
from vbs_resources import Bucket, Catalog, Webhooks, batch_file

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
    with bucket.atomic_writer(batch_file(batch_id, "requests.parquet")) as out:
        writer = pq.ParquetWriter(out, REQUESTS_SCHEMA, compression="zstd")
        try:
            with bucket.open(batch_file(batch_id, "input.jsonl"), "rb") as fh:
                report = validate_batch_file(
                    fh,
                    size=bucket.size(batch_file(batch_id, "input.jsonl")),
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
    code_version="1",
    kinds={"parquet"},
    group_name="batches",
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
    """
    batch_id = context.partition_key
    declared = (catalog.get_batch(batch_id) or {}).get("endpoint")
    limits = Limits(max_requests=config.max_requests, max_bytes=config.max_bytes)
    size = bucket.size(batch_file(batch_id, "input.jsonl"))
    try:
        report = ingest_batch_file(bucket, batch_id, limits, declared)
    except InvalidBatchFile as invalid:
        report = invalid.report
        catalog.update_batch(
            batch_id,
            "failed",
            endpoint=report.endpoint,
            request_total=report.request_count,
            errors=[e.model_dump() for e in report.errors],
        )
        webhooks.batch_event(catalog, batch_id, "failed")
        first = report.errors[0]
        where = f"line {first.line}: " if first.line else ""
        raise dg.Failure(
            description=f"Batch {batch_id} failed validation with {report.error_count} "
            f"error(s); first: {where}{first.code}: {first.message}",
            metadata={
                "error_count": report.error_count,
                "errors": dg.MetadataValue.md(_errors_table(report)),
            },
            allow_retries=False,
        ) from None

    catalog.update_batch(
        batch_id,
        endpoint=report.endpoint,
        request_total=report.request_count,
        models=dict(report.models),
    )
    context.log.info(
        f"{report.request_count} requests valid ({size / 1e6:.1f} MB) for {report.endpoint}"
    )
    return dg.MaterializeResult(
        metadata={
            "request_count": report.request_count,
            "bytes": size,
            "sha256": report.sha256,
            "endpoint": report.endpoint,
            "models": dg.MetadataValue.json(dict(report.models)),
            "path": bucket.path(batch_file(batch_id, "requests.parquet")),
        },
        data_version=dg.DataVersion(report.sha256),
    )
