"""vLLM's own OpenAI serving layer over the engine in this process.

Chat and completion requests go through the handlers vLLM's server and its ``run_batch`` use
(``OpenAIServingChat``, ``OpenAIServingCompletion``, their renderer, tool-call and reasoning
parsers), so a request means exactly what it means to a vLLM server: the same validation, chat
rendering, sampling defaults, ``tool_calls`` and ``message.reasoning``.

Those handlers talk to an ``EngineClient``. vLLM's own (``AsyncLLM``) runs the engine core in a
second process, which on a small CPU box costs 10-13% of throughput (the two processes compete
for the cores) and outlives a killed run. ``InProcessClient`` instead steps the offline engine
the run already holds (``LLM.llm_engine``) on the caller's event loop: one process, the engine
dies with the run, and rendering (in vLLM's renderer thread) overlaps generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from vbs_resources.engine import EngineFailure, EngineRequest, EngineResult, error_result
from vbs_resources.strict_json import quote
from vbs_resources.wire import field_path

log = logging.getLogger(__name__)

# Below this vLLM samples greedily, and refuses ``n > 1``.
_GREEDY_TEMPERATURE = 1e-5


def _engine_client_base() -> type:
    from vllm.engine.protocol import EngineClient

    return EngineClient


class _ClientMethods:
    """What ``InProcessClient`` does; mixed into vLLM's ``EngineClient`` at first use so that
    importing vbs does not import vLLM."""

    def __init__(self, llm_engine: Any) -> None:
        self.engine = llm_engine
        self.vllm_config = llm_engine.vllm_config
        self.model_config = llm_engine.model_config
        self.renderer = llm_engine.renderer
        self.input_processor = llm_engine.input_processor
        self._tasks = tuple(llm_engine.get_supported_tasks())
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake: asyncio.Event | None = None
        self._dead: BaseException | None = None
        # Called after every step (the CPU engine's thread count follows the machine's load).
        self.after_step: Callable[[], object] | None = None

    # ---- state ------------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._dead is None

    @property
    def is_stopped(self) -> bool:
        return self._dead is not None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> BaseException:
        from vllm.v1.engine.exceptions import EngineDeadError

        return self._dead or EngineDeadError()

    # ---- requests ---------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
        session_id: str | None = None,
        kv_hints: Any = None,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[Any, None]:
        async for output in self._submit(
            request_id,
            prompt,
            sampling_params,
            lora_request=lora_request,
            tokenization_kwargs=tokenization_kwargs,
            priority=priority,
            reasoning_ended=reasoning_ended,
            reasoning_parser_kwargs=reasoning_parser_kwargs,
        ):
            yield output

    async def encode(
        self,
        prompt: Any,
        pooling_params: Any,
        request_id: str,
        lora_request: Any = None,
        trace_headers: Any = None,
        priority: int = 0,
        tokenization_kwargs: dict[str, Any] | None = None,
        reasoning_ended: bool | None = None,
    ) -> AsyncGenerator[Any, None]:
        async for output in self._submit(
            request_id,
            prompt,
            pooling_params,
            lora_request=lora_request,
            tokenization_kwargs=tokenization_kwargs,
            priority=priority,
        ):
            yield output

    async def _submit(
        self,
        request_id: str,
        prompt: Any,
        params: Any,
        *,
        lora_request: Any,
        tokenization_kwargs: dict[str, Any] | None,
        priority: int,
        reasoning_ended: bool | None = None,
        reasoning_parser_kwargs: dict[str, Any] | None = None,
    ) -> AsyncGenerator[Any, None]:
        from vllm.renderers.inputs.preprocess import extract_prompt_components

        if self._dead is not None:
            raise self.dead_error
        if request_id in self._queues:
            # Outputs are matched to waiters by this id: a second one would take the first's.
            raise ValueError(f"request id {request_id[:80]!r} is already in flight")
        request = self.input_processor.process_inputs(
            request_id,
            prompt,
            params,
            supported_tasks=self._tasks,
            lora_request=lora_request,
            tokenization_kwargs=tokenization_kwargs,
            priority=priority,
        )
        if reasoning_ended is not None:
            request.reasoning_ended = reasoning_ended
        if reasoning_parser_kwargs is not None:
            request.reasoning_parser_kwargs = reasoning_parser_kwargs
        prompt_text, _, _ = extract_prompt_components(self.model_config, prompt)
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self.engine.add_request(request_id, request, params, prompt_text=prompt_text)
            assert self._wake is not None, "requests run inside InProcessClient.serving()"
            self._wake.set()
            while not finished:
                output = await queue.get()
                if isinstance(output, BaseException):
                    finished = True
                    raise output
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._dead is None:
                self.engine.abort_request([request_id])

    async def abort(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.engine.abort_request(ids)
        # vLLM's offline engine sends no final output for an aborted request: end the waits.
        for aborted in ids:
            queue = self._queues.get(aborted)
            if queue is not None:
                queue.put_nowait(RuntimeError(f"request {aborted[:80]!r} was aborted"))

    async def add_lora(self, lora_request: Any) -> bool:
        return self.engine.add_lora(lora_request)

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return self._tasks

    # ---- the step loop ----------------------------------------------------------------------

    async def serving(self, work: Any) -> Any:
        """Run ``work`` (a coroutine of handler calls) while this client steps the engine."""
        self._wake = asyncio.Event()
        pump = asyncio.create_task(self._pump())
        try:
            return await work
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _pump(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_unfinished_requests():
                self._wake.clear()
                await self._wake.wait()
                continue
            # Let handlers whose rendering finished add their requests before the next step.
            await asyncio.sleep(0)
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # every waiting request learns of it
                # A step cut short (a failure, or the run interrupted: Dagster's termination
                # arrives as an exception in whatever code runs) leaves the engine unusable.
                # An asyncio task would keep a non-Exception to itself, so the handlers get it
                # through their queues and the chunk ends with it.
                self._dead = exc
                for queue in self._queues.values():
                    queue.put_nowait(exc)
                if not isinstance(exc, Exception):
                    raise
                return
            for output in outputs:
                queue = self._queues.get(output.request_id)
                if queue is not None:
                    queue.put_nowait(output)
            if self.after_step is not None:
                self.after_step()

    # ---- what a batch engine has no use for -------------------------------------------------

    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def is_tracing_enabled(self) -> bool:
        return False

    async def do_log_stats(self) -> None:
        return None

    async def check_health(self) -> None:
        if self._dead is not None:
            raise self.dead_error

    async def start_profile(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    async def reset_mm_cache(self) -> None:
        self.engine.reset_mm_cache()

    async def reset_encoder_cache(self) -> None:
        self.engine.reset_encoder_cache()

    async def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        return bool(self.engine.reset_prefix_cache(*args, **kwargs))

    async def sleep(self, level: int = 1, mode: Any = "abort") -> None:
        self.engine.sleep(level, mode)

    async def release_kv_cache_memory(self) -> None:
        self.engine.release_kv_cache_memory()

    async def wake_up(self, tags: list[str] | None = None) -> bool:
        return bool(self.engine.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return bool(self.engine.is_sleeping())

    async def pause_generation(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a batch engine is not paused")

    async def resume_generation(self) -> None:
        return None

    async def is_paused(self) -> bool:
        return False

    def shutdown(self, timeout: float | None = None) -> None:
        return None


_CLIENT_CLASS: type | None = None


class _RequestsAreProcessedHere(logging.Filter):
    """``InProcessClient`` processes a request itself (to set the reasoning fields vLLM's
    ``AsyncLLM`` sets) and hands ``LLMEngine`` the result, which vLLM calls deprecated for its
    own callers; the warning says nothing to a vbs user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Passing EngineCoreRequest to LLMEngine")


