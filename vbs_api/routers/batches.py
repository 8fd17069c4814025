"""``/v1/batches``: create, retrieve, list, cancel, as OpenAI's Batch API."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from vbs_api.body import json_model
from vbs_api.errors import APIError
from vbs_api.routers import list_page
from vbs_api.state import state
from vbs_resources.catalog import batch_object
from vbs_resources.wire import CreateBatchRequest

router = APIRouter(prefix="/v1/batches")
Model = TypeVar("Model", bound=BaseModel)


@router.post("")
async def create_batch(request: Request) -> JSONResponse:
    create = await json_model(request, CreateBatchRequest)
    caller = request.scope.get("state", {}).get("caller")
    created = await run_in_threadpool(state(request).service.create_batch, create, caller)
    return JSONResponse(created.model_dump())


class PollCache:
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


async def retrieve_batch(request: Request) -> Response:
    vbs = state(request)
    batch_id = request.path_params["batch_id"]
    polled: PollCache = vbs.extras["poll_cache"]
    body = polled.get(batch_id, vbs.catalog.change_counter(vbs.reads))
    if body is None:
        row = vbs.catalog.batches.get(batch_id, vbs.reads)
        if row is None:
            raise APIError(404, f"No such Batch object: {batch_id[:100]}", param="id")
        body = polled.put(batch_id, batch_object(row).model_dump_json().encode())
    return Response(body, media_type="application/json")


# The route clients poll: a plain Starlette route matched before all others, answered from the
# cache while the catalog is unchanged (under bench/api.py's load this takes the server from
# 0.5 ms of CPU per retrieve to 0.2 ms).
retrieve_route = Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"])


@router.get("")
async def list_batches(
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.batches.list(limit=limit + 1, after=after, conn=vbs.reads)
    return list_page(rows, limit, batch_object)


@router.post("/{batch_id}/cancel")
def cancel_batch(request: Request, batch_id: str) -> JSONResponse:
    return JSONResponse(state(request).service.cancel_batch(batch_id).model_dump())
