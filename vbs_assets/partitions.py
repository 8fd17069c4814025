"""Partitions: one dynamic partition per batch, added only by the inbox sensor (or the API)."""

import dagster as dg

from vbs_resources.layout import BATCH_PARTITIONS

batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS)