def run_chunk(
    client: Any,
    loop: asyncio.AbstractEventLoop,
    requests: list[EngineRequest],
    handle: Callable[[EngineRequest], Awaitable[EngineResult]],
    chat: bool = False,
) -> list[EngineResult]:
    """Run ``handle`` for every request of a chunk at once while ``client`` steps its engine:
    one result per request, in order. A request that raises is its own error line; an engine
    that fails stops the chunk with ``EngineFailure``."""

    async def one(request: EngineRequest) -> EngineResult:
        try:
            return await handle(request)
        except Exception as exc:  # noqa: BLE001 - one request's problem, never the chunk's
            if client.errored:
                raise
            log.warning("request %r failed: %r", request.custom_id[:64], exc)
            return _from_exception(request.custom_id, exc, chat)

    async def all_of_them() -> list[EngineResult]:
        tasks = [asyncio.ensure_future(one(r)) for r in requests]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:
            # The engine failed: nothing of this chunk may stay pending on the reused loop.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def chunk() -> list[EngineResult]:
        return await client.serving(all_of_them())

    try:
        return loop.run_until_complete(chunk())
    except Exception as exc:
        if client.errored:
            raise EngineFailure(f"the engine stopped: {quote(str(exc), 300)}") from exc
        raise


def in_process_client(llm_engine: Any) -> Any:
    """An ``EngineClient`` over ``llm_engine`` (vLLM's offline ``LLMEngine``)."""
    global _CLIENT_CLASS
    if _CLIENT_CLASS is None:
        _CLIENT_CLASS = type("InProcessClient", (_ClientMethods, _engine_client_base()), {})
        logging.getLogger("vllm.v1.engine.llm_engine").addFilter(_RequestsAreProcessedHere())
    return _CLIENT_CLASS(llm_engine)


