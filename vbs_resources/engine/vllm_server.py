"""``VLLMServerEngine``: the same interface over a long-lived OpenAI-compatible vLLM server
(mode ``server``).

A run no longer starts an engine: it sends its chunk's request bodies to the server, at most
``concurrency`` at once, and the server's own serving layer answers them (tool calls, reasoning
parsers and everything else the server was started with). What stays with vbs: which models a
batch may name (the registry), the chunks and their checkpoints, exactly one output line per
request.

Failure handling, per request:

- 2xx: the server's body is the response body.
- 4xx: the request's own error line, with the server's message and ``param``.
- A connection error, 5xx or 429 (the server is down, restarting or overloaded): retried with
  exponential backoff for up to ``retry_s``; after that the whole chunk is abandoned with
  ``EngineUnavailable``, nothing of it written, and the run retries its step later.
- No answer within ``timeout_s``: retried once, then a 504 error line for that request alone (a
  chunk in which every request timed out is the server failing: ``EngineUnavailable``).

Adapters are loaded on demand through vLLM's ``/v1/load_lora_adapter`` (the server runs with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; ``vbs engine serve`` starts it so). A server that restarts
forgets them: its 404 for an adapter makes the engine load it again and resend the request.

Embeddings run in this process on ``local``'s embedding model: one vLLM server serves one model.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import httpx
from pydantic import Field, PrivateAttr

from vbs_resources.bucket import local_folder
from vbs_resources.engine import (
    POOLING_ENDPOINTS,
    EngineFailure,
    EngineRequest,
    EngineResult,
    EngineUnavailable,
    InferenceEngine,
    RequestError,
    error_result,
    route,
)
from vbs_resources.engine.vllm_local import VLLMEngine
from vbs_resources.engine.vllm_serving import cut, error_line
from vbs_resources.registry import ServedModel, ServedModels
from vbs_resources.settings import redact_url

log = logging.getLogger(__name__)

# Status codes that mean "the server, not the request": retried.
TRANSIENT_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF_S = 8.0


class _Transient(Exception):
    """A failure worth retrying (connection, 5xx, 429); ``what`` says which, for the log, and
    ``connection`` whether the server could not be reached at all (it may have restarted)."""

    def __init__(self, what: str, connection: bool = False) -> None:
        super().__init__(what)
        self.what, self.connection = what, connection


class VLLMServerEngine(InferenceEngine):
    """An OpenAI-compatible vLLM server at ``url`` (mode ``server``)."""

    url: str = Field(description="The server's root URL (requests go to <url>/v1/...).")
    api_key: str | None = Field(default=None, description="The server's --api-key, if any.")
    local: VLLMEngine = Field(
        description="The models this deployment serves (the server's base model and the "
        "in-process embedding model), as the in-process engine describes them."
    )
    concurrency: int = Field(default=256, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(default=600, gt=0, description="Longest wait for one response.")
    retry_s: float = Field(
        default=120, ge=0, description="How long an unreachable server is retried per request."
    )
    step_retries: int = Field(default=10, ge=0, description="Step retries of a run after that.")
    step_retry_wait_s: float = Field(default=30, ge=0)

    # Adapters the server has loaded (name -> path), as far as this engine knows.
    _loaded: dict[str, str] = PrivateAttr(default_factory=dict)
    _lock: asyncio.Lock | None = PrivateAttr(default=None)
    # Adapters the server refused in this chunk, with why: asked once per chunk, not per request.
    _refused: dict[str, str] = PrivateAttr(default_factory=dict)

    # ---- interface -------------------------------------------------------------------------

    def configured_models(self) -> list[ServedModel]:
        return self.local.configured_models()

    def describe(self) -> dict[str, str]:
        return {
            "engine": "vllm/server",
            "engine_url": redact_url(self.url),
            "model": self.local.served_model_name,
            "adapters": str(len(self.local.served().adapters_of(self.local.served_model_name))),
        }

    def start(self, endpoint: str, served: ServedModels | None = None) -> None:
        if endpoint in POOLING_ENDPOINTS:
            self.local.start(endpoint, served)
            return
        self.local.use(served)
        asyncio.run(self._check_server())

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        if endpoint in POOLING_ENDPOINTS:
            return self.local.run(endpoint, requests)
        results, runnable = route(endpoint, requests, self.local.servable(endpoint))
        if runnable:
            answered = asyncio.run(self._send_all(endpoint, [r for _, r in runnable]))
            for (i, _), result in zip(runnable, answered, strict=True):
                results[i] = result
            if len(answered) > 1 and all(r.status_code == 504 for r in answered):
                raise self._unavailable("every request of the chunk timed out")
        return [r for r in results if r is not None]

    # ---- HTTP ------------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=self.concurrency),
        )

    def _unavailable(self, why: str) -> EngineUnavailable:
        return EngineUnavailable(
            f"the engine server at {redact_url(self.url)} is unavailable: {why}",
            retries=self.step_retries,
            wait_s=self.step_retry_wait_s,
        )

    async def _retrying(self, attempt: Any) -> Any:
        """``await attempt()`` until it does not raise ``_Transient``, backing off, for up to
        ``retry_s`` from the first failure; then ``EngineUnavailable``."""
        first_failure: float | None = None
        delay = 0.5
        while True:
            try:
                return await attempt()
            except _Transient as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.retry_s:
                    raise self._unavailable(f"{exc.what} for {now - first_failure:.0f}s") from None
                if exc.connection:
                    # A server that comes back has forgotten the adapters loaded at run time
                    # (one that answers 503 is still the same process and keeps them).
                    self._loaded.clear()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def _call(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        retry_status: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """One HTTP call; a connection error (and with ``retry_status`` a 5xx or 429) raises
        ``_Transient``."""
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise _Transient("no connection", connection=True) from None
            raise
        except httpx.TransportError as exc:
            raise _Transient(type(exc).__name__, connection=True) from None
        if retry_status and response.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {response.status_code}")
        if response.status_code == 401:
            raise EngineFailure(
                f"the engine server at {redact_url(self.url)} refused vbs's key "
                "(VBS_ENGINE_API_KEY)"
            )
        return response

    async def _check_server(self) -> None:
        """Wait (within ``retry_s``) for the server, and check that it serves the base model."""
        async with self._client() as client:
            response = await self._retrying(lambda: self._call(client, "GET", "/v1/models"))
        try:
            listed = response.json()["data"]
            ids = {m["id"]: m for m in listed}
        except Exception:  # noqa: BLE001 - anything unexpected: not a vLLM server
            raise EngineFailure(
                f"{redact_url(self.url)} answered /v1/models with something other than a model "
                "list: is it a vLLM server?"
            ) from None
        base = self.local.served_model_name
        if base not in ids:
            raise EngineFailure(
                f"the engine server at {redact_url(self.url)} serves {sorted(ids)[:10]}, not "
                f"{base!r} (VBS_SERVED_MODEL_NAME)"
            )
        self._loaded = {m["id"]: m.get("root") for m in listed if m.get("parent") == base}

    async def _send_all(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        self._lock = asyncio.Lock()
        self._refused = {}
        gate = asyncio.Semaphore(self.concurrency)
        async with self._client() as client:
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [
                        group.create_task(self._send(client, gate, endpoint, r)) for r in requests
                    ]
            except* EngineUnavailable as failed:
                raise failed.exceptions[0] from None
            except* EngineFailure as failed:
                raise failed.exceptions[0] from None
        return [task.result() for task in tasks]

    async def _send(
        self,
        client: httpx.AsyncClient,
        gate: asyncio.Semaphore,
        endpoint: str,
        request: EngineRequest,
    ) -> EngineResult:
        body = request.body
        if body.get("stream"):
            return RequestError("Streaming is not available in a batch.", param="stream").result(
                request.custom_id
            )
        entry = self.local.served().get(body["model"])
        adapter = entry if entry is not None and entry.kind == "adapter" else None
        timeouts = 0
        reloads = 0
        async with gate:
            while True:

                async def attempt() -> httpx.Response | EngineResult:
                    if adapter is not None:
                        refused = await self._ensure_adapter(client, adapter, request.custom_id)
                        if refused is not None:
                            return refused
                    return await self._call(client, "POST", endpoint, json=body)

                try:
                    answer = await self._retrying(attempt)
                except httpx.TimeoutException:
                    timeouts += 1
                    if timeouts < 2:
                        continue
                    return error_result(
                        request.custom_id,
                        504,
                        "engine_timeout",
                        f"The engine did not answer within {self.timeout_s:.0f}s.",
                    )
                if isinstance(answer, EngineResult):
                    return answer
                if answer.status_code == 404 and adapter is not None and reloads < 2:
                    # The server restarted and forgot the adapter: load it again.
                    self._loaded.pop(adapter.name, None)
                    reloads += 1
                    continue
                return self._result(request.custom_id, answer, endpoint == "/v1/chat/completions")

    async def _ensure_adapter(
        self, client: httpx.AsyncClient, adapter: ServedModel, custom_id: str
    ) -> EngineResult | None:
        """Load ``adapter`` on the server unless it has it; an error line if the server
        refuses it (``_Transient`` propagates to the caller's retries)."""
        assert self._lock is not None
        async with self._lock:
            if self._loaded.get(adapter.name) == adapter.path:
                return None
            if adapter.name in self._refused:
                return error_result(
                    custom_id, 503, "model_unavailable", self._refused[adapter.name], "model"
                )
            if adapter.name in self._loaded:
                # Registered again under the same name with other weights: replace them.
                await self._call(
                    client,
                    "POST",
                    "/v1/unload_lora_adapter",
                    retry_status=False,
                    json={"lora_name": adapter.name},
                )
            # A refusal, 5xx included, is final: vLLM answers 500 for an adapter it cannot
            # load (LoRA off, a rank above its limit), which no retry changes.
            response = await self._call(
                client,
                "POST",
                "/v1/load_lora_adapter",
                retry_status=False,
                # An adapter kept in an object store: a local copy, under $VBS_HOME, which
                # a server beside the platform (or sharing its volume) reads.
                json={"lora_name": adapter.name, "lora_path": local_folder(adapter.path)},
            )
            message, _ = _error_parts(response)
            if response.is_success or "already been loaded" in message:
                self._loaded[adapter.name] = adapter.path
                log.info("adapter %s loaded on the engine server", adapter.name)
                return None
        hint = (
            " (the server was started without LoRA: restart `vbs engine serve` now that "
            "adapters are registered, or set VBS_ENGINE_LORA=on; a server of your own needs "
            "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
            if response.status_code in (404, 405, 500) and "No adapter found" not in message
            else ""
        )
        why = (
            f"The engine server could not load adapter {adapter.name!r}: {cut(message, 300)}{hint}"
        )
        self._refused[adapter.name] = why
        return error_result(custom_id, 503, "model_unavailable", why, "model")

    @staticmethod
    def _result(custom_id: str, response: httpx.Response, chat: bool) -> EngineResult:
        if response.is_success:
            try:
                body = response.json()
                usage = body.get("usage") or {}
                return EngineResult(
                    custom_id,
                    response.status_code,
                    body,
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
            except Exception:  # noqa: BLE001 - a body that is not a JSON object
                return error_result(
                    custom_id, 502, "engine_bad_response", "The engine answered with no JSON body."
                )
        message, param = _error_parts(response)
        return error_line(custom_id, response.status_code, message, param, chat)


def _error_parts(response: httpx.Response) -> tuple[str, str | None]:
    """The message and ``param`` of a server's error answer (its text when not OpenAI's shape)."""
    try:
        error = response.json()["error"]
        param = error.get("param")
        return str(error.get("message") or error), param if isinstance(param, str) else None
    except Exception:  # noqa: BLE001 - not OpenAI's error shape
        return response.text[:500], None
