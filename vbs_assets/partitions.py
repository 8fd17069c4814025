"""Partitions: one dynamic partition per batch (added only by sensors, or the API) and one per
conquest type (a sensor, or ``vbs datasets build``), and what sensors and assets need to know
of a batch's runs."""

import dagster as dg

from vbs_resources.layout import (
    BATCH_PARTITIONS,
    CONQUEST_TYPE_PARTITIONS,
    DATASET_VERSION_PARTITIONS,
)

batch_partitions = dg.DynamicPartitionsDefinition(name=BATCH_PARTITIONS)
# One per conquest type, for its curated dataset (and, later, its adapters).
conquest_type_partitions = dg.DynamicPartitionsDefinition(name=CONQUEST_TYPE_PARTITIONS)
# One per dataset version (curated_dataset adds each it writes): what an adapter trains on.
dataset_version_partitions = dg.DynamicPartitionsDefinition(name=DATASET_VERSION_PARTITIONS)

# A run in one of these may still write a batch's files.
ACTIVE_RUN_STATUSES = frozenset(
    {
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING,
    }
)


def batch_runs(run_requests: list[dg.RunRequest], cursor: str | None = None) -> dg.SensorResult:
    """A sensor's result that requests ``run_requests`` and adds their batches' partitions
    (a partition that exists already is left as it is), together, as one result."""
    keys = sorted({r.partition_key for r in run_requests if r.partition_key})
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[batch_partitions.build_add_request(keys)],
        cursor=cursor,
    )