@dataclass(frozen=True)
class Parsers:
    """The tool-call and reasoning parsers of one served model (vLLM's registered names)."""

    tool_call: str | None = None
    reasoning: str | None = None


class ServingLayer:
    """vLLM's chat and completion handlers for one loaded engine, with one chat handler per
    distinct parser configuration among the models it serves (the base and its adapters)."""

    def __init__(
        self, llm: Any, base_name: str, base_path: str, *, trust_request_chat_template: bool
    ) -> None:
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels

        self.llm = llm
        self.client = in_process_client(llm.llm_engine)
        self.loop = asyncio.new_event_loop()
        self.trust_request_chat_template = trust_request_chat_template
        self.models = OpenAIServingModels(
            self.client, [BaseModelPath(name=base_name, model_path=base_path)]
        )
        self.completion = OpenAIServingCompletion(
            self.client, self.models, online_renderer=self._renderer(Parsers()), request_logger=None
        )
        self._chats: dict[Parsers, Any] = {}
        # Adapters loaded once already (name, folder), and why the others could not be.
        self._loaded: set[tuple[str, str]] = set()
        self._broken: dict[tuple[str, str], str] = {}

    def _renderer(self, parsers: Parsers) -> Any:
        from vllm.renderers.online_renderer import OnlineRenderer

        renderer = OnlineRenderer(
            self.client.model_config,
            self.client.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
            trust_request_chat_template=self.trust_request_chat_template,
            enable_auto_tools=parsers.tool_call is not None,
            tool_parser=parsers.tool_call,
            reasoning_parser=parsers.reasoning,
        )
        renderer.warmup()
        return renderer

    def chat(self, parsers: Parsers) -> Any:
        """The chat handler for models with these parsers (built once)."""
        if parsers not in self._chats:
            from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

            self._chats[parsers] = OpenAIServingChat(
                self.client,
                self.models,
                "assistant",
                online_renderer=self._renderer(parsers),
                request_logger=None,
                chat_template=None,
                chat_template_content_format="auto",
                trust_request_chat_template=self.trust_request_chat_template,
                enable_auto_tools=parsers.tool_call is not None,
                tool_parser=parsers.tool_call,
                reasoning_parser=parsers.reasoning or "",
            )
        return self._chats[parsers]

    def use_adapters(self, adapters: dict[str, str]) -> None:
        """Serve exactly these adapters (served name -> folder); vLLM loads each on first use."""
        from vllm.lora.request import LoRARequest

        known = self.models.lora_requests
        for name in [n for n in known if n not in adapters]:
            del known[name]
        for name, path in adapters.items():
            if name not in known or known[name].lora_path != path:
                known[name] = LoRARequest(name, self.models.lora_id_counter.inc(1), path)

    def _unloadable(self, requests: list[EngineRequest]) -> dict[str, str]:
        """The adapters these requests name that vLLM cannot load (their weights unreadable,
        or not of this base), each with why: loaded here one at a time, before the chunk, so
        that one broken adapter fails only its own lines, never the chunk."""
        known = self.models.lora_requests
        broken: dict[str, str] = {}
        for name in sorted({r.body.get("model") for r in requests} & set(known)):
            lora = known[name]
            key = (name, lora.lora_path)
            if key in self._loaded:
                continue
            if key not in self._broken:
                try:
                    self.client.engine.add_lora(lora)
                    self._loaded.add(key)
                    continue
                except Exception as exc:  # noqa: BLE001 - whatever vLLM raises for bad weights
                    log.warning("adapter %s at %s does not load: %r", name, lora.lora_path, exc)
                    self._broken[key] = f"{type(exc).__name__}: {cut(str(exc), 300)}"
            broken[name] = self._broken[key]
        return broken

    def run(
        self, endpoint: str, requests: list[EngineRequest], parsers: dict[str, Parsers]
    ) -> list[EngineResult]:
        """One result per request, in order; ``parsers`` maps each servable model name to its
        parsers. A request naming an adapter that does not load gets an error line of its own."""
        chat = endpoint == "/v1/chat/completions"
        broken = self._unloadable(requests)
        runnable = [r for r in requests if r.body.get("model") not in broken]
        done = iter(
            run_chunk(self.client, self.loop, runnable, lambda r: self._one(r, chat, parsers), chat)
            if runnable
            else []
        )
        return [
            error_result(
                r.custom_id,
                503,
                "model_unavailable",
                f"The adapter {r.body['model']!r} could not be loaded: {broken[r.body['model']]}",
                "model",
            )
            if r.body.get("model") in broken
            else next(done)
            for r in requests
        ]

    async def _one(
        self, request: EngineRequest, chat: bool, parsers: dict[str, Parsers]
    ) -> EngineResult:
        from pydantic import ValidationError

        body = _without_request_id(request.body)
        if body.get("stream"):
            return error_result(
                request.custom_id,
                400,
                "invalid_request",
                "Streaming is not available in a batch.",
                "stream",
            )
        if chat and not self.trust_request_chat_template and _own_template(body):
            return error_result(
                request.custom_id,
                400,
                "invalid_request",
                "A request may not replace the model's chat template on this deployment "
                "(VBS_TRUST_REQUEST_CHAT_TEMPLATE is off).",
                "chat_template",
            )
        copies = _greedy_copies(body)
        model_parsers = parsers.get(body.get("model"), Parsers())
        if chat:
            refused = _unparsed_tools(body, model_parsers)
            if refused is not None:
                return error_result(request.custom_id, 400, "unsupported_parameter", *refused)
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            protocol: Any = ChatCompletionRequest
        else:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest

            protocol = CompletionRequest
        try:
            parsed = protocol.model_validate(body)
        except ValidationError as exc:
            return _invalid(request.custom_id, exc, body)
        if chat:
            response = await self.chat(model_parsers).create_chat_completion(parsed, None)
        else:
            response = await self.completion.create_completion(parsed, None)
        return _result(request.custom_id, response, copies, chat)


