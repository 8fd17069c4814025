"""Sensors and schedules."""

from vbs_sensors.inbox import inbox_sensor

all_sensors = [inbox_sensor]
