"""``/v1/models``: the registry's available models, in OpenAI's shape with vLLM's ``root`` and
``parent`` (an adapter's base)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from vbs_api.errors import APIError
from vbs_api.state import state
from vbs_resources.lineage import LineageError, model_lineage
from vbs_resources.wire import ModelObject

router = APIRouter(prefix="/v1/models")


def model_object(row: dict[str, Any]) -> ModelObject:
    return ModelObject(
        id=row["name"], created=row["created_at"], root=row["path"], parent=row["base"]
    )


@router.get("")
async def list_models(request: Request) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.models.list(conn=vbs.reads)
    # What this engine serves: a remote model (trained elsewhere) is in its lineage alone.
    data = [model_object(r).model_dump() for r in rows if r["kind"] != "remote"]
    return JSONResponse({"object": "list", "data": data})


# Before the model route: a model's name may hold "/", and that route takes the rest of the path.
@router.get("/{model_id:path}/lineage")
def retrieve_lineage(request: Request, model_id: str) -> JSONResponse:
    """Model -> adapter -> dataset version -> conquests -> batches -> input files (sha256)."""
    try:
        chain = model_lineage(state(request).catalog, model_id)
    except LineageError as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from None
    return JSONResponse({"object": "model.lineage", **chain})


@router.get("/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> JSONResponse:
    vbs = state(request)
    row = vbs.catalog.models.get(model_id, vbs.reads)
    if row is not None and row["kind"] == "remote":
        raise APIError(
            404,
            f"The model {model_id[:100]!r} was trained and is served at {row['path']}, not "
            "here; its lineage is at /v1/models/<name>/lineage.",
            code="model_not_found",
            param="model",
        )
    if row is None or row["status"] != "available":
        raise APIError(
            404,
            f"The model {model_id[:100]!r} does not exist.",
            code="model_not_found",
            param="model",
        )
    return JSONResponse(model_object(row).model_dump())
