"""OpenAI Batch wire shapes, one pydantic model per shape (as vLLM's ``run_batch.py`` does).

Request bodies are validated loosely on purpose: the fields vbs reads are typed, every other
OpenAI parameter passes through (``extra="allow"``) and is judged by the engine, where an
unsupported value becomes an error line for that request instead of failing the whole batch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENDPOINTS: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingBody(_Body):
    input: str | list[str] | list[int] | list[list[int]]


BODY_MODELS: dict[str, type[_Body]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingBody,
}


class BatchRequestInput(BaseModel):
    """One line of an OpenAI batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any] | None


class BatchError(BaseModel):
    code: str
    message: str


class BatchRequestOutput(BaseModel):
    """One line of an OpenAI batch output or error file."""

    model_config = ConfigDict(extra="forbid")

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None


class BatchErrorEntry(BaseModel):
    """One entry of a batch object's ``errors.data``: why validation refused the file."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchOptions(BaseModel):
    """The optional sidecar ``<name>.metadata.json`` dropped next to a batch file."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, str] = Field(default_factory=dict)
    completion_window: Literal["24h"] = "24h"
    batch_id: str | None = Field(
        default=None,
        pattern=r"^batch_[A-Za-z0-9]{8,64}$",
        description="Set by the HTTP API; file drops get an id derived from their content.",
    )
    input_file_id: str | None = None
    chunk_size: int | None = Field(
        default=None, ge=1, le=50_000, description="Requests per checkpointed engine chunk."
    )

    @field_validator("metadata")
    @classmethod
    def _openai_metadata_limits(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        for key, item in value.items():
            if len(key) > 64:
                raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
            if len(item) > 512:
                raise ValueError(f"metadata value of {key!r} is longer than 512 characters")
        return value

    def run_config(self) -> dict[str, Any]:
        """The ``batch_job`` run config these options ask for: the same whether the inbox sensor
        or the HTTP API starts the run."""
        if self.chunk_size is None:
            return {}
        return {"ops": {"batch_output": {"config": {"chunk_size": self.chunk_size}}}}


def batch_run_tags(batch_id: str, source_file: str) -> dict[str, str]:
    """Tags on every batch run, whoever starts it (``dagster/partition`` is added by Dagster for
    a sensor's run request and by the API for a run it launches)."""
    return {"vbs/batch_id": batch_id, "vbs/source_file": source_file[:200]}
