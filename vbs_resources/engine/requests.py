"""From an OpenAI request body to what vLLM runs: prompt token ids and sampling parameters.

Bodies are parsed with vLLM's own OpenAI protocol models, so per-request parameters
(temperature, top_p, max_tokens / max_completion_tokens, stop, seed, n, penalties, logprobs /
top_logprobs, response_format through structured outputs, ...) mean exactly what they mean to a
vLLM server. Anything that stops one request raises ``RequestError``, which becomes that
request's error line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vbs_resources.engine import EngineRequest, RequestError
from vbs_resources.strict_json import quote

# Below this vLLM samples greedily, and refuses ``n > 1``.
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class Prepared:
    """One request, ready for the engine."""

    index: int
    request: EngineRequest
    prompts: list[list[int]]
    params: Any
    # Greedy requests with ``n > 1`` run once; their answer is given ``choices`` times, as
    # OpenAI gives n identical choices.
    choices: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RenderPolicy:
    """What a request may ask of the renderer."""

    # vLLM's server refuses a request's own chat template unless started with
    # --trust-request-chat-template: a template is code that runs in the engine's process.
    trust_request_chat_template: bool = False


def prepare_generation(
    index: int,
    request: EngineRequest,
    chat: bool,
    tokenizer: Any,
    max_len: int,
    defaults: dict[str, Any],
    policy: RenderPolicy = RenderPolicy(),
) -> Prepared:
    """Prompts and sampling parameters of one chat or completion request."""
    from pydantic import ValidationError

    if chat:
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionRequest as Protocol,
        )
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as Protocol

    body = dict(request.body)
    if body.get("stream"):
        raise RequestError("Streaming is not available in a batch.", param="stream")
    choices = 1
    n = body.get("n")
    temperature = body.get("temperature", defaults.get("temperature", 1.0))
    if isinstance(n, int) and n > 1 and _is_number(temperature):
        if temperature < _GREEDY_TEMPERATURE:
            choices, body["n"] = n, 1
    try:
        parsed = Protocol.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise RequestError(f"Invalid request: {first['msg']}", param=param) from exc
    except Exception as exc:  # model validators raise vLLM's own error types too
        raise RequestError(
            f"Invalid request: {quote(str(exc), 300)}", param=getattr(exc, "parameter", None)
        ) from exc

    if chat:
        refuse_unparsed_tools(body)
        prompts = [render_chat(body, tokenizer, policy)]
    else:
        prompts = token_lists(
            body["prompt"], tokenizer, "prompt", "a string, a list of strings or token ids"
        )
    longest = max(len(p) for p in prompts)
    if longest >= max_len:
        raise RequestError(
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
    if requested is not None and not isinstance(requested, int):
        raise RequestError("'max_tokens' must be an integer.", param="max_tokens")
    max_tokens = max_len - longest if requested is None else min(requested, max_len - longest)
    try:
        params = parsed.to_sampling_params(max_tokens, defaults)
    except Exception as exc:  # vLLM's validation errors do not all derive from ValueError
        param = getattr(exc, "parameter", None)
        raise RequestError(f"Invalid request: {quote(str(exc), 300)}", param=param) from exc
    extra = {"top_logprobs": bool(getattr(parsed, "logprobs", None))} if chat else {}
    return Prepared(index, request, prompts, params, choices, extra)


def refuse_unparsed_tools(body: dict[str, Any]) -> None:
    """Tool calls need vLLM's serving layer to turn the generated text into ``tool_calls``;
    this engine has none, so a request that may call a tool is refused by name rather than
    answered with free text that ignores it (``tool_choice: "none"`` still runs)."""
    for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
        if body.get(tools) and body.get(choice, "auto") != "none":
            raise RequestError(
                f"'{choice}' other than 'none' is not supported by the in-process engine, which "
                "does not parse tool calls; use VBS_ENGINE=server (vLLM's server parses them), "
                f"or '{choice}': 'none'.",
                code="unsupported_parameter",
                param=choice,
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def render_chat(body: dict[str, Any], tokenizer: Any, policy: RenderPolicy) -> list[int]:
    """The prompt token ids of a chat request, through the model's chat template."""
    kwargs = dict(body.get("chat_template_kwargs") or {})
    template = kwargs.pop("chat_template", None)
    if body.get("chat_template") is not None:
        template = body["chat_template"]
    if template is not None and not policy.trust_request_chat_template:
        raise RequestError(
            "A request may not replace the model's chat template on this deployment "
            "(VBS_TRUST_REQUEST_CHAT_TEMPLATE is off).",
            param="chat_template",
        )
    messages = []
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, list):
            texts = [p.get("text", "") for p in content if p.get("type") == "text"]
            if len(texts) != len(content):
                raise RequestError("This model accepts only text content parts.", param="messages")
            message = dict(message, content="".join(texts))
        messages.append(message)
    try:
        text = tokenizer.apply_chat_template(
            messages,
            tools=body.get("tools"),
            add_generation_prompt=True,
            tokenize=False,
            chat_template=template,
            **kwargs,
        )
    except Exception as exc:  # jinja errors come in many types
        raise RequestError(
            f"The chat template refused the messages: {quote(str(exc), 300)}"
        ) from exc
    return tokenizer.encode(text, add_special_tokens=False)


def token_lists(value: Any, tokenizer: Any, param: str, what: str) -> list[list[int]]:
    """The OpenAI input shapes shared by ``prompt`` and ``input``: a string, a list of strings,
    a list of token ids, or a list of such lists; one token list per text."""
    if isinstance(value, str):
        return [tokenizer.encode(value)]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [tokenizer.encode(v) for v in value]
        if all(isinstance(v, int) for v in value):
            return [list(value)]
        if all(isinstance(v, list) and v for v in value):
            return [list(v) for v in value]
    raise RequestError(f"'{param}' must be {what}.", param=param)


def embedding_inputs(value: Any, tokenizer: Any, max_len: int) -> list[list[int]]:
    lists = token_lists(value, tokenizer, "input", "a non-empty string or list")
    if max(len(t) for t in lists) > max_len:
        raise RequestError(
            f"An input is longer than this model's {max_len}-token context.",
            code="context_length_exceeded",
            param="input",
        )
    return lists
