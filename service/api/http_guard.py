"""What every HTTP request passes before the app reads a byte of its body: authentication of `/v1/`
calls from the `Authorization` header, then the route's body size limit.

FastAPI reads and parses a route's body parameters before it resolves the route's dependencies, so an
authentication dependency alone would let anyone make the server read and parse any body. This ASGI
middleware answers 401 (and 429 for the rate limit) from the headers alone, and 413 from a declared
`Content-Length` over the limit, or as soon as the counted stream passes it; either way without reading
the rest, and with `Connection: close` so the server drops the unread remainder. A body that stops
arriving for `body_timeout` seconds is answered 408 the same way.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PayloadTooLarge, RequestTimeout, ServiceError

TENANT_SCOPE_KEY = "cellforge.tenant"
_FILE_ROUTE = re.compile(r"^/v1/sandboxes/[^/]+/files/")


@dataclass(frozen=True)
class BodyLimits:
    """Largest request body per route, in bytes: JSON calls are small; a file put, a dataset upload and
    a regression (its bundle inline as base64) have their own limits."""

    json: int
    file: int
    dataset: int
    regression: int

    def of(self, method: str, path: str) -> int:
        if method == "PUT" and _FILE_ROUTE.match(path):
            return self.file
        if method == "POST" and path == "/v1/datasets":
            return self.dataset
        if method == "POST" and path == "/v1/regressions":
            return self.regression
        return self.json


class RequestGuard:
    def __init__(self, app: Any, authenticate: Callable[[str | None, str], Any], limits: BodyLimits,
                 body_timeout: float = 30.0) -> None:
        self.app = app
        self.authenticate = authenticate  # (Authorization header, action) -> tenant; raises ServiceError
        self.limits = limits
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        headers = _headers(scope)
        if path == "/v1" or path.startswith("/v1/"):  # health, readiness, metrics and the schema are open
            try:
                scope[TENANT_SCOPE_KEY] = await self.authenticate(headers.get("authorization"), f"{method} {path}")
            except ServiceError as exc:
                await send_error(send, exc, close=_has_body(headers))
                return
        limit = self.limits.of(method, path)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await send_error(send, PayloadTooLarge(
                f"request body of {declared} bytes exceeds this route's limit of {limit} bytes"), close=True)
            return
        await self.app(scope, *_capped(receive, send, limit, self.body_timeout))


def _capped(receive: Callable, send: Callable, limit: int, timeout: float) -> tuple[Callable, Callable]:
    """`receive` counting body bytes and timing each part: past `limit`, or after `timeout` seconds
    without a part, it stops the app (an error from `receive`) and the app's own answer is replaced
    by a 413 (408). Once the body is complete, `receive` only waits for the client to go away."""
    state: dict[str, Any] = {"read": 0, "failure": None, "started": False, "complete": False}

    async def counted_receive() -> dict[str, Any]:
        if state["complete"]:
            return await receive()
        if state["failure"] is None:
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except TimeoutError:
                state["failure"] = RequestTimeout(f"no part of the request body arrived for {timeout:g}s")
            else:
                if message["type"] != "http.request":
                    return message
                state["read"] += len(message.get("body", b""))
                if state["read"] <= limit:
                    state["complete"] = not message.get("more_body", False)
                    return message
                state["failure"] = PayloadTooLarge(f"request body exceeds this route's limit of {limit} bytes")
        raise state["failure"]

    async def guarded_send(message: dict[str, Any]) -> None:
        if state["failure"] is not None:
            if message["type"] == "http.response.start" and not state["started"]:
                state["started"] = True
                await send_error(send, state["failure"], close=True)
            return  # the app's own answer to the error it got is dropped
        if message["type"] == "http.response.start":
            state["started"] = True
        await send(message)

    return counted_receive, guarded_send


def error_body(exc: ServiceError) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


async def send_error(send: Callable, exc: ServiceError, close: bool) -> None:
    body = json.dumps(error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if hasattr(exc, "retry_after"):
        headers.append((b"retry-after", str(exc.retry_after).encode()))
    if close:  # the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _has_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers
