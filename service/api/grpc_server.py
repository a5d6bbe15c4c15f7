"""The gRPC transport (grpc.aio): `cellforge.v1.CellForge` over `CellForgeCore`, plus health and reflection.

Every CellForge call is authenticated by `AuthInterceptor` from its metadata before the server reads
its request message; a refused call is answered without reading it. Each method has a message size
limit matching the HTTP route's (`METHOD_LIMITS`); `GrpcLimits` holds the server-wide ones.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import SQLAlchemyError

from sandbox import ExecutionResult

from .core import CellForgeCore
from .errors import DATABASE_UNAVAILABLE, BadRequest, PayloadTooLarge, ServiceError, Unavailable
from .logs import rpc_line
from .limits import DATASET_CHUNK_BYTES, FILE_BODY_BYTES, JSON_BODY_BYTES, REGRESSION_BODY_BYTES
from service.protocol import JobInfo
from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from .sandboxes import parse_request
from .tenants import Tenant

log = logging.getLogger(__name__)

TRANSPORT = "grpc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CellForge"].full_name
# Largest request message per method (a dataset upload: per chunk); others get JSON_BODY_BYTES.
METHOD_LIMITS = {"PutFile": FILE_BODY_BYTES, "SubmitRegression": REGRESSION_BODY_BYTES,
                 "UploadDataset": DATASET_CHUNK_BYTES}
MAX_MESSAGE_BYTES = max(METHOD_LIMITS.values())
DOWNLOAD_CHUNK_BYTES = 1 << 20  # an artifact streams in pieces this size, whatever its size
_tenant: contextvars.ContextVar[Tenant] = contextvars.ContextVar("cellforge_tenant")


@dataclass(frozen=True)
class GrpcLimits:
    """Server-wide limits of the gRPC transport: concurrent calls, HTTP/2 streams per connection, and
    how long connections live (keepalive pings find dead peers; idle and old connections are closed,
    the calls in flight on an old one get a grace period), and how much of a stream's data the server
    takes ahead of the handler."""

    max_concurrent_rpcs: int = 256
    max_streams_per_connection: int = 64
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    min_client_ping_interval_s: float = 10.0
    max_idle_s: float = 300.0
    max_age_s: float = 7200.0
    max_age_grace_s: float = 300.0
    stream_window_bytes: int = 1 << 20

    def options(self) -> list[tuple[str, int]]:
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        return [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            # A fixed flow-control window: with BDP probing the transport grew it to many MiB on a fast
            # link and buffered that much of every refused (unauthenticated) message before the
            # refusal closed the stream. Costs upload speed on slow links: one window per round trip.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", self.stream_window_bytes),
            ("grpc.keepalive_time_ms", ms(self.keepalive_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", ms(self.max_idle_s)),
            ("grpc.max_connection_age_ms", ms(self.max_age_s)),
            ("grpc.max_connection_age_grace_ms", ms(self.max_age_grace_s)),
        ]


class _TooLarge:
    """What a request message over its method's limit deserializes to (it is never parsed)."""

    def __init__(self, size: int, limit: int) -> None:
        self.error = PayloadTooLarge(f"request message of {size} bytes exceeds this call's limit of {limit} bytes")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates CellForge calls from their metadata before the request is read, and caps each
    method's request messages. The tenant reaches the servicer through a context variable."""

    def __init__(self, core: CellForgeCore) -> None:
        self.core = core

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").partition("/")
        if handler is None or service != SERVICE_NAME:
            return handler  # health checking and reflection are open
        metadata = {k.lower(): v for k, v in (details.invocation_metadata or ())}
        try:
            tenant = await self.core.authenticate(metadata.get("authorization"), TRANSPORT, method)
        except ServiceError as exc:
            return _refusal(exc)
        return _bound(handler, tenant, METHOD_LIMITS.get(method, JSON_BODY_BYTES))


