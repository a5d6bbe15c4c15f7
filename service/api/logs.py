"""Structured log lines: one JSON object per HTTP request or gRPC call (`cellforge.access`) and per job
event the service sees (`cellforge.jobs`: queued, finished), for log shippers; the rest stays text."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from .errors import ServiceError
from .http_guard import TENANT_SCOPE_KEY

ACCESS = logging.getLogger("cellforge.access")
JOBS = logging.getLogger("cellforge.jobs")


class JsonLines(logging.Formatter):
    """`{"ts": ISO-8601, "level", "logger", "event", ...fields}` per record (`extra={"fields": {...}}`)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
                "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(),
                **getattr(record, "fields", {})}
        return json.dumps(line, default=str)


def configure(stream: Any = None) -> None:
    """Access and job lines as JSON on their own handler (INFO and up), whatever the root level."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    for logger in (ACCESS, JOBS):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def job_line(event: str, **fields: Any) -> None:
    JOBS.info(event, extra={"fields": fields})


@contextlib.contextmanager
def rpc_line(method: str, tenant_id: str) -> Iterator[None]:
    """One access line for a gRPC call once it is over: its status code name and duration."""
    started, code = time.perf_counter(), "OK"
    try:
        yield
    except ServiceError as exc:
        code = exc.grpc_code
        raise
    except BaseException as exc:
        code = "CANCELLED" if isinstance(exc, GeneratorExit) else "INTERNAL"
        raise
    finally:
        ACCESS.info("rpc", extra={"fields": {"transport": "grpc", "method": method, "code": code,
                                             "ms": round((time.perf_counter() - started) * 1000, 1),
                                             "tenant": tenant_id}})


class AccessLog:
    """ASGI middleware: one line per HTTP request when it is over (method, path, status, milliseconds
    until the last byte, tenant when authenticated, client address). The query string is left out: it
    may carry names a tenant chose."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []

        async def send_logged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            tenant = scope.get(TENANT_SCOPE_KEY)
            client = scope.get("client")
            ACCESS.info("request", extra={"fields": {
                "transport": "http", "method": scope["method"], "path": scope["path"], "status": status[0] if status else None,
                "ms": round((time.perf_counter() - started) * 1000, 1),
                "tenant": getattr(tenant, "id", None), "client": client[0] if client else None}})
