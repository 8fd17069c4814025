"""Dagster resources and the plain code under them. ``build_resources`` is the only code that
turns settings into resources; everything else receives resources."""

from __future__ import annotations

from typing import Any

import dagster as dg

from vbs_resources.bucket import Bucket
from vbs_resources.catalog import Catalog
from vbs_resources.curation.datasets import CurationPolicy
from vbs_resources.curation.label_studio import LabelStudio
from vbs_resources.curation.registry import ConquestTypes
from vbs_resources.engine import (
    EngineRequest,
    EngineResult,
    InferenceEngine,
    VLLMEngine,
    VLLMServerEngine,
)
from vbs_resources.model_store import default_embedding_model_dir, default_model_dir
from vbs_resources.settings import SECRET_VARIABLES, Settings, load_settings
from vbs_resources.training import Trainer
from vbs_resources.webhooks import Webhooks

__all__ = [
    "Bucket",
    "Catalog",
    "EngineRequest",
    "EngineResult",
    "InferenceEngine",
    "Settings",
    "VLLMEngine",
    "VLLMServerEngine",
    "Webhooks",
    "build_resources",
    "load_settings",
]


def _secret(settings: Settings, field: str, for_dagster: bool) -> Any:
    """A secret setting's value for a resource: in Dagster an ``EnvVar`` (resolved inside the
    run, shown by name only in the UI and run config), elsewhere the value itself."""
    value = getattr(settings, field)
    if value is None:
        return None
    if for_dagster:
        return dg.EnvVar(SECRET_VARIABLES[field])
    return value.get_secret_value()


def build_engine(settings: Settings, for_dagster: bool = False) -> InferenceEngine:
    """The engine of ``settings.engine``: vLLM in the run's process, or a vLLM server."""
    local = build_local_engine(settings)
    if settings.engine == "in_process":
        return local
    return VLLMServerEngine(
        url=settings.resolved_engine_url,
        # The servers `vbs serve` starts; a team's own (VBS_ENGINE_URL): what its router lists.
        replica_urls=settings.engine_replica_urls if settings.engine_url is None else [],
        api_key=_secret(settings, "engine_api_key", for_dagster),
        local=local,
        concurrency=settings.engine_concurrency,
        timeout_s=settings.engine_timeout_s,
        retry_s=settings.engine_retry_s,
        step_retries=settings.engine_step_retries,
        step_retry_wait_s=settings.engine_step_retry_wait_s,
    )


def build_local_engine(settings: Settings) -> VLLMEngine:
    embedding = settings.embedding_model
    if embedding is None:
        found = default_embedding_model_dir()
        embedding = str(found) if found else None
    return VLLMEngine(
        model=settings.model or str(default_model_dir(settings.home)),
        served_model_name=settings.served_model_name,
        embedding_model=embedding or None,
        embedding_served_name=settings.embedding_served_name,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        # One GPU holds both engines (a warm server's chat engine and a run's embedding engine),
        # each within its own share.
        gpu_memory_utilization=round(
            settings.gpu_memory_utilization
            - (settings.embedding_gpu_memory_utilization if embedding else 0),
            4,
        ),
        embedding_gpu_memory_utilization=settings.embedding_gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        cpu_kvcache_space_gib=settings.cpu_kvcache_gib,
        cuda_visible_devices=settings.cuda_visible_devices,
        trust_request_chat_template=settings.trust_request_chat_template,
        tool_call_parser=settings.tool_call_parser,
        reasoning_parser=settings.reasoning_parser,
        lora_cpu_kernels=settings.lora_cpu_kernels,
        threads=None if settings.engine_threads == "auto" else settings.engine_threads,
        max_lora_rank=settings.max_lora_rank,
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
    )


def build_resources(settings: Settings, for_dagster: bool = False) -> dict[str, Any]:
    """The resources of this deployment, from its settings with embedded defaults.

    Defaults: bucket folder ``$VBS_HOME/bucket``, SQLite catalog ``$VBS_HOME/catalog.db``,
    in-process vLLM serving the prepared SmolLM2 as ``SmolLM2-135M-Instruct``. With
    ``for_dagster`` (the code location's ``Definitions``) secrets stay environment variables
    that Dagster resolves in the run.
    """
    catalog_url = (
        _secret(settings, "catalog_url", for_dagster)
        if settings.catalog_url is not None
        else settings.resolved_catalog_url
    )
    return {
        "webhooks": Webhooks(
            urls=settings.webhook_urls,
            secret=_secret(settings, "webhook_secret", for_dagster),
            retry_hours=settings.webhook_retry_hours,
            max_backoff_seconds=settings.webhook_max_backoff_s,
            timeout_seconds=settings.webhook_timeout_s,
        ),
        "bucket": Bucket(url=settings.resolved_bucket_url),
        "catalog": Catalog(url=catalog_url),
        "engine": build_engine(settings, for_dagster),
        "conquest_types": ConquestTypes(
            folder=str(settings.conquest_types_dir) if settings.conquest_types_dir else None
        ),
        "curation": CurationPolicy(
            gold_min_rating=settings.gold_min_rating,
            eval_fraction=settings.dataset_eval_fraction,
            min_examples=settings.dataset_min_examples,
        ),
        "trainer": Trainer(
            backend=settings.trainer_backend,
            threads=settings.trainer_threads,
            max_lora_rank=settings.max_lora_rank,
        ),
        "label_studio": LabelStudio(
            url=settings.resolved_label_studio_url,
            token=_secret(settings, "label_studio_token", for_dagster),
            token_file=str(settings.label_studio_home / "token"),
        ),
    }
