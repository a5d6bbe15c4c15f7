"""The gRPC transport of the client (a synchronous grpcio channel)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from service.api.proto.cellforge.v1 import cellforge_pb2 as pb
from service.api.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc

from .errors import api_error

_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}
UPLOAD_CHUNK = 1 << 20
MAX_MESSAGE_BYTES = 65 << 20  # the server takes a 64 MiB file plus its path


def struct(data: dict[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if data:
        message.update(data)
    return message


def _translate(exc: grpc.RpcError) -> Exception:
    code = exc.code()
    retry = dict(exc.trailing_metadata() or ()).get("retry-after")
    status = _STATUS.get(code, 500)
    details = exc.details() or ""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry is None:
        status = 413  # a size limit, not a quota: there is nothing to wait for
    return api_error(status, code.name, details, float(retry) if retry else None)


def _calls(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    return wrapper


def _streams(method: Callable) -> Callable:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise _translate(exc) from None

    return wrapper


def _dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def _job(message: pb.Job) -> dict[str, Any]:
    job = _dict(message)
    for key in ("phase", "error"):
        job[key] = job[key] or None
    for key in ("started_at", "finished_at"):
        job[key] = job[key] or None
    return job


class GrpcTransport:
    def __init__(self, target: str, api_key: str, timeout: float) -> None:
        self._channel = grpc.insecure_channel(target.removeprefix("grpc://"), options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self._stub = pb_grpc.CellForgeStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _unary(self, name: str, request: Any) -> Any:
        return getattr(self._stub, name)(request, metadata=self._metadata, timeout=self._timeout)

    @_calls
    def create_sandbox(self, spec: dict[str, Any]) -> dict[str, Any]:
        return _dict(self._unary("CreateSandbox", pb.CreateSandboxRequest(spec=struct(spec))))

    @_calls
    def get_sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return _dict(self._unary("GetSandbox", pb.SandboxRef(sandbox_id=sandbox_id)))

    @_calls
    def list_sandboxes(self) -> list[dict[str, Any]]:
        return [_dict(s) for s in self._unary("ListSandboxes", pb.ListRequest()).sandboxes]

    @_calls
    def delete_sandbox(self, sandbox_id: str) -> None:
        self._unary("DeleteSandbox", pb.SandboxRef(sandbox_id=sandbox_id))

    @_streams
    def stream(self, sandbox_id: str, code: str, timeout: float | None) -> Iterator[dict[str, Any]]:
        call = self._stub.Execute(pb.ExecuteRequest(sandbox_id=sandbox_id, code=code, timeout=timeout or 0),
                                  metadata=self._metadata)
        try:
            for event in call:
                if event.kind == "done":
                    yield {"kind": "done", "result": _dict(event.result)}
                    continue
                item = {"kind": event.kind, **json_format.MessageToDict(event.data)}
                if event.kind in ("stdout", "stderr"):
                    item["text"] = event.text
                yield item
        finally:
            call.cancel()  # a consumer that stops early interrupts the execution on the server

    @_calls
    def interrupt(self, sandbox_id: str) -> None:
        self._unary("Interrupt", pb.SandboxRef(sandbox_id=sandbox_id))

    @_calls
    def restart(self, sandbox_id: str) -> None:
        self._unary("Restart", pb.SandboxRef(sandbox_id=sandbox_id))

    @_calls
    def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._unary("PutFile", pb.PutFileRequest(sandbox_id=sandbox_id, path=path, data=data))

    @_calls
    def get_file(self, sandbox_id: str, path: str) -> bytes:
        return self._unary("GetFile", pb.FileRef(sandbox_id=sandbox_id, path=path)).data

    @_calls
    def upload_dataset(self, path: Path, name: str) -> dict[str, Any]:
        def chunks() -> Iterator[pb.DatasetChunk]:
            with path.open("rb") as fh:
                first = True
                while (data := fh.read(UPLOAD_CHUNK)) or first:
                    yield pb.DatasetChunk(name=name if first else "", data=data)
                    first = False

        return _dict(self._stub.UploadDataset(chunks(), metadata=self._metadata, timeout=self._timeout))

    @_calls
    def list_datasets(self) -> list[dict[str, Any]]:
        return [_dict(d) for d in self._unary("ListDatasets", pb.ListRequest()).datasets]

    @_calls
    def submit_job(self, dataset_id: str, task: str, options: dict[str, Any]) -> dict[str, Any]:
        return _job(self._unary("SubmitJob", pb.SubmitJobRequest(dataset_id=dataset_id, task=task,
                                                                 options=struct(options))))

    @_calls
    def get_job(self, job_id: str) -> dict[str, Any]:
        return _job(self._unary("GetJob", pb.JobRef(job_id=job_id)))

    @_calls
    def list_jobs(self) -> list[dict[str, Any]]:
        return [_job(j) for j in self._unary("ListJobs", pb.ListRequest()).jobs]

    @_streams
    def job_events(self, job_id: str, after_seq: int) -> Iterator[dict[str, Any]]:
        call = self._stub.JobEvents(pb.JobEventsRequest(job_id=job_id, after_seq=after_seq), metadata=self._metadata)
        try:
            for event in call:
                yield {"seq": event.seq, "ts": event.ts, "kind": event.kind,
                       "data": json_format.MessageToDict(event.data)}
        finally:
            call.cancel()

    @_calls
    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return _job(self._unary("CancelJob", pb.JobRef(job_id=job_id)))

    @_calls
    def get_artifact(self, job_id: str, name: str) -> bytes:
        return self._unary("GetArtifact", pb.ArtifactRef(job_id=job_id, name=name)).data

    @_calls
    def submit_regression(self, request: dict[str, Any]) -> dict[str, Any]:
        return _job(self._unary("SubmitRegression", pb.SubmitRegressionRequest(request=struct(request))))

    @_calls
    def get_regression(self, job_id: str) -> dict[str, Any]:
        return _job(self._unary("GetRegression", pb.JobRef(job_id=job_id)))
