"""Streaming validation of an OpenAI batch input file, with OpenAI's error semantics.

The file is read line by line in constant memory (only the set of ``custom_id``s grows, bounded
by the request limit). Any format error fails the batch at validation; every error names its
1-based physical line and, where one is at fault, the parameter, as OpenAI's ``errors.data[]``.
Blank lines are skipped (as vLLM's ``run_batch`` does) but still count for line numbers; a UTF-8
BOM on the first line and CRLF line ends are accepted. Lines are parsed by ``strict_json``, so
what would break later (lone surrogates, ``NaN``, duplicate keys, deep nesting, huge numbers) is
refused here, with its line and field; values quoted in messages are cut short, so no message
grows with the input.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from pydantic import BaseModel, ValidationError

from vbs_resources.strict_json import JSONError, quote
from vbs_resources.strict_json import loads as strict_loads
from vbs_resources.wire import BODY_MODELS, ENDPOINTS, BatchErrorEntry, field_path

MAX_REPORTED_ERRORS = 1000
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Limits:
    """OpenAI's defaults: 50,000 requests and 200 MB per batch file."""

    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024


@dataclass
class ValidationReport:
    """What validation learned about a batch file; ``ok`` only when ``errors`` is empty."""

    request_count: int = 0
    bytes: int = 0
    sha256: str = ""
    endpoint: str | None = None
    models: Counter[str] = field(default_factory=Counter)
    errors: list[BatchErrorEntry] = field(default_factory=list)
    error_count: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    lines_read: int = 0  # request lines read (blank lines are not requests)

    def add_error(
        self, code: str, message: str, line: int | None = None, param: str | None = None
    ) -> None:
        self.keep(BatchErrorEntry(code=code, message=message, line=line, param=param))

    def keep(self, error: BatchErrorEntry) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS - 1:
            self.errors.append(error)

    @property
    def valid_requests(self) -> int:
        """Requests read without an error (what a failed batch's ``request_counts.total`` is)."""
        return max(self.lines_read - self.error_count, 0)

    def listed_errors(self) -> list[BatchErrorEntry]:
        """The errors as the batch shows them: the first ones, then, when there were more than
        fit, one entry saying how many there were in all."""
        if self.error_count <= len(self.errors):
            return list(self.errors)
        cut = BatchErrorEntry(
            code="too_many_errors",
            message=f"{self.error_count} errors in all, in {self.lines_read} request lines read; "
            f"the first {len(self.errors)} are listed.",
        )
        return [*self.errors, cut]


Row = dict[str, Any]
RowSink = Callable[[list[Row]], None]


def _pydantic_error(line_no: int, exc: ValidationError, prefix: str, value: Any) -> BatchErrorEntry:
    first = exc.errors()[0]
    loc = ".".join(field_path(value, first["loc"], first["type"] == "missing"))[:200]
    param = f"{prefix}.{loc}" if prefix and loc else (prefix or loc or None)
    if first["type"] == "missing":
        return BatchErrorEntry(
            code="missing_required_parameter",
            message=f"Missing required parameter: '{param}'.",
            line=line_no,
            param=param,
        )
    return BatchErrorEntry(
        code="invalid_request",
        message=f"Invalid value for '{param}': {first['msg']}.",
        line=line_no,
        param=param,
    )


def _check_line(
    line_no: int, obj: Any, endpoint: str | None
) -> tuple[BatchErrorEntry | None, str | None]:
    """Returns (error, url) for one parsed JSON line; url is set when the line names a known one."""
    if not isinstance(obj, dict):
        return BatchErrorEntry(
            code="invalid_json_line",
            message="This line is not a JSON object.",
            line=line_no,
        ), None
    for name in ("custom_id", "method", "url", "body"):
        if name not in obj:
            return BatchErrorEntry(
                code="missing_required_parameter",
                message=f"Missing required parameter: '{name}'.",
                line=line_no,
                param=name,
            ), None
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        return BatchErrorEntry(
            code="invalid_request",
            message=f"Unrecognized request argument supplied: {quote(unknown[0])}.",
            line=line_no,
            param=unknown[0][:64],
        ), None
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 512:
        return BatchErrorEntry(
            code="invalid_request",
            message="'custom_id' must be a non-empty string of at most 512 characters.",
            line=line_no,
            param="custom_id",
        ), None
    if obj["method"] != "POST":
        return BatchErrorEntry(
            code="invalid_method",
            message=f"Invalid HTTP method {quote(obj['method'])}: batch requests must use 'POST'.",
            line=line_no,
            param="method",
        ), None
    url = obj["url"]
    if url not in ENDPOINTS:
        return BatchErrorEntry(
            code="invalid_url",
            message=f"Invalid URL {quote(url)}: supported are {', '.join(ENDPOINTS)}.",
            line=line_no,
            param="url",
        ), None
    if endpoint is not None and url != endpoint:
        return BatchErrorEntry(
            code="mismatched_url",
            message=f"The URL {quote(url)} differs from the batch endpoint {quote(endpoint)}; "
            "all requests of a batch must use the same URL.",
            line=line_no,
            param="url",
        ), url
    if not isinstance(obj["body"], dict):
        return BatchErrorEntry(
            code="invalid_request",
            message="'body' must be a JSON object.",
            line=line_no,
            param="body",
        ), url
    body_model: type[BaseModel] = BODY_MODELS[url]
    try:
        body_model.model_validate(obj["body"])
    except ValidationError as exc:
        return _pydantic_error(line_no, exc, "body", obj["body"]), url
    return None, url


