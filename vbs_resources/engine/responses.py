"""From vLLM outputs to OpenAI response bodies (``chat.completion``, ``text_completion``, the
embeddings ``list``), with usage and logprobs as OpenAI shapes them."""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

from vbs_resources.engine import EngineResult
from vbs_resources.engine.requests import Prepared


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


def _usage(item: Prepared, outputs: list[Any]) -> tuple[int, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    # Each of a greedy request's repeated choices counts, as each of OpenAI's n choices does.
    completion = item.choices * sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return prompt, completion


def _completions(output: Any, choices: int) -> list[Any]:
    """An output's completions, the single greedy one repeated ``choices`` times."""
    return list(output.outputs) * choices if choices > 1 else list(output.outputs)


def _body(kind: str, prefix: str, model: str, choices: list[dict], usage: tuple[int, int]) -> dict:
    prompt_tokens, completion_tokens = usage
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
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


def chat_response(item: Prepared, outputs: list[Any], model: str, tokenizer: Any) -> EngineResult:
    (output,) = outputs
    top = getattr(item.params, "logprobs", None) or 0
    with_logprobs = item.extra.get("top_logprobs")
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": c.text, "refusal": None},
            "logprobs": _chat_logprobs(c, tokenizer, top) if with_logprobs else None,
            "finish_reason": c.finish_reason or "stop",
        }
        for index, c in enumerate(_completions(output, item.choices))
    ]
    usage = _usage(item, outputs)
    body = _body("chat.completion", "chatcmpl", model, choices, usage)
    return EngineResult(item.request.custom_id, 200, body, *usage)


def completion_response(
    item: Prepared, outputs: list[Any], model: str, tokenizer: Any
) -> EngineResult:
    echo = bool(item.request.body.get("echo"))
    choices = []
    for output in outputs:
        for c in _completions(output, item.choices):
            choices.append(
                {
                    "index": len(choices),
                    "text": (output.prompt or "") + c.text if echo else c.text,
                    "logprobs": _completion_logprobs(c, tokenizer),
                    "finish_reason": c.finish_reason or "stop",
                }
            )
    usage = _usage(item, outputs)
    body = _body("text_completion", "cmpl", model, choices, usage)
    return EngineResult(item.request.custom_id, 200, body, *usage)


def encode_embedding(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def embedding_response(
    custom_id: str, outputs: list[Any], encoding: str, model: str, tokens: int
) -> EngineResult:
    data = [
        {
            "object": "embedding",
            "index": index,
            "embedding": encode_embedding(list(out.outputs.embedding), encoding),
        }
        for index, out in enumerate(outputs)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return EngineResult(custom_id, 200, body, prompt_tokens=tokens)
