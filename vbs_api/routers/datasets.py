"""``/v1/datasets``: curated dataset versions (built by ``curated_dataset``), the latest build
first, with the Batch API's auth."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from vbs_api.errors import APIError
from vbs_api.routers import list_page
from vbs_api.state import state
from vbs_resources import layout as L
from vbs_resources.wire import DatasetCounts, DatasetObject

router = APIRouter(prefix="/v1/datasets")


def dataset_object(row: dict[str, Any], with_conquests: bool = False) -> DatasetObject:
    version = row["version"]
    return DatasetObject(
        id=version,
        type=row["type"],
        type_version=row["type_version"],
        created_at=row["created_at"],
        built_at=row["built_at"],
        counts=DatasetCounts(
            train=row["train_count"], eval=row["eval_count"], icl=row["icl_count"]
        ),
        files={
            name.split(".")[0]: L.dataset_file(version, name)
            for name in (L.TRAIN, L.EVAL, L.ICL, L.DATASET_MANIFEST)
        },
        options=row["options"] or {},
        run_id=row["run_id"],
        conquest_ids=row["conquest_ids"] if with_conquests else None,
    )


@router.get("")
async def list_datasets(
    request: Request,
    type: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    after: Annotated[str | None, Query(max_length=100)] = None,
) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.datasets.list(type_id=type, limit=limit, after=after, conn=vbs.reads)
    return list_page(rows, limit, dataset_object)


@router.get("/{version}")
async def retrieve_dataset(request: Request, version: str) -> JSONResponse:
    vbs = state(request)
    row = vbs.catalog.datasets.get(version, vbs.reads) if L.is_dataset_version(version) else None
    if row is None:
        raise APIError(404, f"No such dataset version: {version[:100]}", param="version")
    return JSONResponse(dataset_object(row, with_conquests=True).model_dump())
