"""The inference engine: one interface, one implementation per deployment shape.

``InferenceEngine`` is what ``batch_output`` talks to: it runs OpenAI request bodies for one
endpoint and returns one ``EngineResult`` per request, a request that cannot run being an error
result while the rest of the chunk goes on. ``VLLMEngine`` (mode ``in_process``) runs vLLM's
offline ``LLM`` inside the run; ``VLLMServerEngine`` (mode ``server``) sends the same bodies to a
long-lived OpenAI-compatible vLLM server shared by many runs.

The modules below split the work: ``vllm_serving`` runs chat, completion, score and rerank
requests through vLLM's own serving layer over an engine in this process, ``requests`` and
``responses`` handle embeddings, ``hardware`` decides device, dtype and the environment vLLM
reads, ``vllm_local`` and ``vllm_server`` are the resources.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import dagster as dg

from vbs_resources.registry import ServedModel, ServedModels
from vbs_resources.wire import ErrorBody, ErrorDetail

# Endpoints answered by the embedding model (pooling) rather than the generation model.
POOLING_ENDPOINTS = ("/v1/embeddings", "/v1/score", "/v1/rerank")


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


class EngineFailure(RuntimeError):
    """The engine itself is broken (every request of a chunk fails, and not for a reason of its
    own): the batch must stop rather than turn its remaining requests into error lines."""


class EngineUnavailable(RuntimeError):
    """The engine cannot be reached for now (a server that is down or restarting): the run
    steps back without touching the batch, and retries its step ``retries`` times, waiting
    ``wait_s`` each time; the batch resumes from its last checkpoint."""

    def __init__(self, message: str, *, retries: int = 0, wait_s: float = 0) -> None:
        super().__init__(message)
        self.retries, self.wait_s = retries, wait_s


class RequestError(ValueError):
    """Why one request cannot run; it becomes that request's error line."""

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

    def result(self, custom_id: str) -> EngineResult:
        return error_result(custom_id, self.status_code, self.code, str(self), self.param)


def error_result(
    custom_id: str, status_code: int, code: str, message: str, param: str | None = None
) -> EngineResult:
    kind = "invalid_request_error" if status_code < 500 else "server_error"
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return EngineResult(custom_id, status_code, body.model_dump())


# Values vbs bounds itself, whatever the engine would take: (field, lowest, highest, what).
_BOUNDS = {
    "/v1/chat/completions": (
        ("n", 1, 128, "choices"),
        ("max_tokens", 1, 2**31 - 1, "tokens"),
        ("max_completion_tokens", 1, 2**31 - 1, "tokens"),
        ("top_logprobs", 0, 20, "alternatives"),
    ),
    "/v1/completions": (
        ("n", 1, 128, "choices"),
        ("best_of", 1, 128, "candidates"),
        ("max_tokens", 1, 2**31 - 1, "tokens"),
        ("logprobs", 0, 20, "alternatives"),
    ),
}


def value_problem(endpoint: str, body: dict[str, Any]) -> tuple[str, str] | None:
    """(field, message) when a request's value of the right type is out of what vbs serves;
    such a request is an error line of its own, the batch goes on (its types were checked
    for the whole file)."""
    for name, low, high, what in _BOUNDS.get(endpoint, ()):
        value = body.get(name)
        if isinstance(value, int) and not low <= value <= high:
            return name, f"{name} must be {low} to {high} {what}, not {value}."
    if endpoint == "/v1/chat/completions" and body.get("messages") == []:
        return "messages", "messages must hold at least one message."
    return None


def route(
    endpoint: str, requests: list[EngineRequest], servable: dict[str, ServedModel]
) -> tuple[list[EngineResult | None], list[tuple[int, EngineRequest]]]:
    """Split a chunk into the error lines of requests that cannot run (a model ``servable``
    lacks: ``model_not_found``; a value out of range: ``invalid_value``), in request order with
    None where a request can run, and the requests that can run."""
    results: list[EngineResult | None] = [None] * len(requests)
    runnable: list[tuple[int, EngineRequest]] = []
    for i, request in enumerate(requests):
        model = request.body.get("model")
        problem = value_problem(endpoint, request.body)
        if problem is not None:
            results[i] = error_result(
                request.custom_id, 400, "invalid_value", problem[1], problem[0]
            )
            continue
        if isinstance(model, str) and model in servable:
            runnable.append((i, request))
            continue
        from vbs_resources.strict_json import quote

        results[i] = error_result(
            request.custom_id,
            404,
            "model_not_found",
            f"The model {quote(model, 80)} does not exist or is not served for {endpoint}; "
            f"served: {sorted(servable)[:20]}.",
            "model",
        )
    return results, runnable


class InferenceEngine(dg.ConfigurableResource):
    """Runs OpenAI request bodies for one endpoint and returns one result per request.

    What it serves comes from the model registry: ``start`` receives the registry's available
    models, and a request naming anything this engine cannot serve from them is a
    ``model_not_found`` line."""

    def configured_models(self) -> list[ServedModel]:
        """The base and embedding models of this engine's settings (registered on start)."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """Engine facts for Dagster metadata (mode, models, device)."""
        raise NotImplementedError

    def start(self, endpoint: str, served: ServedModels | None = None) -> None:
        """Load what ``endpoint`` needs for the ``served`` models (the configured ones when
        None), so that start-up is not counted as generation time."""

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        raise NotImplementedError

    def yield_accelerator(self) -> contextlib.AbstractContextManager[None]:
        """Held while a training run uses this machine's accelerator: an engine that holds it
        between runs (a warm server on the same GPUs) lets go of it, and takes it back after."""
        return contextlib.nullcontext()

    def run_chunks(
        self, endpoint: str, chunks: Iterable[list[EngineRequest]]
    ) -> Iterator[list[EngineResult]]:
        """Each chunk's results, in chunk order. An engine that can may run later chunks while
        earlier ones finish (a server keeps its replicas busy across chunk boundaries); closing
        the iterator drops what is still in flight."""
        for requests in chunks:
            yield self.run(endpoint, requests)


from vbs_resources.engine.vllm_local import VLLMEngine  # noqa: E402 - needs the interface above
from vbs_resources.engine.vllm_server import VLLMServerEngine  # noqa: E402

__all__ = [
    "POOLING_ENDPOINTS",
    "EngineFailure",
    "EngineUnavailable",
    "EngineRequest",
    "EngineResult",
    "InferenceEngine",
    "RequestError",
    "VLLMEngine",
    "VLLMServerEngine",
    "error_result",
    "route",
]
