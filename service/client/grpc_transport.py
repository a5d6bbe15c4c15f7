"""The gRPC transport of the client (a synchronous grpcio channel)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from service.protocol import DatasetInfo, JobEvent, JobInfo, SandboxInfo
from service.protocol.proto.cellforge.v1 import cellforge_pb2 as pb
from service.protocol.proto.cellforge.v1 import cellforge_pb2_grpc as pb_grpc

from .errors import InvalidRequestError, api_error

_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
}
UPLOAD_CHUNK = 1 << 20
MAX_MESSAGE_BYTES = 65 << 20  # the server takes a 64 MiB file plus its path


def typed(message: Message, data: dict[str, Any] | None, what: str) -> Message:
    """`data` as the typed request `message`; a field it does not have is refused by name here, before any
    call (the HTTP API answers 422 UnknownFields for the same body)."""
    try:
        return json_format.ParseDict(data or {}, message)
    except json_format.ParseError as exc:
        raise InvalidRequestError(422, "UnknownFields" if "has no field named" in str(exc) else "InvalidArgument",
                                  f"{what}: {exc}") from None


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


def _time(message: Any, field: str) -> datetime | None:
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC) if message.HasField(field) else None


def _sandbox(m: pb.Sandbox) -> SandboxInfo:
    return SandboxInfo(id=m.id, status=m.status, created_at=_time(m, "created_at"), spec=json.loads(m.spec_json or "{}"),
                       dataset_id=m.dataset_id or None)


def _dataset(m: pb.Dataset) -> DatasetInfo:
    return DatasetInfo(id=m.id, name=m.name, size_bytes=m.size_bytes, created_at=_time(m, "created_at"),
                       layout=json.loads(m.layout_json or "{}"), reused=m.reused)


def _job(m: pb.Job) -> JobInfo:
    return JobInfo(
        id=m.id, kind=m.kind, status=m.status, phase=m.phase if m.HasField("phase") else None,
        error=m.error if m.HasField("error") else None, created_at=_time(m, "created_at"),
        started_at=_time(m, "started_at"), finished_at=_time(m, "finished_at"), attempts=m.attempts,
        params=json.loads(m.params_json or "{}"), result=json.loads(m.result_json) if m.result_json else None,
        artifacts=list(m.artifacts), final=m.final, logs=list(m.logs))


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
    def create_sandbox(self, spec: dict[str, Any]) -> SandboxInfo:
        return _sandbox(self._unary("CreateSandbox", pb.CreateSandboxRequest(spec=typed(pb.SandboxSpec(), spec, "sandbox spec"))))

    @_calls
    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return _sandbox(self._unary("GetSandbox", pb.SandboxRef(sandbox_id=sandbox_id)))

    @_calls
    def list_sandboxes(self) -> list[SandboxInfo]:
        return [_sandbox(s) for s in self._unary("ListSandboxes", pb.ListRequest()).sandboxes]

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
                item = {"kind": event.kind, **json.loads(event.data_json or "{}")}
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
    def list_files(self, sandbox_id: str, folder: str) -> list[str]:
        return list(self._unary("ListFiles", pb.FileRef(sandbox_id=sandbox_id, path=folder)).files)

    @_calls
    def run_command(self, sandbox_id: str, argv: list[str], cwd: str | None, timeout: float | None) -> dict[str, Any]:
        return _dict(self._unary("RunCommand", pb.CommandRequest(sandbox_id=sandbox_id, argv=argv, cwd=cwd or "",
                                                                 timeout=timeout or 0)))

    @_calls
    def upload_dataset(self, path: Path, name: str) -> DatasetInfo:
        def chunks() -> Iterator[pb.DatasetChunk]:
            with path.open("rb") as fh:
                first = True
                while (data := fh.read(UPLOAD_CHUNK)) or first:
                    yield pb.DatasetChunk(name=name if first else "", data=data)
                    first = False

        return _dataset(self._stub.UploadDataset(chunks(), metadata=self._metadata, timeout=self._timeout))

    def find_dataset(self, sha256: str) -> DatasetInfo | None:
        try:
            return _dataset(self._unary("FindDataset", pb.DatasetDigest(sha256=sha256)))
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise _translate(exc) from None

    @_calls
    def list_datasets(self) -> list[DatasetInfo]:
        return [_dataset(d) for d in self._unary("ListDatasets", pb.ListRequest()).datasets]

    @_calls
    def submit_job(self, dataset_id: str, task: str, options: dict[str, Any]) -> JobInfo:
        return _job(self._unary("SubmitJob", pb.SubmitJobRequest(
            dataset_id=dataset_id, task=task, options=typed(pb.DesignOptions(), options, "design options"))))

    @_calls
    def get_job(self, job_id: str) -> JobInfo:
        return _job(self._unary("GetJob", pb.JobRef(job_id=job_id)))

    @_calls
    def list_jobs(self) -> list[JobInfo]:
        return [_job(j) for j in self._unary("ListJobs", pb.ListRequest()).jobs]

    @_streams
    def job_events(self, job_id: str, after_seq: int) -> Iterator[JobEvent]:
        call = self._stub.JobEvents(pb.JobEventsRequest(job_id=job_id, after_seq=after_seq), metadata=self._metadata)
        try:
            for event in call:
                yield JobEvent(seq=event.seq, ts=_time(event, "ts"), kind=event.kind, data=json.loads(event.data_json))
        finally:
            call.cancel()

    @_calls
    def cancel_job(self, job_id: str) -> JobInfo:
        return _job(self._unary("CancelJob", pb.JobRef(job_id=job_id)))

    def artifact_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        return self._download("GetArtifact", job_id, name)

    def log_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        return self._download("GetJobLog", job_id, name)

    @_streams
    def _download(self, method: str, job_id: str, name: str) -> Iterator[bytes]:
        call = getattr(self._stub, method)(pb.ArtifactRef(job_id=job_id, name=name), metadata=self._metadata)
        try:
            for chunk in call:
                yield chunk.data
        finally:
            call.cancel()

    @_calls
    def submit_regression(self, request: dict[str, Any]) -> JobInfo:
        fields = dict(request)
        kind = fields.pop("kind", None)
        kinds = pb.SubmitRegressionRequest.DESCRIPTOR.oneofs_by_name["kind"].fields
        body = {f.name: f.message_type for f in kinds}
        if kind not in body:
            raise InvalidRequestError(422, "InvalidArgument", f"regression kind: expected one of {sorted(body)}, "
                                      f"got {kind!r}")
        message = typed(getattr(pb, body[kind].name)(), fields, f"{kind} regression")
        return _job(self._unary("SubmitRegression", pb.SubmitRegressionRequest(**{kind: message})))

    @_calls
    def get_regression(self, job_id: str) -> JobInfo:
        return _job(self._unary("GetRegression", pb.JobRef(job_id=job_id)))
