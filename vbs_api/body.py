"""Request bodies: every JSON body the API reads goes through the project's strict JSON, and a
body that is not what the route takes is a 400 naming the first field at fault."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from vbs_api.errors import APIError
from vbs_resources.strict_json import JSONError
from vbs_resources.strict_json import loads as strict_loads

Model = TypeVar("Model", bound=BaseModel)


async def json_body(request: Request) -> object:
    """The request's JSON, parsed strictly (the body is already capped by ``BodyLimit``)."""
    try:
        return strict_loads(await request.body())
    except JSONError as exc:
        raise APIError(
            400,
            f"The request body is not valid JSON: {exc.message}.",
            code="invalid_json",
            param=exc.path[:80] if exc.path else None,
        ) from None


async def json_object(request: Request, empty_ok: bool = False) -> dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body when ``empty_ok``)."""
    if empty_ok and not (await request.body()).strip():
        return {}
    body = await json_body(request)
    if not isinstance(body, dict):
        raise APIError(
            400, f"The request body must be a JSON object, not {_kind(body)}.", code="invalid_json"
        )
    return body


def _kind(value: object) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def validated(model: type[Model], body: object) -> Model:
    """``body`` as ``model``; a 400 naming the first field at fault otherwise."""
    if not isinstance(body, dict):
        raise APIError(
            400, f"The request body must be a JSON object, not {_kind(body)}.", code="invalid_json"
        )
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])[:80] or None
        raise APIError(
            400, f"Invalid value for '{param}': {first['msg'][:200]}", param=param
        ) from None


async def json_model(request: Request, model: type[Model]) -> Model:
    """The request's JSON as ``model``; a 400 naming the first field at fault otherwise."""
    return validated(model, await json_body(request))