def _refusal(exc: ServiceError) -> grpc.RpcMethodHandler:
    """A handler that answers with the error without reading the request (a request-streaming handler
    never receives a message it does not ask for, whatever the method's own shape)."""

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await _abort(context, exc)

    return grpc.stream_unary_rpc_method_handler(refuse)


def _bound(handler: grpc.RpcMethodHandler, tenant: Tenant, limit: int) -> grpc.RpcMethodHandler:
    """`handler` with the tenant set for its behaviour and its request messages capped at `limit`."""
    deserialize = handler.request_deserializer

    def capped(raw: bytes) -> Any:
        return _TooLarge(len(raw), limit) if len(raw) > limit else deserialize(raw)

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _TooLarge):
                raise request.error
            yield request

    if handler.request_streaming and not handler.response_streaming:
        async def behaviour(requests, context):
            _tenant.set(tenant)
            return await handler.stream_unary(checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(behaviour, capped, handler.response_serializer)
    if handler.request_streaming:
        raise NotImplementedError("no CellForge call streams both ways")

    async def refuse_large(request: Any, context: grpc.aio.ServicerContext) -> bool:
        if isinstance(request, _TooLarge):
            await _abort(context, request.error)
        _tenant.set(tenant)
        return True

    if handler.response_streaming:
        async def streaming(request, context):
            await refuse_large(request, context)
            async for item in handler.unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(streaming, capped, handler.response_serializer)

    async def unary(request, context):
        await refuse_large(request, context)
        return await handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary, capped, handler.response_serializer)


