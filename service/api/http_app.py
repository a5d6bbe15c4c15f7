"""The HTTP transport (FastAPI): thin routes over `CellForgeCore`; errors become status codes with JSON bodies."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandbox import ExecutionResult
from service import protocol

from .core import CellForgeCore
from .docs import ERRORS, errors_as_served, serve_docs
from .downloads import file_download
from .errors import DATABASE_UNAVAILABLE, BadRequest, ServiceError, Unavailable, invalid
from .http_guard import TENANT_SCOPE_KEY, BodyLimits, RequestGuard, error_body
from .logs import AccessLog
from .limits import JSON_BODY_BYTES, REGRESSION_BODY_BYTES
from .sandboxes import MAX_FILE_BYTES, parse_request
from .tenants import Tenant

log = logging.getLogger(__name__)

TRANSPORT = "http"
HTTP_ERRORS = {404: ("NotFound", "no route {method} {path}; see /docs"),
               405: ("MethodNotAllowed", "{path} does not answer {method}; see /docs")}
# Documents the scheme in OpenAPI; the key itself is checked by RequestGuard before any route runs.
BEARER = HTTPBearer(auto_error=False, description="an API key from `cellforge serve tenants create`")


def body_limits(core: CellForgeCore) -> BodyLimits:
    return BodyLimits(json=JSON_BODY_BYTES, file=MAX_FILE_BYTES, dataset=core.datasets.max_bytes,
                      regression=REGRESSION_BODY_BYTES)


def create_app(core: CellForgeCore, body_timeout: float = 30.0) -> FastAPI:
    app = FastAPI(title="CellForge", version="1", summary="Sandboxes, datasets, design jobs and regression runs.",
                  docs_url=None, redoc_url=None, responses=ERRORS)
    serve_docs(app)
    errors_as_served(app)

    async def authenticate(authorization: str | None, action: str) -> Tenant:
        return await core.authenticate(authorization, TRANSPORT, action)

    # Authentication and body limits come before FastAPI reads any body (see http_guard).
    app.add_middleware(RequestGuard, authenticate=authenticate, limits=body_limits(core), body_timeout=body_timeout)
    app.add_middleware(AccessLog)  # outermost: it sees the guard's refusals too

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if hasattr(exc, "retry_after") else None
        return JSONResponse(error_body(exc), status_code=exc.http_status, headers=headers)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        # The statement and its parameters stay in the server log.
        log.error("database error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(error_body(Unavailable(DATABASE_UNAVAILABLE)), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own answers (no such route, a method the route lacks) in the project's error shape."""
        kind, message = HTTP_ERRORS.get(exc.status_code, ("HTTPError", str(exc.detail)))
        body = {"error": {"type": kind, "message": message.format(method=request.method, path=request.url.path)}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"type": "InternalError", "message": "the server failed this call; it is "
                                       "logged on the server"}}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _malformed(_request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid("request", exc.errors())
        return JSONResponse(error_body(error), status_code=error.http_status)

    async def tenant_of(request: Request, _key: HTTPAuthorizationCredentials | None = Security(BEARER)) -> Tenant:
        """The tenant `RequestGuard` authenticated from the headers, before any body was read."""
        return request.scope[TENANT_SCOPE_KEY]

    def audited(tenant: Tenant, action: str, resource: str | None = None):
        return core.audited(tenant, TRANSPORT, action, resource)

    # -- health and metrics ---------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def welcome() -> dict[str, str]:
        return {"service": "CellForge", "version": app.version, "docs": "/docs", "redoc": "/redoc",
                "openapi": "/openapi.json", "auth": "Authorization: Bearer <api key> on every /v1/ call"}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        return JSONResponse({"ready": core.ready}, status_code=200 if core.ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        await core.refresh_metrics()
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- sandboxes --------------------------------------------------------------------------------

    @app.post("/v1/sandboxes", status_code=201, response_model=protocol.SandboxInfo)
    async def create_sandbox(request: Request, tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        with audited(tenant, "sandbox.create"):
            body = await _json(request, allow_empty=True)
            info = await core.sandboxes.create(tenant, parse_request(body))
        return info.to_dict()

    @app.get("/v1/sandboxes", response_model=protocol.SandboxList)
    async def list_sandboxes(tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        with audited(tenant, "sandbox.list"):
            return {"sandboxes": [i.to_dict() for i in await core.sandboxes.list(tenant)]}

    @app.get("/v1/sandboxes/{sandbox_id}", response_model=protocol.SandboxInfo)
    async def get_sandbox(sandbox_id: str, tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        with audited(tenant, "sandbox.get", sandbox_id):
            return (await core.sandboxes.get(tenant, sandbox_id)).to_dict()

    @app.delete("/v1/sandboxes/{sandbox_id}", status_code=204)
    async def delete_sandbox(sandbox_id: str, tenant: Tenant = Depends(tenant_of)) -> Response:
        with audited(tenant, "sandbox.delete", sandbox_id):
            await core.sandboxes.delete(tenant, sandbox_id)
        return Response(status_code=204)

    @app.post("/v1/sandboxes/{sandbox_id}/execute")
    async def execute(sandbox_id: str, body: protocol.ExecuteRequest, request: Request,
                      tenant: Tenant = Depends(tenant_of)) -> StreamingResponse:
        """Stream the execution as NDJSON (one event per line, last `{"kind": "done", "result": ...}`),
        or as server-sent events with `Accept: text/event-stream`. Disconnecting interrupts the code."""
        with audited(tenant, "sandbox.execute", sandbox_id):
            await core.sandboxes.get(tenant, sandbox_id)  # a 404 before the stream starts
        sse = "text/event-stream" in request.headers.get("accept", "")
        items = core.sandboxes.execute(tenant, sandbox_id, body.code, body.timeout, TRANSPORT)
        return StreamingResponse(
            _encode(items, sse), media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/sandboxes/{sandbox_id}/interrupt", status_code=202)
    async def interrupt(sandbox_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.SandboxStatus:
        with audited(tenant, "sandbox.interrupt", sandbox_id):
            await core.sandboxes.interrupt(tenant, sandbox_id)
        return protocol.SandboxStatus(status="interrupted")

    @app.post("/v1/sandboxes/{sandbox_id}/restart")
    async def restart(sandbox_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.SandboxStatus:
        with audited(tenant, "sandbox.restart", sandbox_id):
            await core.sandboxes.restart(tenant, sandbox_id)
        return protocol.SandboxStatus(status="restarted")

    @app.put("/v1/sandboxes/{sandbox_id}/files/{path:path}", status_code=204)
    async def put_file(sandbox_id: str, path: str, request: Request, tenant: Tenant = Depends(tenant_of)) -> Response:
        with audited(tenant, "sandbox.put_file", f"{sandbox_id}/{path}"):
            await core.sandboxes.get(tenant, sandbox_id)
            data = await request.body()  # at most the route's limit: RequestGuard counts it
            await core.sandboxes.put_file(tenant, sandbox_id, path, data)
        return Response(status_code=204)

    @app.get("/v1/sandboxes/{sandbox_id}/files/{path:path}")
    async def get_file(sandbox_id: str, path: str, tenant: Tenant = Depends(tenant_of)) -> Response:
        with audited(tenant, "sandbox.get_file", f"{sandbox_id}/{path}"):
            data = await core.sandboxes.get_file(tenant, sandbox_id, path)
        return Response(data, media_type="application/octet-stream")

    @app.get("/v1/sandboxes/{sandbox_id}/files")
    async def list_files(sandbox_id: str, folder: str = "", tenant: Tenant = Depends(tenant_of)) -> protocol.FileList:
        with audited(tenant, "sandbox.list_files", f"{sandbox_id}/{folder}"):
            return protocol.FileList(files=await core.sandboxes.list_files(tenant, sandbox_id, folder))

    @app.post("/v1/sandboxes/{sandbox_id}/commands")
    async def run_command(sandbox_id: str, body: protocol.CommandRequest,
                          tenant: Tenant = Depends(tenant_of)) -> ExecutionResult:
        """Run a program (no shell) and answer when it ends: `ok` only for exit code 0 (`exit_code`)."""
        with audited(tenant, "sandbox.command", sandbox_id):
            return await core.sandboxes.run_command(tenant, sandbox_id, body.argv, body.cwd, body.timeout)

    # -- datasets ---------------------------------------------------------------------------------

    @app.post("/v1/datasets", status_code=201, response_model=protocol.DatasetInfo,
              responses={200: {"model": protocol.DatasetInfo, "description": "the same bytes were stored already"}})
    async def upload_dataset(request: Request, response: Response, name: str | None = None,
                             tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        """Upload an `.h5ad` as the raw request body (`?name=file.h5ad`); validated before it is kept.
        Bytes the tenant stored already answer 200 with that dataset (`reused`)."""
        with audited(tenant, "dataset.upload", name):
            if request.headers.get("content-type", "").startswith("multipart/"):
                raise BadRequest("send the .h5ad as the raw request body (application/octet-stream), not a form")
            declared = request.headers.get("content-length")
            info = await core.upload_dataset(tenant, name, request.stream(),
                                             int(declared) if declared and declared.isdigit() else None)
        if info.get("reused"):
            response.status_code = 200
        return info

    @app.get("/v1/datasets/sha256/{digest}", response_model=protocol.DatasetInfo)
    async def find_dataset(digest: str, tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        """The tenant's dataset whose file has this SHA-256 (404 if none): check before uploading."""
        with audited(tenant, "dataset.find", digest):
            return await core.db.run(core.datasets.find, tenant, digest)

    @app.get("/v1/datasets", response_model=protocol.DatasetList)
    async def list_datasets(tenant: Tenant = Depends(tenant_of)) -> dict[str, Any]:
        with audited(tenant, "dataset.list"):
            return {"datasets": await core.db.run(core.datasets.list, tenant)}

    # -- design jobs ------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=201)
    async def submit_job(body: protocol.DesignJobRequest, tenant: Tenant = Depends(tenant_of)) -> protocol.JobInfo:
        with audited(tenant, "job.submit", body.dataset_id):
            return await core.jobs.submit_design(tenant, body)

    @app.get("/v1/jobs")
    async def list_jobs(tenant: Tenant = Depends(tenant_of)) -> protocol.JobList:
        with audited(tenant, "job.list"):
            return protocol.JobList(jobs=await core.jobs.list(tenant))

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.JobInfo:
        with audited(tenant, "job.get", job_id):
            return await core.jobs.get(tenant, job_id)

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, after_seq: int = 0,
                         tenant: Tenant = Depends(tenant_of)) -> StreamingResponse:
        """Recorded events after `after_seq`, then live ones until the job ends (NDJSON, or SSE)."""
        with audited(tenant, "job.events", job_id):
            await core.jobs.get(tenant, job_id)
        sse = "text/event-stream" in request.headers.get("accept", "")
        return StreamingResponse(_encode_events(core.jobs.events(tenant, job_id, after_seq), sse),
                                 media_type="text/event-stream" if sse else "application/x-ndjson",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.JobInfo:
        with audited(tenant, "job.cancel", job_id):
            return await core.jobs.cancel(tenant, job_id)

    @app.get("/v1/jobs/{job_id}/artifacts/{name}", response_class=FileResponse)
    async def get_artifact(job_id: str, name: str, tenant: Tenant = Depends(tenant_of)) -> FileResponse:
        """The file with its own content type; `report.html` opens in a browser (under a strict CSP)."""
        with audited(tenant, "job.artifact", f"{job_id}/{name}"):
            path = await core.jobs.artifact(tenant, job_id, name)
        return file_download(path, name)

    @app.get("/v1/jobs/{job_id}/logs")
    async def list_logs(job_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.JobLogs:
        """The attempt logs of a design job (training output per attempt and fold), as paths."""
        with audited(tenant, "job.logs", job_id):
            return protocol.JobLogs(logs=await core.jobs.logs(tenant, job_id))

    @app.get("/v1/jobs/{job_id}/logs/{name:path}", response_class=FileResponse)
    async def get_log(job_id: str, name: str, tenant: Tenant = Depends(tenant_of)) -> FileResponse:
        with audited(tenant, "job.log", f"{job_id}/{name}"):
            path = await core.jobs.log_file(tenant, job_id, name)
        return file_download(path, name)

    # -- regression runs --------------------------------------------------------------------------

    @app.post("/v1/regressions", status_code=201)
    async def submit_regression(body: protocol.RegressionRequest, tenant: Tenant = Depends(tenant_of)) -> protocol.JobInfo:
        """`{"kind": "pytest", "bundle_zip_b64" | "job_id", "dataset_id"?}`, or `{"kind": "rescore" |
        "replay", "job_id", "tolerances"?}`; poll `GET /v1/regressions/{id}` for the verdict."""
        with audited(tenant, "regression.submit"):
            return await core.jobs.submit_regression(tenant, body)

    @app.get("/v1/regressions/{job_id}")
    async def get_regression(job_id: str, tenant: Tenant = Depends(tenant_of)) -> protocol.JobInfo:
        with audited(tenant, "regression.get", job_id):
            return await core.jobs.get(tenant, job_id, regression=True)

    app.state.core = core
    return app


async def _json(request: Request, allow_empty: bool = False) -> Any:
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise BadRequest("malformed request: expected a JSON body")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"malformed request: the body is not valid JSON ({exc})") from None


async def _encode(items: AsyncGenerator[Any, None], sse: bool) -> AsyncIterator[bytes]:
    def frame(kind: str, payload: dict[str, Any]) -> bytes:
        if sse:
            return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()
        return (json.dumps(payload) + "\n").encode()

    try:
        async for item in items:
            if isinstance(item, ExecutionResult):
                yield frame("done", {"kind": "done", "result": item.model_dump(mode="json")})
            else:
                yield frame(item.kind, item.model_dump(mode="json"))
    except ServiceError as exc:
        # Headers are gone already: the failure travels in the stream, with the status it would have had.
        yield frame("failed", {"kind": "failed", "status": exc.http_status, **error_body(exc)})
    finally:
        await items.aclose()


async def _encode_events(events: AsyncGenerator[protocol.JobEvent, None], sse: bool) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            if sse:
                yield f"id: {event.seq}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n".encode()
            else:
                yield (event.model_dump_json() + "\n").encode()
    finally:
        await events.aclose()
