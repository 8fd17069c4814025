"""``VLLMEngine``: vLLM's offline ``LLM`` in the run's own process (mode ``in_process``).

All requests of a chunk go to the engine at once, which is the fastest way through a large
batch. vLLM is imported lazily, so loading the code location stays light.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pydantic import Field, PrivateAttr

from vbs_resources.engine import (
    EngineFailure,
    EngineRequest,
    EngineResult,
    InferenceEngine,
    RequestError,
    error_result,
    route,
)
from vbs_resources.engine.hardware import configure_vllm_env, detect_device, resolve_dtype
from vbs_resources.engine.requests import (
    Prepared,
    RenderPolicy,
    embedding_inputs,
    prepare_generation,
)
from vbs_resources.engine.responses import chat_response, completion_response, embedding_response
from vbs_resources.registry import ServedModel, ServedModels, lora_rank_limit

log = logging.getLogger(__name__)

# vLLM engines live as long as the process: Dagster builds a resource per run, but a test
# session (or a long-lived executor) must not load the same weights twice.
_LOADED: dict[tuple[Any, ...], Any] = {}


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
    gpu_memory_utilization: float = 0.9
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
    max_lora_rank: int = Field(default=64, description="The highest adapter rank allowed.")
    max_loras: int = Field(default=4, description="Adapters in one engine step at once.")
    max_cpu_loras: int | None = Field(
        default=None, description="Adapters kept in memory; every adapter of the run if None."
    )
    seed: int = 0

    _served: ServedModels | None = PrivateAttr(default=None)

    # ---- interface -------------------------------------------------------------------------

    @property
    def device(self) -> str:
        return detect_device(self.cuda_visible_devices)

    def configured_models(self) -> list[ServedModel]:
        models = [ServedModel(self.served_model_name, "base", self.model)]
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
        if endpoint == "/v1/embeddings":
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
        if endpoint == "/v1/embeddings":
            if self.embedding_model:
                self._llm(self.embedding_model, "pooling")
        else:
            self._llm(self.model, "generate")

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        results, runnable = route(endpoint, requests, self.servable(endpoint))
        if runnable:
            run = self._run_embeddings if endpoint == "/v1/embeddings" else self._run_generation
            for (i, _), result in zip(
                runnable, run(endpoint, [r for _, r in runnable]), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    # ---- engines ---------------------------------------------------------------------------

    def _lora_config(self, runner: str) -> dict[str, Any]:
        """vLLM's LoRA settings for the adapters registered on this engine's base (none: off)."""
        adapters = self.served().adapters_of(self.served_model_name)
        if runner != "generate" or not adapters:
            return {}
        return dict(
            enable_lora=True,
            max_lora_rank=lora_rank_limit([a.rank or 1 for a in adapters]),
            max_loras=self.max_loras,
            max_cpu_loras=max(self.max_cpu_loras or len(adapters), self.max_loras),
        )

    def _llm(self, path: str, runner: str) -> Any:
        device = self.device
        lora = self._lora_config(runner)
        key = (path, runner, self.dtype, self.max_model_len, self.tensor_parallel_size, self.seed)
        key += tuple(sorted(lora.items()))
        if key not in _LOADED:
            # One engine per model in memory: another configuration of the same model (the
            # adapters changed) replaces it.
            for stale in [k for k in _LOADED if k[:2] == (path, runner)]:
                del _LOADED[stale]
            configure_vllm_env(device, self.cpu_kvcache_space_gib)
            from vllm import LLM

            started = time.perf_counter()
            kwargs: dict[str, Any] = dict(
                model=path,
                dtype=resolve_dtype(self.dtype, device),
                max_model_len=self.max_model_len,
                tensor_parallel_size=self.tensor_parallel_size,
                enforce_eager=device == "cpu" if self.enforce_eager is None else self.enforce_eager,
                seed=self.seed,
            )
            if device == "cuda":
                kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if runner == "pooling":
                # Embedding models keep their own (short) context length.
                kwargs.update(runner="pooling", max_model_len=None)
            kwargs.update(lora)
            _LOADED[key] = LLM(**kwargs)
            log.info("vLLM engine for %s ready in %.1fs", path, time.perf_counter() - started)
        return _LOADED[key]

    def _run_generation(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        llm = self._llm(self.model, "generate")
        tokenizer = llm.get_tokenizer()
        model_config = llm.llm_engine.model_config
        max_len = model_config.max_model_len
        defaults = model_config.get_diff_sampling_param()
        chat = endpoint == "/v1/chat/completions"
        policy = RenderPolicy(trust_request_chat_template=self.trust_request_chat_template)

        results: list[EngineResult | None] = [None] * len(requests)
        prepared: list[Prepared] = []
        for i, request in enumerate(requests):
            try:
                prepared.append(
                    prepare_generation(i, request, chat, tokenizer, max_len, defaults, policy)
                )
            except RequestError as exc:
                results[i] = exc.result(request.custom_id)
            except Exception as exc:  # noqa: BLE001 - one request's problem, never the chunk's
                log.warning("request %r could not be prepared: %r", request.custom_id[:64], exc)
                results[i] = error_result(
                    request.custom_id, 400, "invalid_request", "The request could not be prepared."
                )

        loras = [self._lora_request(item.request.body["model"]) for item in prepared]
        flat_prompts = [{"prompt_token_ids": p} for item in prepared for p in item.prompts]
        flat_params = [item.params for item in prepared for _ in item.prompts]
        flat_loras = [
            lora for item, lora in zip(prepared, loras, strict=True) for _ in item.prompts
        ]
        outputs = self._generate_isolated(llm, flat_prompts, flat_params, flat_loras)
        build = chat_response if chat else completion_response
        cursor = 0
        for item in prepared:
            item_outputs = outputs[cursor : cursor + len(item.prompts)]
            cursor += len(item.prompts)
            failed = next((o for o in item_outputs if isinstance(o, Exception)), None)
            if failed is not None:
                results[item.index] = error_result(
                    item.request.custom_id, 400, "invalid_request", _engine_message(failed)
                )
                continue
            # The response names the model the request named: the base, or the adapter.
            results[item.index] = build(item, item_outputs, item.request.body["model"], tokenizer)
        return [r for r in results if r is not None]

    def _lora_request(self, model: str) -> Any:
        """vLLM's ``LoRARequest`` for a request naming an adapter; None for the base model."""
        entry = self.served().get(model)
        if entry is None or entry.kind != "adapter":
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(entry.name, entry.lora_id or 1, entry.path)

    @staticmethod
    def _generate_isolated(
        llm: Any, prompts: list[Any], params: list[Any], loras: list[Any] | None = None
    ) -> list[Any]:
        """Generate all at once; if vLLM refuses the set, find the refused ones one by one."""
        if not prompts:
            return []
        loras = loras if loras is not None and any(loras) else None
        try:
            return llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        except Exception as exc:  # noqa: BLE001 - isolated below, one request at a time
            log.warning("chunk refused (%s); retrying its requests one by one", exc)
        outputs: list[Any] = []
        for i, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
            lora = loras[i] if loras else None
            try:
                outputs.append(
                    llm.generate([prompt], [param], use_tqdm=False, lora_request=lora)[0]
                )
            except Exception as exc:  # noqa: BLE001 - becomes this request's error line
                outputs.append(exc)
        # vLLM refuses a request's own values with ValueError or TypeError; anything else, for
        # every request, is the engine failing.
        if all(isinstance(o, Exception) for o in outputs) and not any(
            isinstance(o, ValueError | TypeError) for o in outputs
        ):
            raise EngineFailure(f"every request failed: {type(outputs[0]).__name__}")
        return outputs

    def _run_embeddings(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        assert self.embedding_model is not None
        llm = self._llm(self.embedding_model, "pooling")
        tokenizer = llm.get_tokenizer()
        max_len = llm.llm_engine.model_config.max_model_len
        results: list[EngineResult | None] = [None] * len(requests)
        inputs: list[tuple[int, list[list[int]], str]] = []
        for i, request in enumerate(requests):
            try:
                token_lists = embedding_inputs(request.body.get("input"), tokenizer, max_len)
                encoding = request.body.get("encoding_format") or "float"
                if encoding not in ("float", "base64"):
                    raise RequestError(
                        f"Invalid encoding_format {_name(encoding)}: use 'float' or 'base64'.",
                        param="encoding_format",
                    )
                if request.body.get("dimensions") is not None:
                    raise RequestError(
                        "This model does not support 'dimensions'.", param="dimensions"
                    )
                inputs.append((i, token_lists, encoding))
            except RequestError as exc:
                results[i] = exc.result(request.custom_id)
        flat = [{"prompt_token_ids": t} for _, lists, _ in inputs for t in lists]
        outputs = llm.embed(flat, use_tqdm=False) if flat else []
        cursor = 0
        for i, lists, encoding in inputs:
            chunk = outputs[cursor : cursor + len(lists)]
            cursor += len(lists)
            tokens = sum(len(t) for t in lists)
            results[i] = embedding_response(
                requests[i].custom_id, chunk, encoding, self.embedding_served_name, tokens
            )
        return [r for r in results if r is not None]


def _name(value: Any) -> str:
    from vbs_resources.strict_json import quote

    return quote(value, 80)


def _engine_message(exc: Exception) -> str:
    from vbs_resources.strict_json import quote

    return f"The engine refused the request: {quote(str(exc), 300)}"
