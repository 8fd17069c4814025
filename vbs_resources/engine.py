"""The inference engine: one interface, one mode per deployment shape.

``VLLMEngine`` (mode ``in_process``) runs vLLM's offline ``LLM`` inside the Dagster step and
hands every request of a chunk to it at once, which is the fastest way through a large batch.
A ``server`` mode (an OpenAI-compatible vLLM deployment shared by many runs) implements the same
``InferenceEngine`` interface later.

Request bodies are parsed with vLLM's own OpenAI protocol models, so per-request parameters
(temperature, top_p, max_tokens / max_completion_tokens, stop, seed, n, penalties, logprobs /
top_logprobs, response_format through structured outputs, ...) mean exactly what they mean to a
vLLM server. A request that cannot run becomes an error result; the rest of the chunk goes on.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

log = logging.getLogger(__name__)

# vLLM engines live as long as the process: Dagster builds a resource per run, but a test
# session (or a long-lived executor) must not load the same weights twice.
_LOADED: dict[tuple[Any, ...], Any] = {}


@dataclass
class EngineRequest:
    custom_id: str
    body: dict[str, Any]


@dataclass
class EngineResult:
    """The outcome of one request: a response body (2xx) or an OpenAI error body."""

    custom_id: str
    status_code: int
    body: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


@dataclass
class _Prepared:
    index: int
    request: EngineRequest
    prompts: list[list[int]]
    params: Any
    extra: dict[str, Any] = field(default_factory=dict)


def error_result(
    custom_id: str, status_code: int, code: str, message: str, param: str | None = None
) -> EngineResult:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    return EngineResult(
        custom_id,
        status_code,
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
    )


class InferenceEngine(dg.ConfigurableResource):
    """Runs OpenAI request bodies for one endpoint and returns one result per request."""

    def served_models(self, endpoint: str) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """Engine facts for Dagster metadata (mode, models, device)."""
        raise NotImplementedError

    def start(self, endpoint: str) -> None:
        """Load what ``endpoint`` needs, so that start-up is not counted as generation time."""

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        raise NotImplementedError


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
    seed: int = 0

    _tokenizer: Any = PrivateAttr(default=None)

    # ---- interface -------------------------------------------------------------------------

    def served_models(self, endpoint: str) -> list[str]:
        if endpoint == "/v1/embeddings":
            return [self.embedding_served_name] if self.embedding_model else []
        return [self.served_model_name]

    def describe(self) -> dict[str, str]:
        return {
            "engine": "vllm/in_process",
            "model": self.served_model_name,
            "model_path": self.model,
            "device": _device(),
            "dtype": resolve_dtype(self.dtype),
        }

    def start(self, endpoint: str) -> None:
        if endpoint == "/v1/embeddings":
            if self.embedding_model:
                self._llm(self.embedding_model, "pooling")
        else:
            self._llm(self.model, "generate")

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        served = set(self.served_models(endpoint))
        results: list[EngineResult | None] = [None] * len(requests)
        runnable: list[tuple[int, EngineRequest]] = []
        for i, request in enumerate(requests):
            model = request.body.get("model")
            if model not in served:
                results[i] = error_result(
                    request.custom_id,
                    404,
                    "model_not_found",
                    f"The model '{model}' does not exist or is not served for {endpoint}; "
                    f"served: {sorted(served)}.",
                    "model",
                )
            else:
                runnable.append((i, request))
        if runnable:
            run = self._run_embeddings if endpoint == "/v1/embeddings" else self._run_generation
            for (i, _), result in zip(
                runnable, run(endpoint, [r for _, r in runnable]), strict=True
            ):
                results[i] = result
        return [r for r in results if r is not None]

    # ---- engines ---------------------------------------------------------------------------

    def _llm(self, path: str, runner: str) -> Any:
        key = (path, runner, self.dtype, self.max_model_len, self.tensor_parallel_size, self.seed)
        if key not in _LOADED:
            _configure_vllm_env(self.cpu_kvcache_space_gib)
            from vllm import LLM

            started = time.perf_counter()
            kwargs: dict[str, Any] = dict(
                model=path,
                dtype=resolve_dtype(self.dtype),
                max_model_len=self.max_model_len,
                tensor_parallel_size=self.tensor_parallel_size,
                enforce_eager=(
                    _device() == "cpu" if self.enforce_eager is None else self.enforce_eager
                ),
                seed=self.seed,
            )
            if _device() == "cuda":
                kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if runner == "pooling":
                # Embedding models keep their own (short) context length.
                kwargs.update(runner="pooling", max_model_len=None)
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

        results: list[EngineResult | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        for i, request in enumerate(requests):
            try:
                prepared.append(_prepare_generation(i, request, chat, tokenizer, max_len, defaults))
            except _RequestError as exc:
                results[i] = error_result(
                    request.custom_id, exc.status_code, exc.code, str(exc), exc.param
                )

        flat_prompts = [{"prompt_token_ids": p} for item in prepared for p in item.prompts]
        flat_params = [item.params for item in prepared for _ in item.prompts]
        outputs = self._generate_isolated(llm, flat_prompts, flat_params)
        cursor = 0
        for item in prepared:
            item_outputs = outputs[cursor : cursor + len(item.prompts)]
            cursor += len(item.prompts)
            failed = next((o for o in item_outputs if isinstance(o, Exception)), None)
            if failed is not None:
                results[item.index] = error_result(
                    item.request.custom_id, 400, "invalid_request", str(failed)
                )
                continue
            build = _chat_response if chat else _completion_response
            results[item.index] = build(item, item_outputs, self.served_model_name, tokenizer)
        return [r for r in results if r is not None]

    @staticmethod
    def _generate_isolated(llm: Any, prompts: list[Any], params: list[Any]) -> list[Any]:
        """Generate all at once; if vLLM refuses the set, find the refused ones one by one."""
        if not prompts:
            return []
        try:
            return llm.generate(prompts, params, use_tqdm=False)
        except Exception as exc:  # noqa: BLE001 - isolated below, one request at a time
            log.warning("chunk refused (%s); retrying its requests one by one", exc)
        outputs: list[Any] = []
        for prompt, param in zip(prompts, params, strict=True):
            try:
                outputs.append(llm.generate([prompt], [param], use_tqdm=False)[0])
            except Exception as exc:  # noqa: BLE001 - becomes this request's error line
                outputs.append(exc)
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
                token_lists = _embedding_inputs(request.body.get("input"), tokenizer, max_len)
                encoding = request.body.get("encoding_format") or "float"
                if encoding not in ("float", "base64"):
                    raise _RequestError(
                        f"Invalid encoding_format {encoding!r}: use 'float' or 'base64'.",
                        param="encoding_format",
                    )
                if request.body.get("dimensions") is not None:
                    raise _RequestError(
                        "This model does not support 'dimensions'.", param="dimensions"
                    )
                inputs.append((i, token_lists, encoding))
            except _RequestError as exc:
                results[i] = error_result(
                    request.custom_id, exc.status_code, exc.code, str(exc), exc.param
                )
        flat = [{"prompt_token_ids": t} for _, lists, _ in inputs for t in lists]
        outputs = llm.embed(flat, use_tqdm=False) if flat else []
        cursor = 0
        for i, lists, encoding in inputs:
            chunk = outputs[cursor : cursor + len(lists)]
            cursor += len(lists)
            data = []
            for index, out in enumerate(chunk):
                vector = list(out.outputs.embedding)
                data.append(
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": _encode_embedding(vector, encoding),
                    }
                )
            tokens = sum(len(t) for t in lists)
            results[i] = EngineResult(
                requests[i].custom_id,
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": self.embedding_served_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
                prompt_tokens=tokens,
            )
        return [r for r in results if r is not None]


# ---- request preparation -------------------------------------------------------------------


class _RequestError(ValueError):
    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        code: str = "invalid_request",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code, self.code, self.param = status_code, code, param


def _prepare_generation(
    index: int,
    request: EngineRequest,
    chat: bool,
    tokenizer: Any,
    max_len: int,
    defaults: dict[str, Any],
) -> _Prepared:
    from pydantic import ValidationError

    if chat:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as Protocol,
        )
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Protocol

    body = dict(request.body)
    if body.get("stream"):
        raise _RequestError("Streaming is not available in a batch.", param="stream")
    try:
        parsed = Protocol.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise _RequestError(f"Invalid request: {first['msg']}", param=param) from exc
    except Exception as exc:  # model validators raise vLLM's own error types too
        raise _RequestError(
            f"Invalid request: {exc}", param=getattr(exc, "parameter", None)
        ) from exc

    if chat:
        prompts = [_render_chat(body, tokenizer)]
    else:
        prompts = _token_lists(
            body["prompt"], tokenizer, "prompt", "a string, a list of strings or token ids"
        )
    longest = max(len(p) for p in prompts)
    if longest >= max_len:
        raise _RequestError(
            f"This model's maximum context length is {max_len} tokens; the prompt has "
            f"{longest} tokens.",
            code="context_length_exceeded",
            param="messages" if chat else "prompt",
        )
    requested = body.get("max_completion_tokens") if chat else None
    if requested is None:
        requested = body.get("max_tokens")
    if requested is None:
        requested = defaults.get("max_tokens")
    max_tokens = max_len - longest if requested is None else min(requested, max_len - longest)
    try:
        params = parsed.to_sampling_params(max_tokens, defaults)
    except Exception as exc:  # vLLM's validation errors do not all derive from ValueError
        param = getattr(exc, "parameter", None)
        raise _RequestError(f"Invalid request: {exc}", param=param) from exc
    extra = {"top_logprobs": bool(getattr(parsed, "logprobs", None))} if chat else {}
    return _Prepared(index, request, prompts, params, extra)


def _render_chat(body: dict[str, Any], tokenizer: Any) -> list[int]:
    messages = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if p.get("type") == "text"]
            if len(texts) != len(content):
                raise _RequestError("This model accepts only text content parts.", param="messages")
            message = dict(message, content="".join(texts))
        messages.append(message)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=body.get("tools"),
            add_generation_prompt=True,
            tokenize=False,
            **(body.get("chat_template_kwargs") or {}),
        )
    except Exception as exc:  # jinja errors come in many types
        raise _RequestError(f"The chat template refused the messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _token_lists(value: Any, tokenizer: Any, param: str, what: str) -> list[list[int]]:
    """The OpenAI input shapes shared by ``prompt`` and ``input``: a string, a list of strings,
    a list of token ids, or a list of such lists; one token list per text."""
    if isinstance(value, str):
        return [tokenizer.encode(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [tokenizer.encode(v) for v in value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, list) for v in value):
            return [list(v) for v in value]
    raise _RequestError(f"'{param}' must be {what}.", param=param)


def _embedding_inputs(value: Any, tokenizer: Any, max_len: int) -> list[list[int]]:
    lists = _token_lists(value, tokenizer, "input", "a non-empty string or list")
    if max(len(t) for t in lists) > max_len:
        raise _RequestError(
            f"An input is longer than this model's {max_len}-token context.",
            code="context_length_exceeded",
            param="input",
        )
    return lists


# ---- response bodies -----------------------------------------------------------------------


def _decoded(tokenizer: Any, token_id: int, logprob: Any) -> str:
    """A logprob entry's token text (vLLM leaves ``decoded_token`` empty in some modes)."""
    return (logprob.decoded_token if logprob else None) or tokenizer.decode([token_id])


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode())}


