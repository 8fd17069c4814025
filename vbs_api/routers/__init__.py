"""One router per API resource; each reads what it needs from ``request.app.state.vbs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel


def list_page(
    rows: list[dict[str, Any]], limit: int, convert: Callable[[dict], BaseModel]
) -> JSONResponse:
    """OpenAI's list envelope for ``rows``, fetched one past ``limit`` to tell ``has_more``."""
    page = [convert(r).model_dump() for r in rows[:limit]]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(rows) > limit,
        }
    )
