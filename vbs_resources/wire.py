"""OpenAI wire shapes, one pydantic model per shape (as vLLM's ``run_batch.py`` does).

Production code builds every line and object it sends through these models, and the tests
validate what comes out against the same models, so the two cannot drift apart.

Request bodies are typed for the parameters whose JSON type is known (a string where a number
belongs is a format error, named with its line at validation) and otherwise passed through
(``extra="allow"``): the engine judges values (``temperature: -1``) per request, where a refused
value becomes an error line for that request instead of failing the batch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)

ENDPOINTS: tuple[str, ...] = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/score",
    "/v1/rerank",
)
Endpoint = Literal[
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/score", "/v1/rerank"
]
BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
TERMINAL_STATUSES = frozenset({"failed", "completed", "expired", "cancelled"})
MAX_CHOICES = 128  # OpenAI's upper bound for ``n``

Number = StrictInt | StrictFloat
# Types are checked for the whole file; values of the right type are judged per request
# (``vbs_resources.engine.value_problem``, then vLLM's own validation).
TokenCount = StrictInt
TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


def field_path(value: Any, loc: tuple[Any, ...], missing: bool) -> list[str]:
    """The parts of a pydantic error location that are fields of ``value``: pydantic adds the
    union member it tried (``str``, ``list[str]``, a class name), which is no field of the
    request, and a client must never be shown it."""
    path: list[str] = []
    for i, part in enumerate(loc):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif missing and i == len(loc) - 1:
            pass
        else:
            continue
        path.append(str(part))
    return path


# ---- request bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)
    n: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool | None = None
    user: StrictStr | None = None
    max_tokens: TokenCount | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr = Field(min_length=1)
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatCompletionBody(_Body):
    messages: list[ChatMessage]
    max_completion_tokens: TokenCount | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    logit_bias: dict[str, Number] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: Prompt
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None
    logit_bias: dict[str, Number] | None = None


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)
    input: Prompt
    encoding_format: StrictStr | None = None
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


ScoreInput = StrictStr | list[StrictStr] | list[dict[str, Any]] | dict[str, Any]


class ScoreBody(BaseModel):
    """vLLM's /score (not an OpenAI endpoint): pairs to score, under any of vLLM's field names
    (``queries``/``documents``, ``queries``/``items``, ``data_1``/``data_2``,
    ``text_1``/``text_2``); vLLM's own handler checks which pair is given."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)


class RerankBody(BaseModel):
    """vLLM's /rerank (Jina's and Cohere's shape): documents ranked against one query."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(min_length=1, max_length=256)
    query: ScoreInput
    documents: ScoreInput
    top_n: Annotated[StrictInt, Field(ge=0)] | None = None


BODY_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingBody,
    "/v1/score": ScoreBody,
    "/v1/rerank": RerankBody,
}


class BatchRequestInput(BaseModel):
    """One line of an OpenAI batch input file."""

    model_config = ConfigDict(extra="forbid")

    custom_id: StrictStr = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: Endpoint
    body: dict[str, Any]


# ---- output lines --------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    """OpenAI's error object, inside a failed request's response body and in API errors."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


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

    @property
    def ok(self) -> bool:
        return self.response is not None and 200 <= self.response.status_code < 300


# ---- the batch object ------------------------------------------------------------------------


class BatchErrorEntry(BaseModel):
    """One entry of a batch object's ``errors.data``: why the batch failed."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorEntry]


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    """OpenAI's Batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str | None
    errors: BatchErrors | None
    input_file_id: str | None
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    usage: dict[str, Any] | None
    metadata: dict[str, str] | None


