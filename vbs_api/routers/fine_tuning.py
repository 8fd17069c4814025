"""``/v1/fine_tuning/jobs``: OpenAI's fine-tuning jobs API, with the seed's deploy step. Every
body is read by strict JSON, every id and cursor is checked, and a GET only reads."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vbs_api.body import json_object
from vbs_api.errors import APIError
from vbs_api.state import state
from vbs_resources.training.jobs import deployment_object, event_object, job_object

router = APIRouter(prefix="/v1/fine_tuning/jobs")
EVENT_ID = re.compile(r"ftevent-([0-9]{1,18})")


def _page(rows: list[dict[str, Any]], limit: int, convert: Any) -> JSONResponse:
    data = [convert(r) for r in rows[:limit]]
    return JSONResponse({"object": "list", "data": data, "has_more": len(rows) > limit})


def _job(request: Request, job_id: str) -> dict[str, Any]:
    job = state(request).extras["fine_tuning"].get(job_id)
    deployments = state(request).catalog.deployments.of_job(job_id)
    return job_object(job, deployments[0] if deployments else None)


@router.post("")
async def create_job(request: Request) -> JSONResponse:
    body = await json_object(request)
    job = await run_in_threadpool(state(request).extras["fine_tuning"].create, body)
    return JSONResponse(job_object(job))


@router.get("")
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=100)] = None,
) -> JSONResponse:
    rows = await run_in_threadpool(state(request).catalog.fine_tuning.list, limit, after)
    return _page(rows, limit, job_object)


@router.get("/{job_id}")
async def retrieve_job(request: Request, job_id: str) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(_job, request, job_id))


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
        found = EVENT_ID.fullmatch(after)
        if found is None:
            raise APIError(400, f"{after[:40]!r} is not an event id (ftevent-N).", param="after")
        anchor = int(found.group(1))
    rows = await run_in_threadpool(vbs.catalog.fine_tuning.events, job_id, limit, anchor)
    return _page(rows, limit, event_object)


@router.post("/{job_id}/cancel")
async def cancel_job(request: Request, job_id: str) -> JSONResponse:
    job = await run_in_threadpool(state(request).extras["fine_tuning"].cancel, job_id)
    return JSONResponse(job_object(job))


@router.post("/{job_id}/deploy")
async def deploy_job(request: Request, job_id: str) -> JSONResponse:
    """Deploy a succeeded job's adapter (the seed's step): the deployment, ``queued`` while its
    run waits, then ``running``, ``succeeded`` or ``failed`` (``GET`` the job for its outcome).
    Deploying while a deployment of the job is in flight answers that deployment."""
    body = await json_object(request, empty_ok=True)
    unknown = sorted(set(body) - {"force"})
    if unknown:
        raise APIError(400, f"Unknown parameter: '{unknown[0][:64]}'.", param=unknown[0][:64])
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise APIError(400, "force must be a boolean.", param="force")
    service = state(request).extras["fine_tuning"]
    deployment = await run_in_threadpool(service.deploy, job_id, force)
    job = await run_in_threadpool(service.get, job_id)
    return JSONResponse(deployment_object(deployment, job))
