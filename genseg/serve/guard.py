"""What keeps one slow or greedy client from taking the server down: body size and read-time limits, a
header read timeout, and a memory budget that decoding must reserve before it allocates.

These sit below the routes so every request passes them, whatever it asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body every route and guard answers with."""
    return JSONResponse({"error": {"message": message}}, status_code=status, headers=headers)


class RequestGuard:
    """ASGI middleware: refuse a body over `max_body` bytes (413, before reading it when Content-Length says
    so), a POST whose Content-Type is not JSON (415; `raw_routes` also take application/octet-stream, a file's
    bytes), and a body that does not arrive within `body_timeout` seconds (408), so a client that sends less than
    it announced cannot hold a request open."""

    def __init__(self, app, max_body: int, body_timeout: float, raw_routes: frozenset[str] = frozenset()):
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.raw_routes = raw_routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return await error_response(413, f"request body is larger than {self.max_body} bytes")(scope, receive, send)
        content_type = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        raw = scope["path"] in self.raw_routes
        if scope["method"] == "POST" and not (content_type == b"application/json" or content_type.endswith(b"+json")
                                              or raw and content_type == b"application/octet-stream"):
            wanted = "the file's bytes (Content-Type: application/octet-stream)" if raw else \
                "JSON (Content-Type: application/json)"
            return await error_response(415, f"the body must be {wanted}")(scope, receive, send)
        await self.app(scope, self._bounded(receive), send)

    def _bounded(self, receive):
        state: dict[str, Any] = {"deadline": None, "size": 0, "done": False}

        async def bounded_receive():
            if state["done"]:  # the body is in: later receives wait for a disconnect and must not time out
                return await receive()
            loop = asyncio.get_running_loop()
            if state["deadline"] is None:
                state["deadline"] = loop.time() + self.body_timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, state["deadline"] - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                state["size"] += len(message.get("body", b""))
                if state["size"] > self.max_body:
                    raise HTTPException(413, f"request body is larger than {self.max_body} bytes")
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        return bounded_receive


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    `header_timeout` seconds of the connection (or of the end of its previous response), so slow headers cannot
    pile up."""

    header_timeout = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # headers are in: the body has its own timeout (RequestGuard)
        elif self._header_timer is None:
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._close_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _close_slow(self) -> None:
        self._header_timer = None
        if self.cycle is None or self.cycle.response_complete:
            with contextlib.suppress(Exception):
                self.transport.close()


class MemoryBudget:
    """Pixels that decoding may hold at once across all requests. A request reserves what its instances claim
    before decoding them; one that cannot get its share within `wait` seconds is told to retry (503)."""

    def __init__(self, pixels: int, wait: float = 10.0):
        self.total = pixels
        self.free = pixels
        self.wait = wait
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int):
        pixels = min(pixels, self.total)  # a request within the per-request limit can always run alone
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= pixels), self.wait)
            except asyncio.TimeoutError:
                raise HTTPException(503, "the server is busy decoding other requests; retry shortly",
                                    headers={"Retry-After": "2"}) from None
            self.free -= pixels
        try:
            yield
        finally:
            async with self._changed:
                self.free += pixels
                self._changed.notify_all()
