"""``label_studio_sync``: annotations made in Label Studio, pulled into the catalog."""

import json

import dagster as dg

from vbs_resources import Catalog
from vbs_resources import layout as L
from vbs_resources.curation import ConquestTypeFileError, ConquestTypes
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
) -> dg.SkipReason:
    """Never launches runs: each tick records what changed and says so in the tick's text."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        registry = conquest_types.registry()
        report, cursor = sync_annotations(label_studio, catalog, registry, cursor)
    except ConquestTypeFileError as exc:
        return dg.SkipReason(f"the conquest types do not load: {exc}")
    except LabelStudioError as exc:
        # Down or refusing: nothing is lost, the cursor stays and the next tick tries again.
        return dg.SkipReason(f"Label Studio unavailable, trying again next tick: {exc}")
    for problem in report.problems:
        context.log.warning(problem)
    context.update_cursor(json.dumps(cursor, sort_keys=True))
    return dg.SkipReason(report.summary())
