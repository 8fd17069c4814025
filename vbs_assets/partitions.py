"""Partitions: one dynamic partition per batch, added only by the inbox sensor (or the API)."""

import dagster as dg

batch_partitions = dg.DynamicPartitionsDefinition(name="batches")
