"""The gRPC transport (grpc.aio): `cellforge.v1.CellForge` over `CellForgeCore`, plus health and reflection."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sandbox import ExecutionResult

from .core import CellForgeCore
from .errors import BadRequest, ServiceError
from .proto.cellforge.v1 import cellforge_pb2 as pb
from .proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc
from .sandboxes import parse_request
from .tenants import Tenant

TRANSPORT = "grpc"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CellForge"].full_name
MAX_MESSAGE_BYTES = 64 << 20


def struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if data:
        message.update(data)
    return message


def plain(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


async def _abort(context: grpc.aio.ServicerContext, exc: ServiceError) -> None:
    if hasattr(exc, "retry_after"):
        context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))


def _rpc(action: str) -> Callable:
    """Authenticate, audit and translate errors for one RPC (unary or server-streaming)."""

    def wrap(method: Callable) -> Callable:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(self: CellForgeServicer, request: Any, context: grpc.aio.ServicerContext):
                try:
                    tenant = await self._tenant(context, action)
                    with self.core.audited(tenant, TRANSPORT, action, _resource(request)):
                        async for item in method(self, tenant, request, context):
                            yield item
                except ServiceError as exc:
                    await _abort(context, exc)

            return streaming

        @functools.wraps(method)
        async def unary(self: CellForgeServicer, request: Any, context: grpc.aio.ServicerContext):
            try:
                tenant = await self._tenant(context, action)
                with self.core.audited(tenant, TRANSPORT, action, _resource(request)):
                    return await method(self, tenant, request, context)
            except ServiceError as exc:
                await _abort(context, exc)

        return unary

    return wrap


def _resource(request: Any) -> str | None:
    for name in ("sandbox_id", "job_id"):
        value = getattr(request, name, None)
        if value:
            return value
    return None


def sandbox_message(info: Any) -> pb.Sandbox:
    return pb.Sandbox(id=info.id, status=info.status, created_at=info.created_at, spec=struct(info.spec),
                      dataset_id=info.dataset_id or "")


def result_message(res: ExecutionResult) -> pb.ExecutionResult:
    return pb.ExecutionResult(
        outcome=res.outcome.value, stdout=res.stdout, stderr=res.stderr, ename=res.ename or "",
        evalue=res.evalue or "", traceback=res.traceback, died_cause=res.died_cause or "",
        duration_ms=res.duration_ms, stdout_bytes=res.stdout_bytes, truncated=res.truncated,
        result=res.result or "", state_lost=res.state_lost,
    )


def job_message(job: dict[str, Any]) -> pb.Job:
    return pb.Job(
        id=job["id"], kind=job["kind"], status=job["status"], phase=job.get("phase") or "",
        error=job.get("error") or "", created_at=job["created_at"], started_at=job.get("started_at") or 0.0,
        finished_at=job.get("finished_at") or 0.0, params=struct(job.get("params")),
        result=struct(job.get("result")), artifacts=job.get("artifacts", []),
    )


def dataset_message(ds: dict[str, Any]) -> pb.Dataset:
    return pb.Dataset(id=ds["id"], name=ds["name"], size_bytes=ds["size_bytes"], created_at=ds["created_at"],
                      layout=struct(ds.get("layout")))


class CellForgeServicer(pb_grpc.CellForgeServicer):
    def __init__(self, core: CellForgeCore) -> None:
        self.core = core

    async def _tenant(self, context: grpc.aio.ServicerContext, action: str) -> Tenant:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        return await self.core.authenticate(metadata.get("authorization"), TRANSPORT, action)

    # -- sandboxes --------------------------------------------------------------------------------

    @_rpc("sandbox.create")
    async def CreateSandbox(self, tenant, request, context):
        info = await self.core.sandboxes.create(tenant, parse_request(plain(request.spec)))
        return sandbox_message(info)

    @_rpc("sandbox.get")
    async def GetSandbox(self, tenant, request, context):
        return sandbox_message(self.core.sandboxes.get(tenant, request.sandbox_id))

    @_rpc("sandbox.list")
    async def ListSandboxes(self, tenant, request, context):
        return pb.SandboxList(sandboxes=[sandbox_message(i) for i in self.core.sandboxes.list(tenant)])

    @_rpc("sandbox.delete")
    async def DeleteSandbox(self, tenant, request, context):
        await self.core.sandboxes.delete(tenant, request.sandbox_id)
        return pb.Empty()

    @_rpc("sandbox.execute")
    async def Execute(self, tenant, request, context) -> AsyncIterator[pb.ExecuteEvent]:
        self.core.sandboxes.get(tenant, request.sandbox_id)
        items = self.core.sandboxes.execute(tenant, request.sandbox_id, request.code, request.timeout or None,
                                            TRANSPORT)
        try:
            async for item in items:
                if isinstance(item, ExecutionResult):
                    yield pb.ExecuteEvent(kind="done", result=result_message(item))
                else:
                    data = item.model_dump(mode="json")
                    yield pb.ExecuteEvent(kind=item.kind, text=data.pop("text", ""), data=struct(data))
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

    # -- datasets ---------------------------------------------------------------------------------

    async def UploadDataset(self, request_iterator, context):
        try:
            tenant = await self._tenant(context, "dataset.upload")
            with self.core.audited(tenant, TRANSPORT, "dataset.upload"):
                first = await anext(aiter(request_iterator), None)
                if first is None:
                    raise BadRequest("UploadDataset: no chunks were sent")

                async def chunks() -> AsyncIterator[bytes]:
                    yield first.data
                    async for chunk in request_iterator:
                        yield chunk.data

                return dataset_message(await self.core.datasets.upload(tenant, first.name or None, chunks()))
        except ServiceError as exc:
            await _abort(context, exc)

    @_rpc("dataset.list")
    async def ListDatasets(self, tenant, request, context):
        return pb.DatasetList(datasets=[dataset_message(d) for d in self.core.datasets.list(tenant)])

    # -- jobs and regressions ---------------------------------------------------------------------

    @_rpc("job.submit")
    async def SubmitJob(self, tenant, request, context):
        job = await self.core.jobs.submit_design(tenant, request.dataset_id, request.task, plain(request.options))
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
            yield pb.JobEvent(seq=event["seq"], ts=event["ts"], kind=event["kind"], data=struct(event["data"]))

    @_rpc("job.cancel")
    async def CancelJob(self, tenant, request, context):
        return job_message(await self.core.jobs.cancel(tenant, request.job_id))

    @_rpc("job.artifact")
    async def GetArtifact(self, tenant, request, context):
        path = await self.core.jobs.artifact(tenant, request.job_id, request.name)
        return pb.FileData(data=path.read_bytes())

    @_rpc("regression.submit")
    async def SubmitRegression(self, tenant, request, context):
        return job_message(await self.core.jobs.submit_regression(tenant, plain(request.request)))

    @_rpc("regression.get")
    async def GetRegression(self, tenant, request, context):
        return job_message(await self.core.jobs.get(tenant, request.job_id, regression=True))


async def start_grpc(core: CellForgeCore, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server with the CellForge service, health checking and reflection; returns its port."""
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    pb_grpc.add_CellForgeServicer_to_server(CellForgeServicer(core), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
