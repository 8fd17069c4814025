"""Scheduled retraining, in two steps, each a Dagster run with its reason in the UI:

1. ``retraining_schedule`` (weekly by default, ``VBS_RETRAIN_CRON``; stopped unless
   ``VBS_RETRAIN_SCHEDULE_ON``) looks at each conquest type and builds its curated dataset when
   the type's gold conquests hold ``VBS_RETRAIN_MIN_NEW_GOLD`` or more that its deployed model
   was not trained on; every other type is skipped, its reason in the tick's log and text.
2. ``retrain_on_new_dataset`` sees that build succeed and launches ``fine_tuning_job`` (train,
   evaluate, deploy if it beats the base) on the version it wrote, unless that version is the
   deployed model's already.
"""

import dagster as dg

from vbs_assets.jobs import dataset_job, fine_tuning_job
from vbs_resources import Catalog
from vbs_resources import layout as L
from vbs_resources.curation.datasets import CurationPolicy
from vbs_resources.training.retrain import decide, deployed_for_type


def retraining_schedule(
    cron: str = "0 3 * * 1", min_new_gold: int = 20, running: bool = False
) -> dg.ScheduleDefinition:
    @dg.schedule(
        name=L.RETRAIN_SCHEDULE,
        cron_schedule=cron,
        job=dataset_job,
        default_status=dg.DefaultScheduleStatus.RUNNING
        if running
        else dg.DefaultScheduleStatus.STOPPED,
        description=f"Rebuild a conquest type's dataset for retraining once it holds "
        f"{min_new_gold} new gold conquests beyond its deployed model's dataset.",
    )
    def _schedule(
        context: dg.ScheduleEvaluationContext, catalog: Catalog, curation: CurationPolicy
    ) -> list[dg.RunRequest] | dg.SkipReason:
        types = context.instance.get_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS)
        if not types:
            return dg.SkipReason("no conquest type has a partition yet")
        requests, reasons = [], []
        for type_id in sorted(types):
            decision = decide(catalog, type_id, curation.gold_min_rating, min_new_gold)
            context.log.info(decision.reason)
            reasons.append(decision.reason)
            if decision.retrain:
                requests.append(
                    dg.RunRequest(
                        partition_key=type_id,
                        run_key=f"retrain-{type_id}-{decision.gold}-{decision.new}",
                        tags={L.TAG_RETRAIN: type_id},
                    )
                )
        return requests or dg.SkipReason("; ".join(reasons))

    return _schedule


@dg.run_status_sensor(
    name=L.RETRAIN_SENSOR,
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[dataset_job],
    request_job=fine_tuning_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Trains, evaluates and deploys the dataset version a retraining build wrote.",
)
def retrain_on_new_dataset(
    context: dg.RunStatusSensorContext, catalog: Catalog
) -> dg.RunRequest | dg.SkipReason:
    run = context.dagster_run
    type_id = run.tags.get(L.TAG_RETRAIN)
    if not type_id:
        return dg.SkipReason(f"run {run.run_id} was not a retraining build")
    records = context.instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
    ).records
    versions = [
        r.event_log_entry.asset_materialization.metadata["version"].value
        for r in records
        if r.event_log_entry.asset_materialization
        and "version" in r.event_log_entry.asset_materialization.metadata
    ]
    if not versions:
        return dg.SkipReason(f"run {run.run_id} wrote no dataset of {type_id}")
    version = str(versions[-1])
    model = deployed_for_type(catalog, type_id)
    if model is not None and model["lineage"].get("dataset_version") == version:
        return dg.SkipReason(f"{version} is what {model['name']} was trained on already")
    return dg.RunRequest(
        partition_key=version, run_key=f"retrain-{version}", tags={L.TAG_RETRAIN: type_id}
    )