def _chat_logprobs(completion: Any, tokenizer: Any, top: int) -> dict[str, Any] | None:
    if completion.logprobs is None:
        return None
    content = []
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = position.get(token_id)
        entry = _token_entry(
            _decoded(tokenizer, token_id, chosen), chosen.logprob if chosen else float("-inf")
        )
        ranked = sorted(position.items(), key=lambda kv: kv[1].rank or 0)[:top]
        entry["top_logprobs"] = [
            _token_entry(_decoded(tokenizer, tid, lp), lp.logprob) for tid, lp in ranked
        ]
        content.append(entry)
    return {"content": content, "refusal": None}


def _completion_logprobs(completion: Any, tokenizer: Any) -> dict[str, Any] | None:
    if completion.logprobs is None:
        return None
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=False):
        chosen = position.get(token_id)
        token = _decoded(tokenizer, token_id, chosen)
        tokens.append(token)
        token_logprobs.append(chosen.logprob if chosen else None)
        top_logprobs.append(
            {_decoded(tokenizer, tid, lp): lp.logprob for tid, lp in position.items()}
        )
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def _usage(outputs: list[Any]) -> tuple[int, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, completion


def _chat_response(item: _Prepared, outputs: list[Any], model: str, tokenizer: Any) -> EngineResult:
    (output,) = outputs
    top = getattr(item.params, "logprobs", None) or 0
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": _chat_logprobs(c, tokenizer, top)
            if item.extra.get("top_logprobs")
            else None,
            "finish_reason": c.finish_reason or "stop",
        }
        for c in output.outputs
    ]
    prompt_tokens, completion_tokens = _usage(outputs)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }
    return EngineResult(item.request.custom_id, 200, body, prompt_tokens, completion_tokens)