class FileObject(BaseModel):
    """OpenAI's File object."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class ModelObject(BaseModel):
    """OpenAI's Model object, with vLLM's ``root`` (where the weights are) and ``parent`` (an
    adapter's base model)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vbs"
    root: str | None = None
    parent: str | None = None


class AnnotationObject(BaseModel):
    """What curators said of a conquest (the seed's names), and where it came from."""

    isGoldStar: bool | None = None  # noqa: N815 - the seed's wire names
    rating: int | None = None
    feedback: str | None = None
    improvementNotes: str | None = None  # noqa: N815
    answers: dict[str, Any] = Field(default_factory=dict)
    source: str | None = None
    edited_at: float | None = None


class ConquestChange(BaseModel):
    """One change of a conquest's status, result or exclusion, as its lifecycle made it."""

    field: str
    before: str | None = None
    after: str | None = None
    source: str
    note: str | None = None
    at: float


class ConquestObject(BaseModel):
    """One conquest, as ``/v1/conquests`` answers it."""

    id: str
    object: Literal["conquest"] = "conquest"
    type: str
    type_version: str
    status: str
    result: str | None = None
    input_data: dict[str, Any]
    prompt: Any
    prediction: str | None = None
    error: dict[str, Any] | None = None
    model: str | None = None
    batch_id: str
    custom_id: str
    created_at: int
    excluded_at: float | None = None
    excluded_reason: str | None = None
    annotation: AnnotationObject | None = None
    annotation_history: list[AnnotationObject] | None = None
    history: list[ConquestChange] | None = None


class DatasetCounts(BaseModel):
    train: int
    eval: int
    icl: int


class DatasetObject(BaseModel):
    """One curated dataset version, as ``/v1/datasets`` answers it. ``files`` are bucket paths;
    ``conquest_ids`` (retrieve only) are what each split was made of."""

    id: str  # the version: the type and the hash of the files' content
    object: Literal["dataset"] = "dataset"
    type: str
    type_version: str
    created_at: int
    built_at: float
    counts: DatasetCounts
    files: dict[str, str]
    options: dict[str, Any]
    run_id: str | None = None
    conquest_ids: dict[str, list[str]] | None = None


class WebhookEventData(BaseModel):
    id: str


class WebhookEvent(BaseModel):
    """The body of a webhook delivery (``batch.completed``, ``batch.failed``, ...)."""

    object: Literal["event"] = "event"
    id: str
    type: str
    created_at: int
    data: WebhookEventData


# ---- batch options: the API's create request and the inbox sidecar --------------------------


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    """OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if len(value) > 16:
        raise ValueError("metadata holds at most 16 pairs")
    for key, item in value.items():
        if len(key) > 64:
            raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
        if len(item) > 512:
            raise ValueError(f"metadata value of {key[:20]!r} is longer than 512 characters")
    return value


Metadata = dict[StrictStr, StrictStr]


class CreateBatchRequest(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: StrictStr = Field(max_length=100)
    endpoint: StrictStr = Field(max_length=100)
    completion_window: StrictStr = Field(max_length=16)  # required, as OpenAI requires it
    metadata: Metadata | None = None
    # vbs extension (the openai client sends it with extra_body): requests per checkpoint.
    chunk_size: Annotated[StrictInt, Field(ge=1, le=50_000)] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(value)


class BatchOptions(BaseModel):
    """A batch's options: the sidecar ``<name>.metadata.json`` dropped before a batch file, or
    what the API recorded for a batch it created. Ids are never among them: vbs gives them."""

    model_config = ConfigDict(extra="forbid")

    metadata: Metadata = Field(default_factory=dict)
    completion_window: Literal["24h"] = "24h"
    chunk_size: Annotated[StrictInt, Field(ge=1, le=50_000)] | None = Field(
        default=None, description="Requests per checkpointed engine chunk."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_metadata(value) or {}

    def run_config(self) -> dict[str, Any]:
        """The ``batch_job`` run config these options ask for: the same whether the inbox sensor,
        the API or the reconciler starts the run."""
        if self.chunk_size is None:
            return {}
        return {"ops": {"batch_output": {"config": {"chunk_size": self.chunk_size}}}}
