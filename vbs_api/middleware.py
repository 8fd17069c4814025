"""Plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs more per request than the
handlers it would wrap): API keys, request body limits, request latency."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from prometheus_client import Histogram
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vbs_api.errors import APIError


class BearerAuth:
    """Every request but ``OPEN_PATHS`` (the API, its OpenAPI schema and docs included) needs
    ``Authorization: Bearer <key>`` with one of ``keys``; no keys means no check (loopback only,
    see ``vbs_api.app``)."""

    # What a load balancer and a scraper poll: no data in either.
    OPEN_PATHS = ("/health", "/metrics")

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app, self.keys = app, keys
        self.callers = [caller_id(key) for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        caller = ANONYMOUS
        if self.keys:
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            # Compare against every key, always, so timing says nothing about which matched.
            matched = None
            for key, who in zip(self.keys, self.callers, strict=True):
                if hmac.compare_digest(token.strip().encode(), key):
                    matched = who
            if scheme.lower() != "bearer" or matched is None:
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
            caller = matched
        # Who is asking, for the rate limits and the batches in flight (request.state.caller).
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


ANONYMOUS = "anonymous"


def caller_id(key: bytes) -> str:
    """An API key's name in limits and records: a hash, never the key."""
    return "key-" + hashlib.sha256(key).hexdigest()[:16]


class RateLimit:
    """At most ``rates`` requests per caller (each API key; one shared budget without keys),
    counted over a moving window in this process; over it, 429 ``rate_limit_exceeded`` with
    ``Retry-After`` in seconds, as OpenAI answers (its client waits that long and retries).
    Runs inside ``BearerAuth``: a request without a valid key costs no one's budget."""

    def __init__(self, app: ASGIApp, rates: str) -> None:
        from limits import parse_many
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.app, self.rates = app, parse_many(rates)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = scope.get("state", {}).get("caller")
        if scope["type"] == "http" and caller is not None:
            over = next((r for r in self.rates if not self.limiter.test(r, caller)), None)
            if over is None:
                for rate in self.rates:
                    self.limiter.hit(rate, caller)
            else:
                reset, _ = self.limiter.get_window_stats(over, caller)
                wait = max(1, math.ceil(reset - time.time()))
                error = APIError(
                    429,
                    f"Rate limit reached for requests ({over} per API key). Please try again "
                    f"in {wait}s.",
                    code="rate_limit_exceeded",
                    headers={"retry-after": str(wait)},
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Caps request bodies: ``upload_bytes`` for uploads (``POST /v1/files``), ``json_bytes`` for
    everything else. A declared ``Content-Length`` over the cap is refused before a byte of the
    body is read; a body that grows past the cap (chunked) is cut off there."""

    # Room for the multipart envelope around an upload's file (boundaries, part headers).
    ENVELOPE = 64 * 1024

    def __init__(self, app: ASGIApp, upload_bytes: int, json_bytes: int) -> None:
        self.app, self.upload_bytes, self.json_bytes = app, upload_bytes, json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        upload = scope["path"].rstrip("/") == "/v1/files"
        limit = self.upload_bytes + self.ENVELOPE if upload else self.json_bytes
        what = "File" if upload else "Request body"
        shown = self.upload_bytes if upload else self.json_bytes
        error = APIError(
            413,
            f"{what} is larger than the {shown}-byte limit.",
            code="file_too_large" if upload else "request_too_large",
            param="file" if upload else None,
        )
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(error, scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(error, scope, receive, send)

    @staticmethod
    async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error.response()
        # The rest of the body is never read: the connection cannot be reused.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class Latency:
    """Observes each request's latency by route template."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app, self.histogram = app, histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.histogram.labels(scope["method"], route).observe(time.perf_counter() - started)
