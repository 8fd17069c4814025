"""From vLLM's pooling outputs to OpenAI's embeddings ``list`` body."""

from __future__ import annotations

import base64
import struct
from typing import Any

from vbs_resources.engine import EngineResult


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
