"""The one ``Definitions`` object of the vbs code location."""

import dagster as dg

from vbs_assets.inference import batch_output, error_rate, output_complete
from vbs_assets.ingest import batch_input
from vbs_assets.jobs import batch_job
from vbs_resources import build_resources
from vbs_sensors import all_sensors

defs = dg.Definitions(
    assets=[batch_input, batch_output],
    asset_checks=[output_complete, error_rate],
    jobs=[batch_job],
    sensors=all_sensors,
    resources=build_resources(),
)