class PoolingLayer:
    """vLLM's embeddings, score and rerank handlers over the embedding engine in this process.
    An embedding model scores by the cosine similarity of its embeddings, a cross-encoder by its
    own head, as on a vLLM server."""

    def __init__(self, llm: Any, name: str, path: str) -> None:
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.entrypoints.pooling.embed.serving import ServingEmbedding
        from vllm.entrypoints.pooling.scoring.serving import ServingScores
        from vllm.entrypoints.pooling.utils import enable_scoring_api
        from vllm.renderers.chat_utils import ChatTemplateConfig

        self.llm = llm
        self.name = name
        self.client = in_process_client(llm.llm_engine)
        self.loop = asyncio.new_event_loop()
        tasks = self.client._tasks
        models = OpenAIServingModels(self.client, [BaseModelPath(name=name, model_path=path)])
        templates = ChatTemplateConfig(chat_template=None, chat_template_content_format="auto")
        self.handlers: dict[str, Any] = {}
        if self.client.model_config.get_pooling_task(tasks) == "embed":
            self.handlers["/v1/embeddings"] = ServingEmbedding(
                self.client, models, request_logger=None, chat_template_config=templates
            )
        if enable_scoring_api(tasks, self.client.model_config):
            self.handlers["/v1/score"] = self.handlers["/v1/rerank"] = ServingScores(
                self.client,
                models,
                supported_tasks=tasks,
                request_logger=None,
                chat_template_config=templates,
            )

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        return run_chunk(self.client, self.loop, requests, lambda r: self._one(endpoint, r))

    async def _one(self, endpoint: str, request: EngineRequest) -> EngineResult:
        from pydantic import TypeAdapter, ValidationError
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest
        from vllm.entrypoints.pooling.scoring.protocol import RerankRequest, ScoreRequest

        handler = self.handlers.get(endpoint)
        if handler is None:
            return error_result(
                request.custom_id,
                400,
                "invalid_request",
                f"The model {self.name!r} does not serve {endpoint}.",
                "model",
            )
        encoding = request.body.get("encoding_format")
        if endpoint == "/v1/embeddings" and encoding not in (None, "float", "base64"):
            # vLLM's binary formats answer with a stream of bytes, which no JSONL line holds.
            return error_result(
                request.custom_id,
                400,
                "invalid_request",
                f"Invalid encoding_format {quote(encoding, 40)}: use 'float' or 'base64'.",
                "encoding_format",
            )
        protocol: Any = {
            "/v1/embeddings": EmbeddingRequest,
            "/v1/score": ScoreRequest,
            "/v1/rerank": RerankRequest,
        }[endpoint]
        try:
            parsed = TypeAdapter(protocol).validate_python(_without_request_id(request.body))
        except ValidationError as exc:
            return _invalid(request.custom_id, exc, request.body, positions=False)
        response = await handler(parsed, None)
        body = json.loads(bytes(response.body))
        if "error" in body:
            error = body["error"]
            return error_line(
                request.custom_id, int(error["code"]), error["message"], error.get("param"), False
            )
        body["model"] = self.name
        tokens = (body.get("usage") or {}).get("prompt_tokens") or 0
        return EngineResult(request.custom_id, 200, body, prompt_tokens=tokens)


