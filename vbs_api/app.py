"""The OpenAI-compatible Batch API over the Dagster pipeline.

``files`` and ``batches`` behave as OpenAI's, so the official ``openai`` client works unchanged.
Creating a batch hands its file to the same path as a file drop: the file and its sidecar go
where the inbox sensor puts them and the API launches the batch's run through Dagster at once
(``vbs_api.launch``), or, while Dagster cannot be reached, they go into the inbox (sidecar
first, file by atomic rename) for the sensor. The catalog is the shared state between this
process, the sensor and the runs; nothing here talks to vLLM.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import BackgroundTasks, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vbs_api.launch import BatchLauncher, LaunchFailed, LaunchUnavailable
from vbs_assets.schemas import ENDPOINTS, BatchErrorEntry, BatchOptions
from vbs_resources import Bucket, Catalog, InferenceEngine, batch_file
from vbs_resources.catalog import TERMINAL_STATUSES
from vbs_resources.webhooks import Webhooks

UPLOAD_BLOCK = 1 << 20
log = logging.getLogger("vbs.api")


class APIError(Exception):
    """An error answered in OpenAI's shape ``{"error": {message, type, param, code}}``."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "invalid_request_error" if self.status < 500 else "server_error"


def _error_response(status: int, message: str, kind: str, code: Any, param: Any) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class CreateBatch(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = Field(default=None)
    # vbs extension (the openai client sends it with extra_body): requests per checkpoint.
    chunk_size: int | None = Field(default=None, ge=1, le=50_000)


class _PollCache:
    """Encoded batch objects, valid while the catalog's change counter stands still: any commit
    (a run's progress, a cancel, a new batch) moves it and empties the cache, so a poll never
    sees an older state than a read would. With no counter (not SQLite) nothing is kept."""

    MAX_ENTRIES = 10_000

    def __init__(self) -> None:
        self.version: int | None = None
        self.bodies: dict[str, bytes] = {}

    def get(self, key: str, version: int | None) -> bytes | None:
        if version is None or version != self.version or len(self.bodies) > self.MAX_ENTRIES:
            self.version = version
            self.bodies.clear()
            return None
        return self.bodies.get(key)

    def put(self, key: str, body: bytes) -> bytes:
        if self.version is not None:
            self.bodies[key] = body
        return body


class _BearerAuth:
    """Every ``/v1/`` request needs ``Authorization: Bearer <key>`` with one of ``keys``; no keys
    means no check. A plain ASGI middleware, so a refused request costs no routing."""

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys and scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            # Compare against every key, always, so timing says nothing about which matched.
            matched = False
            for key in self.keys:
                matched |= hmac.compare_digest(token.strip().encode(), key)
            if scheme.lower() != "bearer" or not matched:
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                response = _error_response(401, error.message, error.type, error.code, None)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _LatencyMiddleware:
    """Observes each request's latency by route template (a plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` costs more per request than the handlers it would time)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route).observe(time.perf_counter() - started)


def create_app(
    bucket: Bucket,
    catalog: Catalog,
    engine: InferenceEngine,
    api_keys: list[str],
    max_upload_bytes: int = 200 * 1024 * 1024,
    launcher: BatchLauncher | None = None,
    webhooks: Webhooks | None = None,
) -> FastAPI:
    """The FastAPI app; ``api_keys`` empty means no authentication (loopback-only default).

    With a ``launcher`` a created batch's run is launched at once; without one, or while the
    webserver is unreachable, the batch goes through the inbox and its sensor."""
    app = FastAPI(title="vbs", version="0.1.0")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(
            exc.status_code, str(exc.detail), "invalid_request_error", None, None
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return _error_response(
            400, f"Invalid value for '{param}': {first['msg']}", "invalid_request_error",
            "invalid_request", param or None,
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, "The server had an error.", "server_error", None, None)

    app.add_middleware(_BearerAuth, keys=[k.encode() for k in api_keys if k])

    # The event loop's own catalog connection, for the async reads below.
    loop_reads = catalog.read_connection()

    def get_file_row(file_id: str, conn: sa.Connection | None = None) -> dict[str, Any]:
        row = catalog.get_file(file_id, conn)
        if row is None:
            raise APIError(404, f"No such File object: {file_id}", param="id")
        return row

    def get_batch_row(batch_id: str, conn: sa.Connection | None = None) -> dict[str, Any]:
        row = catalog.get_batch(batch_id, conn)
        if row is None:
            raise APIError(404, f"No such Batch object: {batch_id}", param="id")
        return row

    # Reads (GETs answered from the catalog) are ``async`` and query it on the event loop: a
    # point read from SQLite in WAL mode takes about 0.1 ms and never waits for a writer, while
    # a hop to a worker thread costs more than the read (2.6 ms of server CPU per retrieve
    # against 0.4 ms under bench/api.py's load). Writes, which may wait on a lock, stay in
    # threads.

    # ---- files -------------------------------------------------------------------------

    @app.post("/v1/files")
    async def upload_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        if purpose != "batch":
            raise APIError(400, "Only purpose 'batch' is supported.", param="purpose")
        filename = (file.filename or "upload.jsonl").rsplit("/", 1)[-1][:255]
        if not filename.endswith(".jsonl"):
            raise APIError(400, "Batch files must be .jsonl files.", param="file")
        file_id = f"file-{uuid.uuid4().hex}"
        path = f"files/{file_id}.jsonl"
        size = 0
        with bucket.atomic_writer(path) as out:
            while block := await file.read(UPLOAD_BLOCK):
                size += len(block)
                if size > max_upload_bytes:
                    raise APIError(
                        413,
                        f"File is larger than the {max_upload_bytes}-byte limit.",
                        code="file_too_large",
                        param="file",
                    )
                out.write(block)
        row = catalog.create_file(file_id, filename=filename, purpose=purpose, size=size, path=path)
        return Catalog.to_openai_file(row)

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None) -> JSONResponse:
        data = [Catalog.to_openai_file(r) for r in catalog.list_files(purpose, conn=loop_reads)]
        return JSONResponse({"object": "list", "data": data, "has_more": False})

    @app.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> JSONResponse:
        return JSONResponse(Catalog.to_openai_file(get_file_row(file_id, loop_reads)))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> StreamingResponse:
        row = get_file_row(file_id)

        def blocks() -> Any:
            with bucket.open(row["path"], "rb") as fh:
                while block := fh.read(UPLOAD_BLOCK):
                    yield block

        return StreamingResponse(blocks(), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        get_file_row(file_id)
        catalog.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches -----------------------------------------------------------------------

    @app.post("/v1/batches")
    def create_batch(request: CreateBatch, background: BackgroundTasks) -> dict[str, Any]:
        if request.endpoint not in ENDPOINTS:
            raise APIError(
                400, f"Unsupported endpoint; use one of {', '.join(ENDPOINTS)}.", param="endpoint"
            )
        if request.completion_window != "24h":
            raise APIError(400, "completion_window must be '24h'.", param="completion_window")
        source = get_file_row(request.input_file_id)
        batch_id = f"batch_{uuid.uuid4().hex}"
        try:
            options = BatchOptions(
                metadata=request.metadata or {},
                batch_id=batch_id,
                input_file_id=request.input_file_id,
                chunk_size=request.chunk_size,
            )
        except ValidationError as exc:
            raise APIError(400, exc.errors()[0]["msg"], param="metadata") from None
        catalog.create_batch(
            batch_id,
            source="api",
            content_sha256="",
            original_filename=source["filename"],
            metadata=options.metadata,
            input_file_id=request.input_file_id,
        )
        catalog.update_batch(batch_id, endpoint=request.endpoint)
        if launcher is None or not launch_direct(batch_id, options, source, background):
            # Sidecar first, then the file by rename: the sensor never sees it without options.
            bucket.write_bytes(
                f"inbox/{batch_id}.metadata.json", options.model_dump_json().encode()
            )
            bucket.copy(source["path"], f"inbox/{batch_id}.jsonl")
        return Catalog.to_openai_batch(get_batch_row(batch_id))

    def launch_direct(
        batch_id: str, options: BatchOptions, source: dict[str, Any], background: BackgroundTasks
    ) -> bool:
        """Puts the batch where the sensor would have, then launches its run; False when the
        webserver is unreachable, so the caller hands the batch to the inbox instead."""
        assert launcher is not None
        bucket.write_bytes(batch_file(batch_id, "sidecar.json"), options.model_dump_json().encode())
        bucket.copy(source["path"], batch_file(batch_id, "input.jsonl"))
        try:
            run_id = launcher.launch(batch_id, options, source["filename"])
        except LaunchUnavailable as exc:
            log.warning(f"{batch_id}: Dagster is unreachable ({exc}); handing it to the inbox")
            bucket.remove_tree(batch_file(batch_id, ""))
            return False
        except LaunchFailed as exc:
            catalog.update_batch(
                batch_id,
                "failed",
                errors=[BatchErrorEntry(code="launch_failed", message=str(exc)[:500]).model_dump()],
            )
            if webhooks is not None:  # after the response: deliveries retry with backoff
                background.add_task(webhooks.batch_event, catalog, batch_id, "failed")
            return True
        log.info(f"{batch_id}: run {run_id} queued")
        return True

    polled = _PollCache()

    async def retrieve_batch(request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        body = polled.get(batch_id, catalog.change_counter(loop_reads))
        if body is None:
            body = polled.put(
                batch_id,
                JSONResponse(Catalog.to_openai_batch(get_batch_row(batch_id, loop_reads))).body,
            )
        return Response(body, media_type="application/json")

    # The route clients poll, so a plain Starlette route matched before all others, answered
    # from the cache while the catalog is unchanged. Under bench/api.py's load this takes the
    # server from 0.5 ms of CPU per retrieve (FastAPI route, catalog read, encoding) to 0.2 ms.
    app.router.routes.insert(0, Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]))

    @app.get("/v1/batches")
    async def list_batches(
        after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
    ) -> JSONResponse:
        rows = catalog.list_batches(limit=limit + 1, after=after, conn=loop_reads)
        page = [Catalog.to_openai_batch(r) for r in rows[:limit]]
        return JSONResponse(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(rows) > limit,
            }
        )

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        row = get_batch_row(batch_id)
        if row["status"] in TERMINAL_STATUSES:
            raise APIError(400, f"Cannot cancel a batch that is {row['status']}.", param="batch_id")
        if row["status"] != "cancelling":
            catalog.update_batch(batch_id, "cancelling")
        return Catalog.to_openai_batch(get_batch_row(batch_id))

    # ---- service -----------------------------------------------------------------------

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        names = {name for endpoint in ENDPOINTS for name in engine.served_models(endpoint)}
        data = [
            {"id": name, "object": "model", "created": int(time.time()), "owned_by": "vbs"}
            for name in sorted(names)
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, str]:
        catalog.count_batches_by_status()  # the catalog answers
        return {"status": "ok"}

    registry = CollectorRegistry()
    latency = Histogram(
        "vbs_api_request_seconds",
        "API request latency by route.",
        ["method", "route"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    )
    batches_gauge = Gauge("vbs_batches", "Batches by OpenAI status.", ["status"], registry=registry)
    queue_gauge = Gauge(
        "vbs_queue_depth", "Batches validating, running or finalizing.", registry=registry
    )
    requests_gauge = Gauge(
        "vbs_requests_processed", "Requests processed.", ["outcome"], registry=registry
    )
    tokens_gauge = Gauge("vbs_tokens_processed", "Tokens processed.", ["kind"], registry=registry)

    app.add_middleware(_LatencyMiddleware, histogram=latency)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        counts = catalog.count_batches_by_status()
        for status in sorted(set(counts) | {"validating", "in_progress", "completed", "failed"}):
            batches_gauge.labels(status).set(counts.get(status, 0))
        queue_gauge.set(sum(counts.get(s, 0) for s in ("validating", "in_progress", "finalizing")))
        totals = catalog.totals()
        requests_gauge.labels("completed").set(totals["requests_completed"])
        requests_gauge.labels("failed").set(totals["requests_failed"])
        tokens_gauge.labels("input").set(totals["input_tokens"])
        tokens_gauge.labels("output").set(totals["output_tokens"])
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
