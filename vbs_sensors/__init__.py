"""Sensors and schedules."""

from vbs_sensors.inbox import inbox_sensor
from vbs_sensors.reconcile import batch_reconciler

all_sensors = [inbox_sensor, batch_reconciler]
