"""A Python client for CellForge servers, over HTTP or gRPC with the same methods, typed answers
(`service.protocol` models) and errors.

    with Sandbox(url, api_key) as sb:                                     # E2B-shaped (see .sandbox)
        execution = sb.run_code("print(1)", on_stdout=print)

    client = CellForgeClient("http://127.0.0.1:8000", api_key)            # or
    client = CellForgeClient("127.0.0.1:50051", api_key, transport="grpc")
    sb = client.create_sandbox(memory="1g")
    result = client.execute(sb.id, "print(1)", on_event=print)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from sandbox.events import ExecutionResult, StreamEvent, StreamEventAdapter
from service.protocol import FINAL_JOB_STATES, DatasetInfo, JobEvent, JobInfo, SandboxInfo

from .errors import APIError, AuthenticationError, InvalidRequestError, NotFoundError, QuotaError, api_error

class CellForgeClient:
    def __init__(self, url: str, api_key: str, transport: Literal["http", "grpc"] = "http",
                 timeout: float = 120.0) -> None:
        if transport == "http":
            from .http_transport import HttpTransport

            self._t: Any = HttpTransport(url, api_key, timeout)
        elif transport == "grpc":
            from .grpc_transport import GrpcTransport

            self._t = GrpcTransport(url, api_key, timeout)
        else:
            raise ValueError(f"transport: expected 'http' or 'grpc', got {transport!r}")
        self.transport = transport

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> CellForgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sandboxes ---------------------------------------------------------------------------------

    def create_sandbox(self, **spec: Any) -> SandboxInfo:
        """A new sandbox; `spec` fields: image, cpus, memory, gpus, timeout, workspace_quota, env, dataset_id."""
        return self._t.create_sandbox(spec)

    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return self._t.get_sandbox(sandbox_id)

    def list_sandboxes(self) -> list[SandboxInfo]:
        return self._t.list_sandboxes()

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._t.delete_sandbox(sandbox_id)

    def stream(self, sandbox_id: str, code: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The raw wire events while the code runs; the last is `{"kind": "done", "result": {...}}`.
        Stopping early (closing the iterator) interrupts the code on the server."""
        return self._t.stream(sandbox_id, code, timeout)

    def execute(self, sandbox_id: str, code: str, timeout: float | None = None,
                on_event: Callable[[StreamEvent], None] | None = None) -> ExecutionResult:
        """Run `code`, each typed event (stdout, stderr, display, result, error, ...) to `on_event` as it comes."""
        for event in self.stream(sandbox_id, code, timeout):
            if event["kind"] == "done":
                return ExecutionResult.model_validate(event["result"])
            if event["kind"] == "failed":
                error = event["error"]
                # A failure after the stream began (the sandbox closed through another replica meanwhile)
                # is the same typed error as one before it.
                raise api_error(int(event.get("status", 500)), error["type"], error["message"])
            if on_event is not None:
                on_event(StreamEventAdapter.validate_python(event))
        raise APIError(502, "StreamEnded", f"the execution stream of sandbox {sandbox_id} ended without a result")

    def interrupt(self, sandbox_id: str) -> None:
        self._t.interrupt(sandbox_id)

    def restart(self, sandbox_id: str) -> None:
        self._t.restart(sandbox_id)

    def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._t.put_file(sandbox_id, path, data)

    def get_file(self, sandbox_id: str, path: str) -> bytes:
        return self._t.get_file(sandbox_id, path)

    def list_files(self, sandbox_id: str, folder: str = "") -> list[str]:
        return self._t.list_files(sandbox_id, folder)

    def run_command(self, sandbox_id: str, argv: list[str], cwd: str | None = None,
                    timeout: float | None = None) -> ExecutionResult:
        """`argv` run without a shell; `outcome` ok only for exit code 0 (`exit_code`)."""
        return ExecutionResult.model_validate(self._t.run_command(sandbox_id, argv, cwd, timeout))

    # -- datasets, jobs, regressions ---------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None) -> DatasetInfo:
        """The dataset for this file: the stored one when the tenant has these bytes already (`reused`,
        found by SHA-256 without sending the file), else the upload."""
        path = Path(path)
        found = self.find_dataset(file_sha256(path))
        if found is not None:
            return found.model_copy(update={"reused": True})
        return self._t.upload_dataset(path, name or path.name)

    def find_dataset(self, sha256: str) -> DatasetInfo | None:
        """The tenant's dataset whose file has this SHA-256, or None."""
        return self._t.find_dataset(sha256)

    def list_datasets(self) -> list[DatasetInfo]:
        return self._t.list_datasets()

    def submit_job(self, dataset_id: str, task: str, **options: Any) -> JobInfo:
        return self._t.submit_job(dataset_id, task, options)

    def get_job(self, job_id: str) -> JobInfo:
        return self._t.get_job(job_id)

    def list_jobs(self) -> list[JobInfo]:
        return self._t.list_jobs()

    def job_events(self, job_id: str, after_seq: int = 0) -> Iterator[JobEvent]:
        """Recorded events after `after_seq`, then live ones until the job ends."""
        return self._t.job_events(job_id, after_seq)

    def cancel_job(self, job_id: str) -> JobInfo:
        return self._t.cancel_job(job_id)

    def get_artifact(self, job_id: str, name: str) -> bytes:
        return b"".join(self._t.artifact_chunks(job_id, name))

    def download_artifact(self, job_id: str, name: str, target: str | Path) -> Path:
        """Stream an artifact into the file `target` (chunk by chunk, never whole in memory)."""
        return _write(Path(target), self._t.artifact_chunks(job_id, name))

    def job_logs(self, job_id: str) -> list[str]:
        """Paths of the job's attempt logs (training output per attempt and fold)."""
        return self.get_job(job_id).logs

    def job_log(self, job_id: str, path: str) -> str:
        return b"".join(self._t.log_chunks(job_id, path)).decode("utf-8", "replace")

    def submit_regression(self, **request: Any) -> JobInfo:
        return self._t.submit_regression(request)

    def get_regression(self, job_id: str) -> JobInfo:
        return self._t.get_regression(job_id)

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> JobInfo:
        """Poll a job (or regression run) until it ends; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self._t.get_job(job_id)
            if job.status in FINAL_JOB_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout:g}s")
            time.sleep(poll)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write(target: Path, chunks: Iterator[bytes]) -> Path:
    partial = target.with_name(target.name + ".part")
    try:
        with partial.open("wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return target


from .sandbox import (  # noqa: E402 - it builds on CellForgeClient
    AsyncSandbox,
    CommandResult,
    EntryInfo,
    Execution,
    ExecutionError,
    Logs,
    Result,
    Sandbox,
)

__all__ = [
    "APIError",
    "AsyncSandbox",
    "AuthenticationError",
    "CellForgeClient",
    "CommandResult",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "InvalidRequestError",
    "Logs",
    "NotFoundError",
    "QuotaError",
    "Result",
    "Sandbox",
]