def iter_lines(fh: IO[bytes]) -> Iterable[tuple[int, bytes]]:
    """(1-based line number, raw bytes without the line end) for each physical line."""
    for line_no, raw in enumerate(fh, start=1):
        if line_no == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM) :]
        yield line_no, raw.rstrip(b"\r\n")


def validate_batch_file(
    fh: IO[bytes],
    *,
    size: int,
    limits: Limits = Limits(),
    endpoint: str | None = None,
    sink: RowSink | None = None,
    sink_rows: int = 4096,
) -> ValidationReport:
    """Validate every line of ``fh``; hand valid rows to ``sink`` in groups of ``sink_rows``.

    ``endpoint`` is the batch's declared endpoint when it has one (the HTTP API); a file drop
    takes the URL of its first request. Rows are ``{line, custom_id, model, body}`` with the body
    re-serialized as compact JSON.
    """
    report = ValidationReport(bytes=size, endpoint=endpoint)
    if size > limits.max_bytes:
        report.add_error(
            "file_too_large",
            f"The batch input file is {size} bytes; the limit is {limits.max_bytes} bytes.",
        )
        return report
    digest = hashlib.sha256()
    seen: set[str] = set()
    rows: list[Row] = []
    for line_no, raw in iter_lines(_hashing(fh, digest)):
        if not raw.strip():
            continue
        if report.request_count >= limits.max_requests:
            # Said first, whatever else was found: it is why reading stopped.
            report.error_count += 1
            report.errors.insert(
                0,
                BatchErrorEntry(
                    code="too_many_requests",
                    message=f"The batch input file has more than {limits.max_requests} requests; "
                    f"reading stopped at line {line_no}.",
                    line=line_no,
                ),
            )
            del report.errors[MAX_REPORTED_ERRORS - 1 :]
            break
        report.request_count += 1
        report.lines_read += 1
        try:
            obj = strict_loads(raw)
        except JSONError as exc:
            if exc.kind == "utf8":
                report.add_error(
                    "invalid_utf8",
                    f"This line {exc.message.removeprefix('the text ')}.",
                    line=line_no,
                )
                continue
            report.add_error(
                "invalid_json_line",
                f"This line is not parseable as valid JSON: {exc.message}.",
                line=line_no,
                param=exc.path[:200] if exc.path else None,
            )
            continue
        error, url = _check_line(line_no, obj, report.endpoint)
        if report.endpoint is None and url is not None:
            report.endpoint = url
        if error is not None:
            report.keep(error)
            continue
        custom_id = obj["custom_id"]
        if custom_id in seen:
            report.add_error(
                "duplicate_custom_id",
                f"The custom_id {quote(custom_id)} is a duplicate of another request's custom_id.",
                line=line_no,
                param="custom_id",
            )
            continue
        seen.add(custom_id)
        model = obj["body"]["model"]
        report.models[model] += 1
        if sink is not None and report.ok:
            rows.append(
                {
                    "line": line_no,
                    "custom_id": custom_id,
                    "model": model,
                    "body": json.dumps(obj["body"], separators=(",", ":"), ensure_ascii=False),
                }
            )
            if len(rows) >= sink_rows:
                sink(rows)
                rows = []
    # Read what a break left, so the digest always covers the whole file.
    for _ in _hashing(fh, digest):
        pass
    report.sha256 = digest.hexdigest()
    if report.request_count == 0 and report.ok:
        report.add_error("empty_file", "The batch input file holds no requests.")
    if sink is not None and rows and report.ok:
        sink(rows)
    return report


def _hashing(fh: IO[bytes], digest: Any) -> Iterable[bytes]:
    for raw in fh:
        digest.update(raw)
        yield raw
