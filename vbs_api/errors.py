"""Errors in OpenAI's shape, ``{"error": {message, type, param, code}}``, for every failure,
including the ones FastAPI and Starlette raise themselves. A 500 says nothing about why: the
reason is in the server's log, never in a response."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vbs_resources.catalog import UnknownCursor
from vbs_resources.wire import ErrorBody, ErrorDetail

log = logging.getLogger("vbs.api")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        if self.status == 429:
            return "requests"  # OpenAI's type for a request rate limit
        return "invalid_request_error" if self.status < 500 else "server_error"

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, self.type, self.code, self.param, self.headers
        )


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str | None,
    param: str | None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Answer every error of ``app`` in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UnknownCursor)
    async def _unknown_cursor(_: Request, exc: UnknownCursor) -> JSONResponse:
        return error_response(400, exc.message, "invalid_request_error", None, "after")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", None, None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return error_response(
            400, f"Invalid value for '{param[:80]}': {first['msg'][:200]}",
            "invalid_request_error", "invalid_request", param[:80] or None,
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, "The server had an error.", "server_error", None, None)
