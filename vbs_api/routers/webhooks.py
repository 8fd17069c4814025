"""``/v1/webhooks/events`` (vbs): the outbox's webhook events, which are pending, delivered or
given up, and sending one again by hand."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from vbs_api.body import json_object
from vbs_api.errors import APIError
from vbs_api.state import state

router = APIRouter(prefix="/v1/webhooks/events")


def event_object(row: dict[str, Any]) -> dict[str, Any]:
    status = "delivered" if row["delivered_at"] else "given_up" if row["gave_up_at"] else "pending"
    return {
        "id": row["id"],
        "object": "webhook.event",
        "type": row["type"],
        "subject_id": row["subject_id"],
        "created_at": row["created_at"],
        "status": status,
        "rounds": row["attempts"],
        "next_attempt_at": row["next_attempt_at"] if status == "pending" else None,
        "last_error": row["last_error"],
        "delivered_at": row["delivered_at"],
        "gave_up_at": row["gave_up_at"],
    }


@router.get("")
async def list_events(
    request: Request,
    status: Literal["pending", "delivered", "given_up"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=100)] = None,
) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.events.listing(status, limit, after, conn=vbs.reads)
    data = [event_object(r) for r in rows[:limit]]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(rows) > limit,
        }
    )


@router.post("/{event_id}/redeliver")
async def redeliver(request: Request, event_id: str) -> JSONResponse:
    """An event that was given up, or is still pending, is due again now with a new retry
    window; a delivered one is left as it is (409)."""
    await json_object(request, empty_ok=True)
    catalog = state(request).catalog
    row = await run_in_threadpool(catalog.events.get, event_id)
    if row is None:
        raise APIError(404, f"No such event: {event_id[:100]}", param="id")
    if row["delivered_at"]:
        raise APIError(409, f"{event_id} was delivered already.", param="id")
    again = await run_in_threadpool(catalog.events.redeliver, event_id)
    return JSONResponse(event_object(again))
