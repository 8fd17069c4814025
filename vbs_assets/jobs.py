"""Jobs the sensors and the API launch."""

import dagster as dg

from vbs_assets.curation import conquests, label_studio_tasks
from vbs_assets.datasets import curated_dataset
from vbs_assets.inference import batch_output
from vbs_assets.ingest import batch_input
from vbs_assets.partitions import (
    batch_partitions,
    conquest_type_partitions,
    dataset_version_partitions,
)
from vbs_assets.training import adapter_eval, deployed_model, fine_tuned_adapter
from vbs_resources.layout import (
    BATCH_JOB,
    CURATION_JOB,
    DATASET_JOB,
    DEPLOY_JOB,
    FINE_TUNING_JOB,
    TRAINING_JOB,
)

# One process per run: the vLLM engine is loaded once, in the step that uses it, and a kill of
# the run's process is a kill of the whole run, which the daemon then retries.
batch_job = dg.define_asset_job(
    BATCH_JOB,
    selection=dg.AssetSelection.assets(batch_input, batch_output),
    partitions_def=batch_partitions,
    executor_def=dg.in_process_executor,
    description="Validate a batch file, run it through the engine and check the results.",
)

# A run of its own, after the batch's (the ``typed_batch_curation`` sensor launches it): it
# holds no gpu pool, so curation waiting on Label Studio never holds up inference or training,
# and its failure never fails the batch.
curation_job = dg.define_asset_job(
    CURATION_JOB,
    selection=dg.AssetSelection.assets(conquests, label_studio_tasks),
    partitions_def=batch_partitions,
    executor_def=dg.in_process_executor,
    description="Make a typed batch's results conquests and send them to Label Studio.",
)

dataset_job = dg.define_asset_job(
    DATASET_JOB,
    selection=dg.AssetSelection.assets(curated_dataset),
    partitions_def=conquest_type_partitions,
    description="Build a conquest type's curated dataset from its gold conquests, and check it.",
)

# Each step in a process of its own: training (Unsloth patches transformers when imported) and
# evaluation (vLLM) never share one.
fine_tuning_job = dg.define_asset_job(
    FINE_TUNING_JOB,
    selection=dg.AssetSelection.assets(fine_tuned_adapter, adapter_eval, deployed_model),
    partitions_def=dataset_version_partitions,
    description="Train a LoRA adapter on a dataset version, evaluate it against its base, and "
    "deploy it when it beats the base (the retraining schedule runs this).",
)

training_job = dg.define_asset_job(
    TRAINING_JOB,
    selection=dg.AssetSelection.assets(fine_tuned_adapter, adapter_eval),
    partitions_def=dataset_version_partitions,
    description="Train and evaluate an adapter, leaving deployment to a person (the "
    "fine-tuning API's jobs).",
)

deploy_job = dg.define_asset_job(
    DEPLOY_JOB,
    selection=dg.AssetSelection.assets(deployed_model),
    partitions_def=dataset_version_partitions,
    description="Deploy an evaluated adapter (POST /v1/fine_tuning/jobs/{id}/deploy).",
)
