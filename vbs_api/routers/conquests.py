"""``/v1/conquests``: list, retrieve and annotate conquests (the seed's Conquest API), with the
Batch API's auth. Annotations made here and in Label Studio land in the same place; the newest
edit wins and the ones it replaces are kept in ``annotation_history``."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from vbs_api.body import json_model, json_object
from vbs_api.errors import APIError
from vbs_api.routers import list_page
from vbs_api.state import state
from vbs_resources.curation.annotations import AnnotateBody, AnnotationError, from_api
from vbs_resources.curation.lifecycle import MAX_REASON, ConquestLifecycle, ConquestRefused
from vbs_resources.wire import AnnotationObject, ConquestChange, ConquestObject

router = APIRouter(prefix="/v1/conquests")


def _annotation(values: dict[str, Any], prefix: str = "") -> AnnotationObject | None:
    if values.get(f"{prefix}source") is None:
        return None
    return AnnotationObject(
        isGoldStar=values.get(f"{prefix}is_gold_star"),
        rating=values.get(f"{prefix}rating"),
        feedback=values.get(f"{prefix}feedback"),
        improvementNotes=values.get(f"{prefix}improvement_notes"),
        answers=values.get(f"{prefix}answers") or {},
        source=values.get(f"{prefix}source"),
        edited_at=values.get(f"{prefix}edited_at"),
    )


def conquest_object(row: dict[str, Any], **extra: Any) -> ConquestObject:
    fields = {k: row[k] for k in ConquestObject.model_fields if k in row}
    return ConquestObject(**fields, annotation=_annotation(row, prefix="annotation_"), **extra)


def _one(request: Request, conquest_id: str) -> ConquestObject:
    catalog = state(request).catalog
    row = catalog.conquests.get(conquest_id)
    if row is None:
        raise APIError(404, f"No such conquest: {conquest_id[:100]}", param="conquest_id")
    current = catalog.conquests.annotation_of(conquest_id) or {}
    history = [_annotation(h) for h in catalog.conquests.annotation_history_of(conquest_id)]
    changes = [ConquestChange(**h) for h in catalog.conquests.history_of(conquest_id)]
    return ConquestObject(
        **{k: row[k] for k in ConquestObject.model_fields if k in row},
        annotation=_annotation(current),
        annotation_history=[h for h in history if h is not None],
        history=changes,
    )


def _lifecycle(request: Request) -> ConquestLifecycle:
    vbs = state(request)
    return ConquestLifecycle(vbs.catalog, vbs.settings.gold_min_rating)


def _refused(exc: ConquestRefused) -> APIError:
    return APIError(exc.status, exc.message, param=exc.field)


@router.get("")
async def list_conquests(
    request: Request,
    type: Annotated[str | None, Query(max_length=64)] = None,
    status: Literal["PENDING", "IN_PROGRESS", "COMPLETED", "FAILED"] | None = None,
    result: Literal["VICTORY", "DEFEAT"] | None = None,
    gold: bool | None = None,
    min_rating: Annotated[int | None, Query(ge=1, le=5)] = None,
    excluded: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=100)] = None,
) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.conquests.list(
        type_id=type, status=status, result=result, gold=gold, min_rating=min_rating,
        excluded=excluded, limit=limit, after=after, conn=vbs.reads,
    )  # fmt: skip
    return list_page(rows, limit, conquest_object)


@router.get("/{conquest_id}")
async def retrieve_conquest(request: Request, conquest_id: str) -> JSONResponse:
    found = await run_in_threadpool(_one, request, conquest_id)
    return JSONResponse(found.model_dump())


@router.post("/{conquest_id}/annotate")
async def annotate_conquest(request: Request, conquest_id: str) -> JSONResponse:
    body = await json_model(request, AnnotateBody)
    vbs = state(request)

    def annotate() -> ConquestObject:
        row = vbs.catalog.conquests.get(conquest_id)
        if row is None:
            raise APIError(404, f"No such conquest: {conquest_id[:100]}", param="conquest_id")
        try:
            conquest_type = vbs.service.conquest_types.registry().get(row["type"])
        except KeyError:
            raise APIError(
                409, f"The conquest's type {row['type']!r} is no longer known.", param="type"
            ) from None
        try:
            values = from_api(conquest_type, body, time.time())
            _lifecycle(request).annotate(conquest_id, values, "api")
        except AnnotationError as exc:
            raise APIError(400, str(exc), param=exc.field) from None
        except ConquestRefused as exc:
            raise _refused(exc) from None
        return _one(request, conquest_id)

    return JSONResponse((await run_in_threadpool(annotate)).model_dump())


class ExcludeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=MAX_REASON, pattern=r"\S")


@router.post("/{conquest_id}/exclude")
async def exclude_conquest(request: Request, conquest_id: str) -> JSONResponse:
    """Keep a conquest out of every dataset and of Label Studio, with the reason in its
    history (an operator's call: a leaked secret, a forged record, a bad label)."""
    body = await json_model(request, ExcludeBody)

    def exclude() -> ConquestObject:
        try:
            _lifecycle(request).exclude(conquest_id, body.reason, "api")
        except ConquestRefused as exc:
            raise _refused(exc) from None
        return _one(request, conquest_id)

    return JSONResponse((await run_in_threadpool(exclude)).model_dump())


@router.post("/{conquest_id}/include")
async def include_conquest(request: Request, conquest_id: str) -> JSONResponse:
    """Take an excluded conquest back."""
    await json_object(request, empty_ok=True)

    def include() -> ConquestObject:
        try:
            _lifecycle(request).include(conquest_id, "api")
        except ConquestRefused as exc:
            raise _refused(exc) from None
        return _one(request, conquest_id)

    return JSONResponse((await run_in_threadpool(include)).model_dump())
