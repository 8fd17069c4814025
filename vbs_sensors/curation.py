"""``typed_batch_curation``: each typed batch's conquests made, once it has ended;
``label_studio_sync``: annotations made in Label Studio, pulled into the catalog;
``conquest_type_partitions``: a partition per conquest type, for its curated dataset."""

import json

import dagster as dg

from vbs_assets.jobs import curation_job
from vbs_assets.partitions import conquest_type_partitions
from vbs_resources import Catalog
from vbs_resources import layout as L
from vbs_resources.curation import ConquestTypeFileError, ConquestTypes
from vbs_resources.curation.datasets import CurationPolicy
from vbs_resources.curation.label_studio import LabelStudio, LabelStudioError
from vbs_resources.curation.sync import sync_annotations


@dg.sensor(
    name=L.LABEL_STUDIO_SYNC,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Pulls new and edited Label Studio annotations into the catalog (incremental, "
    "per project); the newest edit of a conquest wins, the ones it replaces are kept.",
)
def label_studio_sync(
    context: dg.SensorEvaluationContext,
    catalog: Catalog,
    conquest_types: ConquestTypes,
    label_studio: LabelStudio,
    curation: CurationPolicy,
) -> dg.SkipReason:
    """Never launches runs: each tick records what changed and says so in the tick's text."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        registry = conquest_types.registry()
        report, cursor = sync_annotations(
            label_studio, catalog, registry, cursor, gold_rating=curation.gold_min_rating
        )
    except ConquestTypeFileError as exc:
        return dg.SkipReason(f"the conquest types do not load: {exc}")
    except LabelStudioError as exc:
        # Down or refusing: nothing is lost, the cursor stays and the next tick tries again.
        return dg.SkipReason(f"Label Studio unavailable, trying again next tick: {exc}")
    for problem in report.problems:
        context.log.warning(problem)
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    return dg.SkipReason(report.summary())


@dg.sensor(
    name=L.CONQUEST_TYPE_SENSOR,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a curated_dataset partition for each conquest type that loads.",
)
def conquest_type_partition_sensor(
    context: dg.SensorEvaluationContext, conquest_types: ConquestTypes
) -> dg.SensorResult | dg.SkipReason:
    """Never launches runs: a new type file (or a type registered in code) gets its partition."""
    try:
        known = [t.id for t in conquest_types.registry().all()]
    except ConquestTypeFileError as exc:
        return dg.SkipReason(f"the conquest types do not load: {exc}")
    have = set(context.instance.get_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS))
    new = sorted(set(known) - have)
    if not new:
        return dg.SkipReason(f"{len(known)} conquest types, each with its partition")
    return dg.SensorResult(
        dynamic_partitions_requests=[conquest_type_partitions.build_add_request(new)],
        skip_reason=f"added partitions for {', '.join(new)}",
    )


# Batches whose results can be judged: what a completed, cancelled or expired batch finished.
CURATED_STATUSES = ("completed", "cancelled", "expired")


@dg.sensor(
    name=L.CURATION_SENSOR,
    job=curation_job,
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches curation_job (conquests, then Label Studio tasks) for each typed batch "
    "once it has ended, in a run of its own that holds no gpu pool.",
)
def typed_batch_curation(
    context: dg.SensorEvaluationContext, catalog: Catalog
) -> dg.SensorResult | dg.SkipReason:
    """Run keys are the batch's id: each batch's conquests are made once this way (again by a
    re-materialization in the UI, which finds the same rows)."""
    since = float(context.cursor) if context.cursor else 0.0
    rows = catalog.batches.ended_since(since)
    requests = [
        dg.RunRequest(run_key=f"{row['id']}:curation", partition_key=row["id"])
        for row in rows
        if row["status"] in CURATED_STATUSES
        and (row["batch_metadata"] or {}).get(L.META_CONQUEST_TYPE)
    ]
    # The newest change seen, less a second: a batch ended in the same instant as the last one
    # seen is looked at again (its run key makes a second request a no-op).
    cursor = str(max((r["updated_at"] for r in rows), default=since + 1) - 1)
    if not requests:
        return dg.SensorResult(
            skip_reason="no typed batch ended since the last tick", cursor=cursor
        )
    return dg.SensorResult(run_requests=requests, cursor=cursor)
