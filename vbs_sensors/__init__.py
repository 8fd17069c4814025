"""Sensors and schedules."""

from vbs_sensors.curation import (
    conquest_type_partition_sensor,
    label_studio_sync,
    typed_batch_curation,
)
from vbs_sensors.fine_tuning import fine_tuning_reconciler
from vbs_sensors.inbox import inbox_sensor
from vbs_sensors.reconcile import batch_reconciler
from vbs_sensors.retrain import retrain_on_new_dataset
from vbs_sensors.webhooks import webhook_delivery

all_sensors = [
    inbox_sensor,
    batch_reconciler,
    fine_tuning_reconciler,
    label_studio_sync,
    typed_batch_curation,
    conquest_type_partition_sensor,
    retrain_on_new_dataset,
    webhook_delivery,
]
