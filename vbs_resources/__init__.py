"""Dagster resources and the plain code under them. ``build_resources`` is the only code that
knows about environments; everything else receives resources."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dagster as dg

from vbs_resources.bucket import Bucket, batch_file
from vbs_resources.catalog import Catalog
from vbs_resources.engine import EngineRequest, EngineResult, InferenceEngine, VLLMEngine
from vbs_resources.model_store import (
    DEFAULT_MODEL_NAME,
    default_embedding_model_dir,
    default_model_dir,
)
from vbs_resources.webhooks import Webhooks

__all__ = [
    "Bucket",
    "Catalog",
    "EngineRequest",
    "EngineResult",
    "InferenceEngine",
    "VLLMEngine",
    "Webhooks",
    "batch_file",
    "build_resources",
    "vbs_home",
]


def vbs_home(environ: dict[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return Path(env.get("VBS_HOME") or ".vbs").absolute()


def build_resources(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The resources of this deployment, from ``VBS_*`` settings with embedded defaults.

    Defaults: bucket folder ``$VBS_HOME/bucket``, SQLite catalog ``$VBS_HOME/catalog.db``,
    in-process vLLM serving the prepared SmolLM2 as ``SmolLM2-135M-Instruct``.
    """
    env = os.environ if environ is None else environ
    home = vbs_home(env)
    embedding = env.get("VBS_EMBEDDING_MODEL")
    if embedding is None:
        found = default_embedding_model_dir()
        embedding = str(found) if found else None
    engine = VLLMEngine(
        model=env.get("VBS_MODEL") or str(default_model_dir(home)),
        served_model_name=env.get("VBS_SERVED_MODEL_NAME") or DEFAULT_MODEL_NAME,
        embedding_model=embedding or None,
        dtype=env.get("VBS_DTYPE", "auto"),
        max_model_len=int(env.get("VBS_MAX_MODEL_LEN", "2048")),
        gpu_memory_utilization=float(env.get("VBS_GPU_MEMORY_UTILIZATION", "0.9")),
        tensor_parallel_size=int(env.get("VBS_TENSOR_PARALLEL_SIZE", "1")),
        cpu_kvcache_space_gib=int(env.get("VBS_CPU_KVCACHE_GIB", "4")),
    )
    urls = [u.strip() for u in env.get("VBS_WEBHOOK_URLS", "").split(",") if u.strip()]
    # The secret is resolved from the environment at run time, never stored in run config.
    secret = dg.EnvVar("VBS_WEBHOOK_SECRET") if env.get("VBS_WEBHOOK_SECRET") else None
    return {
        "webhooks": Webhooks(urls=urls, secret=secret),
        "bucket": Bucket(url=env.get("VBS_BUCKET_URL") or str(home / "bucket")),
        "catalog": Catalog(url=env.get("VBS_CATALOG_URL") or f"sqlite:///{home / 'catalog.db'}"),
        "engine": engine,
    }
