"""``VLLMEngine``: vLLM's offline ``LLM`` in the run's own process (mode ``in_process``).

All requests of a chunk go to the engine at once, which is the fastest way through a large
batch. vLLM is imported lazily, so loading the code location stays light.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import Field, PrivateAttr

from vbs_resources.bucket import local_folder
from vbs_resources.engine import (
    POOLING_ENDPOINTS,
    EngineFailure,
    EngineRequest,
    EngineResult,
    InferenceEngine,
    route,
)
from vbs_resources.engine.cpu_share import follow_load
from vbs_resources.engine.hardware import configure_vllm_env, detect_device, resolve_dtype
from vbs_resources.engine.lora_cpu import install as install_lora_kernels
from vbs_resources.engine.vllm_serving import Parsers, PoolingLayer, ServingLayer
from vbs_resources.registry import ServedModel, ServedModels, lora_rank_limit

log = logging.getLogger(__name__)

# vLLM engines live as long as the process: Dagster builds a resource per run, but a test
# session (or a long-lived executor) must not load the same weights twice.
_LOADED: dict[tuple[Any, ...], Any] = {}
# vLLM's serving layer over each loaded engine, by runner ("generate", "pooling").
_LAYERS: dict[str, ServingLayer | PoolingLayer] = {}


class VLLMEngine(InferenceEngine):
    """vLLM's offline ``LLM`` in this process (mode ``in_process``), imported lazily."""

    model: str = Field(description="Local model folder (or hub id where a hub is reachable).")
    served_model_name: str = "SmolLM2-135M-Instruct"
    embedding_model: str | None = Field(
        default=None, description="Model folder for /v1/embeddings; None serves no embeddings."
    )
    embedding_served_name: str = "all-MiniLM-L6-v2"
    dtype: str = "auto"
    max_model_len: int | None = 2048
    gpu_memory_utilization: float = Field(
        default=0.9, description="The chat engine's share of the GPU (vLLM's own setting)."
    )
    embedding_gpu_memory_utilization: float = Field(
        default=0.05, description="The embedding engine's share of the same GPU."
    )
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = Field(
        default=None,
        description="None: eager on CPU (compiling costs ~80 s there for no speed), CUDA graphs on GPU.",
    )
    cpu_kvcache_space_gib: int = Field(
        default=4, description="KV-cache GiB on CPU builds (VLLM_CPU_KVCACHE_SPACE)."
    )
    cuda_visible_devices: str | None = Field(
        default=None, description="CUDA_VISIBLE_DEVICES as set for vbs; '' hides every GPU."
    )
    trust_request_chat_template: bool = False
    tool_call_parser: str | None = Field(
        default=None, description="vLLM's tool-call parser for the base model."
    )
    reasoning_parser: str | None = Field(
        default=None, description="vLLM's reasoning parser for the base model."
    )
    max_lora_rank: int = Field(default=64, description="The highest adapter rank allowed.")
    max_loras: int = Field(default=4, description="Adapters in one engine step at once.")
    max_cpu_loras: int | None = Field(
        default=None, description="Adapters kept in memory; every adapter of the run if None."
    )
    lora_cpu_kernels: bool = Field(
        default=True, description="vbs's fused LoRA ops on vLLM's CPU build."
    )
    threads: int | None = Field(
        default=None,
        description="The CPU engine's threads, fixed; None: every core, less those other work "
        "keeps busy.",
    )
    seed: int = 0

    _served: ServedModels | None = PrivateAttr(default=None)

    # ---- interface -------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return detect_device(self.cuda_visible_devices)

    def configured_models(self) -> list[ServedModel]:
        models = [
            ServedModel(
                self.served_model_name,
                "base",
                self.model,
                tool_call_parser=self.tool_call_parser,
                reasoning_parser=self.reasoning_parser,
            )
        ]
        if self.embedding_model:
            models.append(
                ServedModel(self.embedding_served_name, "embedding", self.embedding_model)
            )
        return models

    def served(self) -> ServedModels:
        if self._served is None:
            self._served = ServedModels({m.name: m for m in self.configured_models()})
        return self._served

    def servable(self, endpoint: str) -> dict[str, ServedModel]:
        """The models a request to ``endpoint`` may name: this engine's base model and its
        adapters, or its embedding model, as far as the registry has them available."""
        served = self.served()
        if endpoint in POOLING_ENDPOINTS:
            names = [self.embedding_served_name] if self.embedding_model else []
            return {n: served.models[n] for n in names if n in served.models}
        found = {}
        base = served.get(self.served_model_name)
        if base is not None and base.kind == "base":
            found[base.name] = base
            found.update({a.name: a for a in served.adapters_of(base.name)})
        return found

    def describe(self) -> dict[str, str]:
        return {
            "engine": "vllm/in_process",
            "model": self.served_model_name,
            "model_path": self.model,
            "adapters": str(len(self.served().adapters_of(self.served_model_name))),
            "device": self.device,
            "dtype": resolve_dtype(self.dtype, self.device),
        }

    def use(self, served: ServedModels | None) -> None:
        """Serve from ``served`` (the configured models when None) without loading anything."""
        self._served = served

    def start(self, endpoint: str, served: ServedModels | None = None) -> None:
        self.use(served)
        if endpoint in POOLING_ENDPOINTS:
            if self.embedding_model:
                self._llm(self.embedding_model, "pooling")
        else:
            self._llm(self.model, "generate")

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        results, runnable = route(endpoint, requests, self.servable(endpoint))
        if runnable:
            run = self._run_pooling if endpoint in POOLING_ENDPOINTS else self._run_generation
            for (i, _), result in zip(
                runnable, run(endpoint, [r for _, r in runnable]), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    # ---- engines ---------------------------------------------------------------------------

    def _engine_options(self, runner: str) -> dict[str, Any]:
        """vLLM's LoRA settings for the adapters registered on this engine's base (none: off),
        and its reasoning parser."""
        if runner != "generate":
            return {}
        served = self.served()
        base = served.get(self.served_model_name)
        # The engine's own reasoning parser holds structured output back until the thinking
        # ends; it is the base model's (an adapter with another one parses its own output).
        reasoning = (
            {"reasoning_parser": base.reasoning_parser} if base and base.reasoning_parser else {}
        )
        adapters = served.adapters_of(self.served_model_name)
        if not adapters:
            return reasoning
        return dict(
            **reasoning,
            enable_lora=True,
            max_lora_rank=lora_rank_limit([a.rank or 1 for a in adapters]),
            max_loras=self.max_loras,
            max_cpu_loras=max(self.max_cpu_loras or len(adapters), self.max_loras),
        )

    def _llm(self, path: str, runner: str) -> Any:
        device = self.device
        lora = self._engine_options(runner)
        key = (path, runner, self.dtype, self.max_model_len, self.tensor_parallel_size, self.seed)
        key += tuple(sorted(lora.items()))
        if key not in _LOADED:
            # One engine per model in memory: another configuration of the same model (the
            # adapters changed) replaces it.
            self._forget(runner, path)
            configure_vllm_env(device, self.cpu_kvcache_space_gib, self.threads)
            from vllm import LLM

            if lora.get("enable_lora"):
                install_lora_kernels(self.lora_cpu_kernels)

            started = time.perf_counter()
            _LOADED[key] = LLM(**self.llm_options(path, runner, device))
            log.info("vLLM engine for %s ready in %.1fs", path, time.perf_counter() - started)
        return _LOADED[key]

    def llm_options(self, path: str, runner: str, device: str) -> dict[str, Any]:
        """The arguments of vLLM's ``LLM`` for ``path`` as ``runner`` on ``device``."""
        options: dict[str, Any] = dict(
            model=path,
            dtype=resolve_dtype(self.dtype, device),
            max_model_len=self.max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=device == "cpu" if self.enforce_eager is None else self.enforce_eager,
            seed=self.seed,
        )
        if device == "cuda":
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        if runner == "pooling":
            # Embedding models keep their own (short) context length, and their own share.
            options.update(runner="pooling", max_model_len=None)
            if device == "cuda":
                options["gpu_memory_utilization"] = self.embedding_gpu_memory_utilization
        options.update(self._engine_options(runner))
        return options

    def _run_generation(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        """Chat and completion requests, through vLLM's own serving layer over this engine."""
        layer = self._layer(
            "generate",
            self.model,
            lambda llm: ServingLayer(
                llm,
                self.served_model_name,
                self.model,
                trust_request_chat_template=self.trust_request_chat_template,
            ),
        )
        served = self.served()
        models = self.servable(endpoint)
        # An adapter kept in an object store is loaded from a local copy (vLLM reads folders).
        layer.use_adapters(
            {m.name: local_folder(m.path) for m in models.values() if m.kind == "adapter"}
        )
        parsers = {name: Parsers(*served.parsers_of(m)) for name, m in models.items()}
        try:
            return layer.run(endpoint, requests, parsers)
        except EngineFailure:
            self._forget("generate", self.model)
            raise

    @staticmethod
    def _forget(runner: str, path: str) -> None:
        """Drop the loaded engine of ``path`` (broken, or replaced by another configuration):
        the next use loads it again. Its shutdown happens now, not when the garbage collector
        gets to it (an exception's traceback may hold it for long): that shutdown tears down
        process-wide state (vLLM's parallel groups) that a new engine would be using by then."""
        _LAYERS.pop(runner, None)
        stale = [k for k in _LOADED if k[:2] == (path, runner)]
        for key in stale:
            old = _LOADED.pop(key)
            try:
                old.llm_engine.engine_core.shutdown()
            except Exception as exc:  # noqa: BLE001 - a broken engine may fail to shut down
                log.warning("the replaced engine for %s did not shut down cleanly: %r", path, exc)
        if stale:
            _release_memory()

    def _layer(self, runner: str, path: str, build: Callable[[Any], Any]) -> Any:
        """vLLM's serving layer over the loaded engine of ``path``, built once per engine. An
        engine a chunk left mid-step (an interrupt) is loaded again first."""
        layer = _LAYERS.get(runner)
        if layer is not None and layer.client.errored:
            layer = None
            self._forget(runner, path)
        llm = self._llm(path, runner)
        if layer is None or layer.llm is not llm:
            layer = _LAYERS[runner] = build(llm)
            if self.device == "cpu" and self.threads is None:
                layer.client.after_step = follow_load()
        return layer

    def _run_pooling(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        """Embedding, score and rerank requests, through vLLM's own pooling handlers."""
        path = self.embedding_model
        assert path is not None
        layer = self._layer(
            "pooling", path, lambda llm: PoolingLayer(llm, self.embedding_served_name, path)
        )
        try:
            return layer.run(endpoint, requests)
        except EngineFailure:
            self._forget("pooling", path)
            raise


def release_engines() -> None:
    """Shut down every engine this process loaded and give their memory back (a test session
    between GPU-heavy files, a process that trains next)."""
    for path, runner in {k[:2] for k in _LOADED}:
        VLLMEngine._forget(runner, path)


def _release_memory() -> None:
    """Memory of engines shut down: with the engine core in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) deleting an engine frees no GPU memory (vLLM issue
    21073). With no engine left, vLLM's own cleanup (parallel groups, the distributed
    environment, the allocator's cache); with another still loaded (the embedding engine
    beside the chat one) that would pull its groups away, so the allocator's cache alone."""
    gc.collect()
    if not _LOADED:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