def _at(value: Any, path: list[str]) -> Any:
    for part in path:
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    return value


def _member_of(loc: tuple[Any, ...], value: Any) -> bool:
    """Whether a union member pydantic tried (a part of ``loc`` naming a type) is the one for
    the JSON type the client sent."""
    kinds = {list: "list[", dict: "dict[", str: "str", bool: "bool", int: "int", float: "float"}
    want = kinds.get(type(value))
    return want is not None and any(isinstance(p, str) and p.startswith(want) for p in loc)


def _invalid(
    custom_id: str, exc: Any, body: dict[str, Any], *, positions: bool = True
) -> EngineResult:
    """A body vLLM's request model refuses (a pydantic ``ValidationError``): a 400 line naming
    the request's own field (never the union member or class pydantic tried) and what is wrong
    with the value sent, with list positions unless ``positions`` is False."""
    errors = exc.errors()
    path = field_path(body, errors[0]["loc"], errors[0]["type"] == "missing")
    same = [e for e in errors if field_path(body, e["loc"], e["type"] == "missing") == path]
    try:
        value = _at(body, path) if errors[0]["type"] != "missing" else ...
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        value = ...
    chosen = next((e for e in same if _member_of(e["loc"], value)), same[0])
    param = ".".join(p for p in path if positions or not p.isdigit()) or None
    message = "it must not be null" if value is None else chosen["msg"]
    shown = f"'{param}'" if param else "the request"
    return error_result(
        custom_id, 400, "invalid_request", f"Invalid value for {shown}: {quote(message, 300)}",
        param,
    )  # fmt: skip


