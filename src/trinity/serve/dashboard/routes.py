"""`GET /dashboard` (the page) and `GET /dashboard/events` (a server-sent event stream of snapshots).

Auth: with `--api-key`, both need the key. A browser cannot send an Authorization header when it opens a
page, so besides `Authorization: Bearer KEY` the key may come as `?key=KEY`; the page answers it with an
HttpOnly cookie holding an HMAC of the key (never the key itself), so the page's own requests and a reload
need no key in the URL. Every comparison is constant-time, like the API's.

The page's script and stylesheet are served without auth: they are fixed code, carry no server data, and
being separate files lets the page's Content-Security-Policy forbid inline code and every other origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..errors import APIError
from ..state import ServerState
from .gpu_stats import read_gpu_stats
from .snapshot import DashboardSampler

log = logging.getLogger("trinity.serve.dashboard")

HERE = Path(__file__).resolve().parent
COOKIE = "trinity_dashboard"
TICK_S = 1.0
GPU_REFRESH_S = 1.0
# No origin but this server, no inline code: the page works offline and cannot be made to load anything else.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


def cookie_token(api_key: str) -> str:
    """What the cookie holds: proves the key was given without storing it in the browser."""
    return hmac.new(api_key.encode(), b"trinity-dashboard-cookie", hashlib.sha256).hexdigest()


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class _GpuReader:
    """NVML readings at most once per GPU_REFRESH_S for all open pages, read off the event loop."""

    def __init__(self):
        self._at = -1e9
        self._value: list[dict] | None = None
        self._lock = asyncio.Lock()

    async def read(self) -> list[dict] | None:
        async with self._lock:
            if time.monotonic() - self._at >= GPU_REFRESH_S:
                try:
                    self._value = await asyncio.to_thread(read_gpu_stats)
                except Exception:  # noqa: BLE001 - GPU statistics are optional; the page says "no GPU"
                    log.exception("reading GPU statistics failed")
                    self._value = None
                self._at = time.monotonic()
            return self._value


def dashboard_router(state: ServerState) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    sampler = DashboardSampler(state)
    gpus = _GpuReader()
    page = (HERE / "index.html").read_bytes()
    assets = {name: (HERE / name).read_bytes() for name in ASSETS}

    def authorize(request: Request) -> bool:
        """True when the key came in the query (the page then sets the cookie); 401 when it did not come."""
        key = state.settings.api_key
        if key is None:
            return False
        header = request.headers.get("authorization", "")
        bearer = header[7:] if header.lower().startswith("bearer ") else ""
        query = request.query_params.get("key", "")
        cookie = request.cookies.get(COOKIE, "")
        # evaluate all three every time, so the timing does not tell which one was tried
        by_header, by_query = _equal(bearer, key), _equal(query, key)
        by_cookie = _equal(cookie, cookie_token(key))
        if not (by_header or by_query or by_cookie):
            raise APIError(401, "missing or invalid API key: open /dashboard?key=<key> "
                                "(or send 'Authorization: Bearer <key>')", code="invalid_api_key")
        return by_query

    @router.get("/dashboard")
    async def dashboard_page(request: Request) -> Response:
        via_query = authorize(request)
        response = Response(page, media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store",
                                     "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"})
        if via_query:
            response.set_cookie(COOKIE, cookie_token(state.settings.api_key), httponly=True, samesite="strict",
                                path="/dashboard")
        return response

    @router.get("/dashboard/static/{name}")
    async def dashboard_asset(name: str) -> Response:
        if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
            raise APIError(404, f"no dashboard asset {name!r}", code="not_found")
        return Response(assets[name], media_type=ASSETS[name], headers={"X-Content-Type-Options": "nosniff"})

    @router.get("/dashboard/events")
    async def dashboard_events(request: Request) -> StreamingResponse:
        authorize(request)
        return StreamingResponse(_events(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _events(request: Request) -> AsyncIterator[str]:
        yield "retry: 2000\n\n"  # how long a browser waits before reconnecting after a dropped stream
        while True:
            try:
                snap = sampler.snapshot(await gpus.read())
                yield f"data: {json.dumps(snap, separators=(',', ':'))}\n\n"
            except Exception as e:  # noqa: BLE001 - one bad tick is reported, the stream goes on
                log.exception("building a dashboard snapshot failed")
                yield f"event: problem\ndata: {json.dumps({'message': type(e).__name__})}\n\n"
            if state.draining:  # let shutdown finish: a dashboard must not hold the server open
                yield "event: end\ndata: {}\n\n"
                return
            await asyncio.sleep(TICK_S)
            if await request.is_disconnected():
                return

    return router
