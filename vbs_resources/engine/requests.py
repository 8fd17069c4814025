"""The input shapes of embedding requests (``input`` as a string, strings or token ids).

Chat and completion requests are parsed, rendered and validated by vLLM's own serving layer
(``vllm_serving``); what is left here is the embeddings endpoint's own handling.
"""

from __future__ import annotations

from typing import Any

from vbs_resources.engine import RequestError


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