def _without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``body`` without vLLM's ``request_id`` extension: vLLM names the request after
    it, and two lines of a chunk giving the same one would be confused with each other. A batch
    line is known by its ``custom_id``; vLLM gives each request a fresh id."""
    return {k: v for k, v in body.items() if k != "request_id"}


def _own_template(body: dict[str, Any]) -> bool:
    """Whether a chat request brings its own chat template (code that would run here)."""
    kwargs = body.get("chat_template_kwargs")
    return body.get("chat_template") is not None or (
        isinstance(kwargs, dict) and kwargs.get("chat_template") is not None
    )


def _greedy_copies(body: dict[str, Any]) -> int:
    """vLLM refuses ``n > 1`` when sampling greedily; OpenAI answers n identical choices. Such a
    request runs once (``body`` gets ``n = 1``) and its answer is given this many times."""
    n, temperature = body.get("n"), body.get("temperature")
    if (
        isinstance(n, int)
        and not isinstance(n, bool)
        and n > 1
        and isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature < _GREEDY_TEMPERATURE
    ):
        body["n"] = 1
        return n
    return 1


def _unparsed_tools(body: dict[str, Any], parsers: Parsers) -> tuple[str, str] | None:
    """A request that may call a tool needs a tool-call parser for its model to turn generated
    text into ``tool_calls``; without one it is refused by name (vLLM's own refusal names its
    command-line flags and no parameter), rather than answered with text that ignores it."""
    if parsers.tool_call is not None:
        return None
    for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if body.get(tools) and body.get(choice, "auto") != "none":
            return (
                f"'{choice}' other than 'none' needs a tool-call parser for model "
                f"{quote(body.get('model'), 80)}: register it with one (vbs models add ... "
                "--tool-call-parser NAME, or VBS_TOOL_CALL_PARSER for the base model), or "
                f"send '{choice}': 'none'.",
                choice,
            )
    return None


def _result(custom_id: str, response: Any, copies: int, chat: bool) -> EngineResult:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    if isinstance(response, ErrorResponse):
        error = response.error
        return error_line(custom_id, int(error.code), error.message, error.param, chat)
    if not hasattr(response, "model_dump"):  # a stream generator; refused above
        return error_result(custom_id, 400, "invalid_request", "Streaming is not available.")
    body = response.model_dump(mode="json")
    usage = body.get("usage") or {}
    if copies > 1:
        # One choice per prompt came back (a completion may have several prompts): each is
        # given ``copies`` times, numbered as vLLM numbers n choices per prompt.
        body["choices"] = [
            dict(choice, index=p * copies + j)
            for p, choice in enumerate(body["choices"])
            for j in range(copies)
        ]
        usage["completion_tokens"] = usage.get("completion_tokens", 0) * copies
        usage["total_tokens"] = usage.get("prompt_tokens", 0) + usage["completion_tokens"]
    return EngineResult(
        custom_id,
        200,
        body,
        usage.get("prompt_tokens") or 0,
        usage.get("completion_tokens") or 0,
    )


def _from_exception(custom_id: str, exc: Exception, chat: bool) -> EngineResult:
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    error = create_error_response(exc).error
    return error_line(custom_id, int(error.code), error.message, error.param, chat)


def error_line(
    custom_id: str, status: int, message: str, param: str | None, chat: bool
) -> EngineResult:
    """vLLM's refusal as vbs's error line: OpenAI's codes where OpenAI has one, the prompt's
    own field named, and no internals of a server error."""
    code = "invalid_request"
    if _FLAG.search(message):
        # Advice to whoever runs a vLLM server ("start it with --flag"): not the client's.
        message = f"{param or 'A parameter of this request'} is not accepted on this deployment."
    if status == 404:
        code = "model_not_found"
    elif "maximum context length" in message:
        code, param = "context_length_exceeded", "messages" if chat else "prompt"
    elif status >= 500:
        code, message = "server_error", "The engine could not run the request."
    return error_result(custom_id, status, code, cut(message), param)


_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def cut(message: str, limit: int = 500) -> str:
    """An engine's message, cut so that no error line grows with the input it quotes."""
    return message if len(message) <= limit else message[:limit] + "..."
