"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning jobs API, with the seed's deploy step."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vbs_api.errors import APIError
from vbs_api.state import state
from vbs_resources.training.jobs import event_object, job_object

router = APIRouter(prefix="/v1/fine_tuning/jobs")


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def _page(rows: list[dict[str, Any]], limit: int, convert: Any) -> JSONResponse:
    data = [convert(r) for r in rows[:limit]]
    return JSONResponse({"object": "list", "data": data, "has_more": len(rows) > limit})


@router.post("")
async def create_job(request: Request) -> JSONResponse:
    body = await _body(request)
    job = await run_in_threadpool(state(request).extras["fine_tuning"].create, body)
    return JSONResponse(job_object(job))


@router.get("")
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=100)] = None,
) -> JSONResponse:
    rows = await run_in_threadpool(state(request).catalog.list_fine_tuning_jobs, limit, after)
    return _page(rows, limit, job_object)


@router.get("/{job_id}")
async def retrieve_job(request: Request, job_id: str) -> JSONResponse:
    job = await run_in_threadpool(state(request).extras["fine_tuning"].get, job_id)
    return JSONResponse(job_object(job))


@router.get("/{job_id}/events")
async def list_events(
    request: Request,
    job_id: str,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=40)] = None,
) -> JSONResponse:
    vbs = state(request)
    await run_in_threadpool(vbs.extras["fine_tuning"].get, job_id)
    anchor = None
    if after is not None:
        number = after.removeprefix("ftevent-")
        if not number.isdigit():
            raise APIError(400, f"{after[:40]} is not an event id.", param="after")
        anchor = int(number)
    rows = await run_in_threadpool(vbs.catalog.list_fine_tuning_events, job_id, limit, anchor)
    return _page(rows, limit, event_object)


@router.post("/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    job = await run_in_threadpool(state(request).extras["fine_tuning"].cancel, job_id)
    return JSONResponse(job_object(job))


@router.post("/{job_id}/deploy")
async def deploy_job(request: Request, job_id: str) -> JSONResponse:
    raw = await request.body()
    body = await _body(request) if raw.strip() else {}
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise APIError(400, "force must be a boolean.", param="force")
    found = await run_in_threadpool(state(request).extras["fine_tuning"].deploy, job_id, force)
    return JSONResponse(
        {
            "object": "fine_tuning.job.deployment",
            "job": job_object(found["job"]),
            "model": found["model"],
            "run_id": found["run_id"],
            "force": force,
            "status": "queued",
        }
    )
