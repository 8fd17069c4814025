"""The one ``Definitions`` object of the vbs code location (``workspace.yaml`` loads it).

It sits outside the packages it gathers, so that sensors can import assets and nothing imports
the definitions: settings/layout/wire <- resources <- assets <- sensors <- definitions.
"""

import warnings

import dagster as dg

from vbs_assets.curation import conquests, label_studio_tasks
from vbs_assets.datasets import curated_dataset
from vbs_assets.inference import batch_output, error_rate, output_complete
from vbs_assets.ingest import batch_input
from vbs_assets.jobs import (
    batch_job,
    curation_job,
    dataset_job,
    deploy_job,
    fine_tuning_job,
    training_job,
)
from vbs_assets.training import adapter_eval, deployed_model, fine_tuned_adapter
from vbs_resources import build_resources, load_settings
from vbs_resources.error_tracking import start_error_tracking
from vbs_resources.logs import configure_logging, json_sensor_logs
from vbs_sensors import all_sensors
from vbs_sensors.retrain import retraining_schedule

settings = load_settings()
# The code server (sensors) and every run worker load this module: each reports its errors.
start_error_tracking(settings, "dagster")
if settings.log_format == "json":
    configure_logging("json")
    json_sensor_logs()
    # The instance's python_logs handler (the runs' JSON lines) is a beta of Dagster's.
    warnings.filterwarnings("ignore", category=dg.BetaWarning)

defs = dg.Definitions(
    assets=[
        batch_input,
        batch_output,
        conquests,
        label_studio_tasks,
        curated_dataset,
        fine_tuned_adapter,
        adapter_eval,
        deployed_model,
    ],
    asset_checks=[output_complete, error_rate],
    jobs=[batch_job, curation_job, dataset_job, fine_tuning_job, training_job, deploy_job],
    sensors=all_sensors,
    schedules=[
        retraining_schedule(
            settings.retrain_cron, settings.retrain_min_new_gold, settings.retrain_schedule_on
        )
    ],
    resources=build_resources(settings, for_dagster=True),
)