def _completion_response(
    item: _Prepared, outputs: list[Any], model: str, tokenizer: Any
) -> EngineResult:
    n = len(outputs[0].outputs) if outputs else 1
    echo = bool(item.request.body.get("echo"))
    choices = []
    for prompt_index, output in enumerate(outputs):
        for c in output.outputs:
            text = (output.prompt or "") + c.text if echo else c.text
            choices.append(
                {
                    "index": prompt_index * n + c.index,
                    "text": text,
                    "logprobs": _completion_logprobs(c, tokenizer),
                    "finish_reason": c.finish_reason or "stop",
                }
            )
    prompt_tokens, completion_tokens = _usage(outputs)
    body = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
    }
    return EngineResult(item.request.custom_id, 200, body, prompt_tokens, completion_tokens)


def _encode_embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


# ---- environment ---------------------------------------------------------------------------


def _device() -> str:
    """'cuda' where an NVIDIA GPU is visible, else 'cpu'; decided without importing torch, whose
    import reads the thread settings that ``_configure_vllm_env`` must set first."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "cpu"
    return "cuda" if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0") else "cpu"


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str) -> str:
    """``auto`` keeps the checkpoint's dtype, except on CPUs without native bf16 (no AVX512-BF16
    or AMX), where torch emulates bf16 matmuls over 100x slower than float32."""
    if dtype == "auto" and _device() == "cpu" and not _cpu_has_native_bf16():
        return "float32"
    return dtype


def _configure_vllm_env(kvcache_gib: int) -> None:
    """Settings vLLM and torch read at import or engine start; set before the first import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # One process: the engine core runs in this Dagster step (fast start, and a kill of the
    # step takes the engine with it instead of orphaning a worker).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if _device() == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gib))
        # Unset, vLLM drops torch to one thread "for serving"; a batch owns the machine.
        os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
