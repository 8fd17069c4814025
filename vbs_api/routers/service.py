"""Service routes: ``/v1/inbox`` (vbs), ``/health`` and ``/metrics``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from vbs_api.state import state
from vbs_resources import strict_json
from vbs_resources.wire import BATCH_STATUSES

router = APIRouter()


@router.get("/v1/inbox")
async def inbox(request: Request) -> dict[str, Any]:
    """What the inbox sensor could not take, and why (a vbs extension)."""
    vbs = state(request)
    problems = vbs.catalog.inbox.problems(vbs.reads)
    data = [
        {
            "name": p["name"],
            "kind": p["kind"],
            "message": p["message"],
            "first_seen": int(p["first_seen"]),
            "last_seen": int(p["last_seen"]),
        }
        for p in problems
    ]
    return {"object": "list", "data": data}


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """200 while the API and its catalog answer. Under `vbs serve`, also the platform's
    processes as its supervisor last wrote them: ``degraded`` while one is being restarted."""
    vbs = state(request)
    vbs.catalog.batches.get("batch_healthcheck", vbs.reads)  # the catalog answers
    answer: dict[str, Any] = {"status": "ok"}
    try:
        supervised = strict_json.loads((vbs.settings.home / "serve-status.json").read_bytes())
    except (OSError, ValueError):
        return answer  # not under `vbs serve`, or it is starting
    processes = supervised.get("processes") or {}
    answer["processes"] = processes
    if any(p.get("state") != "running" for p in processes.values()):
        answer["status"] = "degraded"
    return answer


@router.get("/metrics")
def metrics(request: Request) -> PlainTextResponse:
    vbs = state(request)
    gauges = vbs.extras["gauges"]
    counts = vbs.catalog.batches.count_by_status()
    # Every status, every time: a status no batch is in any more reads 0, not its last value.
    for status in BATCH_STATUSES:
        gauges["batches"].labels(status).set(counts.get(status, 0))
    gauges["queue"].set(sum(counts.get(s, 0) for s in ("validating", "in_progress", "finalizing")))
    totals = vbs.catalog.batches.totals()
    gauges["requests"].labels("completed").set(totals["requests_completed"])
    gauges["requests"].labels("failed").set(totals["requests_failed"])
    gauges["tokens"].labels("input").set(totals["input_tokens"])
    gauges["tokens"].labels("output").set(totals["output_tokens"])
    return PlainTextResponse(
        generate_latest(vbs.extras["registry"]), media_type=CONTENT_TYPE_LATEST
    )
