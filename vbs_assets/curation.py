"""``conquests``: a typed batch's results as conquests in the catalog, ready to be judged;
``label_studio_tasks``: each conquest as a task of its type's Label Studio project.

A batch is typed when its metadata names a conquest type (``vbs conquests submit`` sets it; an
API client or an inbox sidecar may too). Each result line becomes one conquest; error lines
become conquests with status ``FAILED``. Making them again (a re-materialization, a retried
run) finds the same ids and adds nothing, keeping whatever curators have said since.
"""

import json

import dagster as dg

from vbs_assets.inference import batch_output
from vbs_assets.partitions import batch_partitions
from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.curation import ConquestType, ConquestTypeFileError, ConquestTypes
from vbs_resources.curation.conquests import (
    COMPLETED,
    CURATED_ENDPOINTS,
    ConquestSourceError,
    build_conquests,
    records_of,
)
from vbs_resources.curation.handler import LabelStudioHandler
from vbs_resources.curation.label_studio import (
    LabelStudio,
    LabelStudioError,
    LabelStudioUnavailable,
)

_INSERT_ROWS = 1000


def _preview(rows: list[dict[str, object]]) -> str:
    lines = ["| custom_id | status | model | prediction |", "|---|---|---|---|"]
    for row in rows[:5]:
        text = row["prediction"] if row["status"] == COMPLETED else json.dumps(row["error"])
        cells = [str(row["custom_id"])[:64], str(row["status"]), str(row["model"]), str(text)]
        cells = [c.replace("\n", " ").replace("|", "\\|")[:120] for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _skipped(reason: str, **metadata: object) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"conquests": 0, "skipped": reason, **metadata})


def _type(
    context: dg.AssetExecutionContext, conquest_types: ConquestTypes, type_id: str
) -> ConquestType | dg.MaterializeResult:
    """The batch's conquest type, or the skip that reports why it cannot be had: the batch
    keeps its results, and this asset can be materialized again once the type loads."""
    try:
        return conquest_types.registry().get(type_id)
    except (KeyError, ConquestTypeFileError) as exc:
        context.log.error(f"{context.partition_key}: {exc.args[0]}")
        return _skipped(str(exc.args[0]), conquest_type=type_id)


@dg.asset(
    name=L.CONQUESTS,
    partitions_def=batch_partitions,
    deps=[batch_output],
    code_version="1",
    kinds={"sql"},
    group_name=L.CURATION_GROUP,
)
def conquests(
    context: dg.AssetExecutionContext,
    bucket: Bucket,
    catalog: Catalog,
    conquest_types: ConquestTypes,
) -> dg.MaterializeResult:
    """One conquest per result line of a batch whose metadata names a conquest type (id, type
    and version, status, input data, prompt, prediction, model, batch, custom_id). A batch
    without a type has none; a type that is not known is reported and skipped, never a failed
    batch."""
    batch_id = context.partition_key
    batch = catalog.batches.get(batch_id)
    if batch is None:
        return _skipped("the batch is not in the catalog")
    metadata = batch.get("batch_metadata") or {}
    type_id = metadata.get(L.META_CONQUEST_TYPE)
    if not type_id:
        return _skipped("the batch names no conquest type (metadata conquest_type)")
    if batch.get("endpoint") not in CURATED_ENDPOINTS:
        context.log.warning(f"{batch_id}: {batch.get('endpoint')} answers are not curated")
        return _skipped(f"{batch.get('endpoint')} answers are not curated", conquest_type=type_id)
    conquest_type = _type(context, conquest_types, type_id)
    if isinstance(conquest_type, dg.MaterializeResult):
        return conquest_type
    version = metadata.get(L.META_CONQUEST_TYPE_VERSION) or conquest_type.version
    conquest_type = conquest_type.model_copy(update={"version": version})
    records = None
    if metadata.get(L.META_CONQUEST_RECORDS):
        try:
            records = records_of(bucket, catalog, metadata[L.META_CONQUEST_RECORDS], conquest_type)
        except ConquestSourceError as exc:
            context.log.warning(f"{batch_id}: {exc}; input data is each request's messages")

    made = added = completed = 0
    sample: list[dict[str, object]] = []
    pending: list[dict[str, object]] = []
    for row in build_conquests(bucket, batch, conquest_type, records):
        made += 1
        completed += row["status"] == COMPLETED
        if len(sample) < 5:
            sample.append(row)
        pending.append(row)
        if len(pending) >= _INSERT_ROWS:
            added += catalog.conquests.add(pending)
            pending = []
            context.log.info(f"{batch_id}: {made} conquests made")
    added += catalog.conquests.add(pending)
    context.log.info(f"{batch_id}: {made} conquests of type {type_id}, {added} new")
    return dg.MaterializeResult(
        metadata={
            "conquest_type": type_id,
            "type_version": version,
            "conquests": made,
            "new": added,
            "completed": completed,
            "failed": made - completed,
            "preview": dg.MetadataValue.md(_preview(sample)),
        }
    )


@dg.asset(
    name=L.LABEL_STUDIO_TASKS,
    partitions_def=batch_partitions,
    deps=[conquests],
    code_version="1",
    kinds={"labelstudio"},
    group_name=L.CURATION_GROUP,
    # Label Studio down or starting (a connection error, a timeout, a 5xx): the step waits and
    # tries again. Anything else fails at once: it would fail again.
    retry_policy=dg.RetryPolicy(max_retries=5, delay=20, backoff=dg.Backoff.EXPONENTIAL),
)
def label_studio_tasks(
    context: dg.AssetExecutionContext,
    catalog: Catalog,
    conquest_types: ConquestTypes,
    label_studio: LabelStudio,
) -> dg.MaterializeResult:
    """The batch's conquests as tasks of their type's Label Studio project (one project per
    type, its labeling config generated from the type), each imported once."""
    batch_id = context.partition_key
    rows = [r for r in catalog.conquests.of_batch(batch_id) if r["excluded_at"] is None]
    if not rows:
        return _skipped("the batch has no conquests to curate (none made, or all excluded)")
    type_id = rows[0]["type"]
    conquest_type = _type(context, conquest_types, type_id)
    if isinstance(conquest_type, dg.MaterializeResult):
        return conquest_type
    try:
        export = LabelStudioHandler(label_studio, catalog).export(conquest_type, rows)
    except LabelStudioUnavailable as exc:
        raise dg.Failure(
            description=f"Label Studio is unavailable: {exc}. The batch and its conquests are "
            "kept; this step retries, and materializing it again later exports them.",
            allow_retries=True,
        ) from None
    except LabelStudioError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    except Exception as exc:  # noqa: BLE001 - a bug or bad data: retrying cannot help
        raise dg.Failure(
            description=f"Exporting to Label Studio failed: {type(exc).__name__}: "
            f"{str(exc)[:500]}. Not retried; materialize this step again once it is fixed.",
            allow_retries=False,
        ) from exc
    context.log.info(
        f"{batch_id}: {export.imported} tasks imported into project {export.project_id}, "
        f"{export.already} already there, {export.recovered} found again"
    )
    return dg.MaterializeResult(
        metadata={
            "conquest_type": type_id,
            "project_id": export.project_id,
            "project_url": dg.MetadataValue.url(
                f"{label_studio.url.rstrip('/')}/projects/{export.project_id}"
            ),
            "imported": export.imported,
            "already_there": export.already,
            "recovered": export.recovered,
            "project_created": export.project_created,
            "config_updated": export.config_updated,
        }
    )
