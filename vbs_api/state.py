"""What the routers share: resources, the batch service, and the event loop's read connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from fastapi import Request

from vbs_api.service import BatchService
from vbs_resources import Bucket, Catalog, InferenceEngine, Settings


@dataclass
class APIState:
    settings: Settings
    bucket: Bucket
    catalog: Catalog
    engine: InferenceEngine
    service: BatchService
    # Reads (GETs answered from the catalog) are ``async`` and query it on the event loop through
    # this connection: a point read from SQLite in WAL mode takes about 0.1 ms and never waits
    # for a writer, while a hop to a worker thread costs more than the read. Every write, which
    # may wait on a lock, runs in a worker thread.
    reads: sa.Connection
    extras: dict[str, Any]


def state(request: Request) -> APIState:
    return request.app.state.vbs
