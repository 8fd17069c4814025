"""``/v1/files``: upload, list, retrieve, content, delete, as OpenAI's Files API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from vbs_api.errors import APIError
from vbs_api.routers import list_page
from vbs_api.state import state
from vbs_api.upload import receive_upload
from vbs_resources import layout as L
from vbs_resources.catalog import file_object

router = APIRouter(prefix="/v1/files")
# batch: a batch's input. user_data: anything else a client keeps with the platform, such as the
# records a conquest batch's prompts were made from (vbs conquests submit). fine-tune: training
# data in OpenAI's chat format, checked line by line when a fine-tuning job names it.
PURPOSES = ("batch", "user_data", "fine-tune")
BLOCK = 1 << 20


@router.post("")
async def upload_file(request: Request) -> JSONResponse:
    vbs = state(request)
    file_id = L.new_file_id()
    upload = await receive_upload(
        request.stream(),
        request.headers.get("content-type", ""),
        vbs.bucket,
        L.uploaded_file(file_id),
        vbs.settings.max_upload_bytes,
    )
    staged = upload.staged
    try:
        purpose = upload.fields.get("purpose")
        if staged is None:
            raise APIError(400, "Missing required parameter: 'file'.", param="file")
        if purpose not in PURPOSES:
            raise APIError(
                400, f"purpose must be one of {', '.join(map(repr, PURPOSES))}.", param="purpose"
            )
        if purpose == "batch" and not (upload.filename or "").lower().endswith(".jsonl"):
            raise APIError(400, "Batch files must be .jsonl files.", param="file")
        sha256 = await run_in_threadpool(staged.commit)
    except BaseException:
        if staged is not None:
            staged.abort()
        raise
    created = await run_in_threadpool(
        vbs.service.register_upload, file_id, upload.filename, purpose, staged.size, sha256
    )
    return JSONResponse(created.model_dump())


@router.get("")
async def list_files(
    request: Request,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    vbs = state(request)
    rows = vbs.catalog.files.list(purpose, limit + 1, after, order, conn=vbs.reads)
    return list_page(rows, limit, file_object)


@router.get("/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
    vbs = state(request)
    row = vbs.catalog.files.get(file_id, vbs.reads)
    if row is None:
        raise APIError(404, f"No such File object: {file_id[:100]}", param="id")
    return JSONResponse(file_object(row).model_dump())


@router.get("/{file_id}/content")
def file_content(request: Request, file_id: str) -> StreamingResponse:
    vbs = state(request)
    row = vbs.service.file_row(file_id)

    def blocks() -> Any:
        with vbs.bucket.open(row["path"], "rb") as fh:
            while block := fh.read(BLOCK):
                yield block

    if not vbs.bucket.exists(row["path"]):
        raise APIError(404, f"The content of {file_id} is gone.", param="id")
    return StreamingResponse(blocks(), media_type="application/octet-stream")


@router.delete("/{file_id}")
def delete_file(request: Request, file_id: str) -> dict[str, Any]:
    return state(request).service.delete_file(file_id)