def plain(message: Any) -> dict[str, Any]:
    """The fields a request message set, by their names (unset ones left out: the server's defaults)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def regression_request(message: pb.SubmitRegressionRequest) -> dict[str, Any]:
    kind = message.WhichOneof("kind")
    return {"kind": kind, **plain(getattr(message, kind))} if kind else {}


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    if hasattr(exc, "retry_after"):
        context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))


def _service_error(exc: Exception) -> ServiceError:
    if isinstance(exc, ServiceError):
        return exc
    # The statement and its parameters stay in the server log.
    log.error("database error in a gRPC call: %s", exc)
    return Unavailable(DATABASE_UNAVAILABLE)


def _rpc(action: str) -> Callable:
    """Audit and translate errors for one RPC (unary or server-streaming); `AuthInterceptor` has
    authenticated the caller."""

    def wrap(method: Callable) -> Callable:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(self: CellForgeServicer, request: Any, context: grpc.aio.ServicerContext):
                try:
                    tenant = _tenant.get()
                    with rpc_line(method.__name__, tenant.id), \
                            self.core.audited(tenant, TRANSPORT, action, _resource(request)):
                        async for item in method(self, tenant, request, context):
                            yield item
                except (ServiceError, SQLAlchemyError) as exc:
                    await _abort(context, _service_error(exc))

            return streaming

        @functools.wraps(method)
        async def unary(self: CellForgeServicer, request: Any, context: grpc.aio.ServicerContext):
            try:
                tenant = _tenant.get()
                with rpc_line(method.__name__, tenant.id), \
                        self.core.audited(tenant, TRANSPORT, action, _resource(request)):
                    return await method(self, tenant, request, context)
            except (ServiceError, SQLAlchemyError) as exc:
                await _abort(context, _service_error(exc))

        return unary

    return wrap


def _resource(request: Any) -> str | None:
    for name in ("sandbox_id", "job_id"):
        value = getattr(request, name, None)
        if value:
            return value
    return None


def timestamp(value: datetime | float | None) -> Timestamp | None:
    if value is None:
        return None
    message = Timestamp()
    message.FromDatetime(value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC))
    return message


def sandbox_message(info: Any) -> pb.Sandbox:
    return pb.Sandbox(id=info.id, status=info.status, created_at=timestamp(info.created_at),
                      spec_json=json.dumps(info.spec), dataset_id=info.dataset_id or "")


def result_message(res: ExecutionResult) -> pb.ExecutionResult:
    return pb.ExecutionResult(
        outcome=res.outcome.value, stdout=res.stdout, stderr=res.stderr, ename=res.ename or "",
        evalue=res.evalue or "", traceback=res.traceback, died_cause=res.died_cause or "",
        duration_ms=res.duration_ms, stdout_bytes=res.stdout_bytes, truncated=res.truncated,
        result=res.result or "", state_lost=res.state_lost, exit_code=res.exit_code,
    )


def job_message(job: JobInfo) -> pb.Job:
    return pb.Job(
        id=job.id, kind=job.kind, status=job.status, phase=job.phase, error=job.error,
        created_at=timestamp(job.created_at), started_at=timestamp(job.started_at),
        finished_at=timestamp(job.finished_at), attempts=job.attempts, params_json=json.dumps(job.params),
        result_json="" if job.result is None else json.dumps(job.result), artifacts=job.artifacts,
        final=job.final, logs=job.logs,
    )


def dataset_message(ds: dict[str, Any]) -> pb.Dataset:
    return pb.Dataset(id=ds["id"], name=ds["name"], size_bytes=ds["size_bytes"], created_at=timestamp(ds["created_at"]),
                      layout_json=json.dumps(ds.get("layout") or {}), reused=bool(ds.get("reused")))


async def _chunks(path: Path) -> AsyncIterator[pb.FileData]:
    """A file as messages of at most DOWNLOAD_CHUNK_BYTES, read off the event loop."""
    with path.open("rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, DOWNLOAD_CHUNK_BYTES):
            yield pb.FileData(data=chunk)


class CellForgeServicer(pb_grpc.CellForgeServicer):
    def __init__(self, core: CellForgeCore) -> None:
        self.core = core

    # -- sandboxes --------------------------------------------------------------------------------

    @_rpc("sandbox.create")
    async def CreateSandbox(self, tenant, request, context):
        info = await self.core.sandboxes.create(tenant, parse_request(plain(request.spec)))
        return sandbox_message(info)

    @_rpc("sandbox.get")
    async def GetSandbox(self, tenant, request, context):
        return sandbox_message(await self.core.sandboxes.get(tenant, request.sandbox_id))

    @_rpc("sandbox.list")
    async def ListSandboxes(self, tenant, request, context):
        return pb.SandboxList(sandboxes=[sandbox_message(i) for i in await self.core.sandboxes.list(tenant)])

    @_rpc("sandbox.delete")
    async def DeleteSandbox(self, tenant, request, context):
        await self.core.sandboxes.delete(tenant, request.sandbox_id)
        return pb.Empty()

    @_rpc("sandbox.execute")
    async def Execute(self, tenant, request, context) -> AsyncIterator[pb.ExecuteEvent]:
        await self.core.sandboxes.get(tenant, request.sandbox_id)
        items = self.core.sandboxes.execute(tenant, request.sandbox_id, request.code, request.timeout or None,
                                            TRANSPORT)
        try:
            async for item in items:
                if isinstance(item, ExecutionResult):
                    yield pb.ExecuteEvent(kind="done", result=result_message(item))
                else:
                    data = item.model_dump(mode="json")
                    yield pb.ExecuteEvent(kind=item.kind, text=data.pop("text", ""), data_json=json.dumps(data))
        finally:
            await items.aclose()

    @_rpc("sandbox.interrupt")
    async def Interrupt(self, tenant, request, context):
        await self.core.sandboxes.interrupt(tenant, request.sandbox_id)
        return pb.Empty()

    @_rpc("sandbox.restart")
    async def Restart(self, tenant, request, context):
        await self.core.sandboxes.restart(tenant, request.sandbox_id)
        return pb.Empty()

    @_rpc("sandbox.put_file")
    async def PutFile(self, tenant, request, context):
        await self.core.sandboxes.put_file(tenant, request.sandbox_id, request.path, request.data)
        return pb.Empty()

    @_rpc("sandbox.get_file")
    async def GetFile(self, tenant, request, context):
        return pb.FileData(data=await self.core.sandboxes.get_file(tenant, request.sandbox_id, request.path))

    @_rpc("sandbox.list_files")
    async def ListFiles(self, tenant, request, context):
        return pb.FileNames(files=await self.core.sandboxes.list_files(tenant, request.sandbox_id, request.path))

    @_rpc("sandbox.command")
    async def RunCommand(self, tenant, request, context):
        return result_message(await self.core.sandboxes.run_command(
            tenant, request.sandbox_id, list(request.argv), request.cwd or None, request.timeout or None))

    # -- datasets ---------------------------------------------------------------------------------

    async def UploadDataset(self, request_iterator, context):
        try:
            tenant = _tenant.get()
            with rpc_line("UploadDataset", tenant.id), self.core.audited(tenant, TRANSPORT, "dataset.upload"):
                first = await anext(aiter(request_iterator), None)
                if first is None:
                    raise BadRequest("UploadDataset: no chunks were sent")

                async def chunks() -> AsyncIterator[bytes]:
                    yield first.data
                    async for chunk in request_iterator:
                        yield chunk.data

                return dataset_message(await self.core.upload_dataset(tenant, first.name or None, chunks()))
        except (ServiceError, SQLAlchemyError) as exc:
            await _abort(context, _service_error(exc))

    @_rpc("dataset.find")
    async def FindDataset(self, tenant, request, context):
        return dataset_message(await self.core.db.run(self.core.datasets.find, tenant, request.sha256))

    @_rpc("dataset.list")
    async def ListDatasets(self, tenant, request, context):
        return pb.DatasetList(datasets=[dataset_message(d) for d in await self.core.db.run(self.core.datasets.list,
                                                                                          tenant)])

    # -- jobs and regressions ---------------------------------------------------------------------

    @_rpc("job.submit")
    async def SubmitJob(self, tenant, request, context):
        job = await self.core.jobs.submit_design(tenant, {"dataset_id": request.dataset_id, "task": request.task,
                                                          "options": plain(request.options)})
        return job_message(job)

    @_rpc("job.get")
    async def GetJob(self, tenant, request, context):
        return job_message(await self.core.jobs.get(tenant, request.job_id))

    @_rpc("job.list")
    async def ListJobs(self, tenant, request, context):
        return pb.JobList(jobs=[job_message(j) for j in await self.core.jobs.list(tenant)])

    @_rpc("job.events")
    async def JobEvents(self, tenant, request, context) -> AsyncIterator[pb.JobEvent]:
        async for event in self.core.jobs.events(tenant, request.job_id, request.after_seq):
            yield pb.JobEvent(seq=event.seq, ts=timestamp(event.ts), kind=event.kind, data_json=json.dumps(event.data))

    @_rpc("job.cancel")
    async def CancelJob(self, tenant, request, context):
        return job_message(await self.core.jobs.cancel(tenant, request.job_id))

    @_rpc("job.artifact")
    async def GetArtifact(self, tenant, request, context) -> AsyncIterator[pb.FileData]:
        async for chunk in _chunks(await self.core.jobs.artifact(tenant, request.job_id, request.name)):
            yield chunk

    @_rpc("job.log")
    async def GetJobLog(self, tenant, request, context) -> AsyncIterator[pb.FileData]:
        async for chunk in _chunks(await self.core.jobs.log_file(tenant, request.job_id, request.name)):
            yield chunk

    @_rpc("regression.submit")
    async def SubmitRegression(self, tenant, request, context):
        return job_message(await self.core.jobs.submit_regression(tenant, regression_request(request)))

    @_rpc("regression.get")
    async def GetRegression(self, tenant, request, context):
        return job_message(await self.core.jobs.get(tenant, request.job_id, regression=True))


async def start_grpc(core: CellForgeCore, host: str, port: int,
                     limits: GrpcLimits | None = None) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server with the CellForge service, health checking and reflection; returns its port."""
    limits = limits or GrpcLimits()
    server = grpc.aio.server(interceptors=[AuthInterceptor(core)], options=limits.options(),
                             maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    pb_grpc.add_CellForgeServicer_to_server(CellForgeServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
