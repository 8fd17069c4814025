"""Sensors and schedules."""

from vbs_sensors.curation import conquest_type_partition_sensor, label_studio_sync
from vbs_sensors.inbox import inbox_sensor
from vbs_sensors.reconcile import batch_reconciler
from vbs_sensors.retrain import retrain_on_new_dataset

all_sensors = [
    inbox_sensor,
    batch_reconciler,
    label_studio_sync,
    conquest_type_partition_sensor,
    retrain_on_new_dataset,
]
