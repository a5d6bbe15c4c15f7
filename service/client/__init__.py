"""A Python client for CellForge servers, over HTTP or gRPC with the same methods and errors.

    client = CellForgeClient("http://127.0.0.1:8000", api_key)            # or
    client = CellForgeClient("127.0.0.1:50051", api_key, transport="grpc")
    sb = client.create_sandbox(memory="1g")
    result = client.execute(sb["id"], "print(1)", on_event=print)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from sandbox.events import ExecutionResult

from .errors import APIError, AuthenticationError, InvalidRequestError, NotFoundError, QuotaError

FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})


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

    def create_sandbox(self, **spec: Any) -> dict[str, Any]:
        """A new sandbox; `spec` fields: image, cpus, memory, gpus, timeout, workspace_quota, env, dataset_id."""
        return self._t.create_sandbox(spec)

    def get_sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return self._t.get_sandbox(sandbox_id)

    def list_sandboxes(self) -> list[dict[str, Any]]:
        return self._t.list_sandboxes()

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._t.delete_sandbox(sandbox_id)

    def stream(self, sandbox_id: str, code: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Events as dicts while the code runs; the last is `{"kind": "done", "result": {...}}`.
        Stopping early (closing the iterator) interrupts the code on the server."""
        return self._t.stream(sandbox_id, code, timeout)

    def execute(self, sandbox_id: str, code: str, timeout: float | None = None,
                on_event: Callable[[dict[str, Any]], None] | None = None) -> ExecutionResult:
        for event in self.stream(sandbox_id, code, timeout):
            if event["kind"] == "done":
                return ExecutionResult.model_validate(event["result"])
            if event["kind"] == "failed":
                error = event["error"]
                raise APIError(500, error["type"], error["message"])
            if on_event is not None:
                on_event(event)
        raise APIError(502, "StreamEnded", f"the execution stream of sandbox {sandbox_id} ended without a result")

    def interrupt(self, sandbox_id: str) -> None:
        self._t.interrupt(sandbox_id)

    def restart(self, sandbox_id: str) -> None:
        self._t.restart(sandbox_id)

    def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._t.put_file(sandbox_id, path, data)

    def get_file(self, sandbox_id: str, path: str) -> bytes:
        return self._t.get_file(sandbox_id, path)

    # -- datasets, jobs, regressions ---------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        return self._t.upload_dataset(path, name or path.name)

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._t.list_datasets()

    def submit_job(self, dataset_id: str, task: str, **options: Any) -> dict[str, Any]:
        return self._t.submit_job(dataset_id, task, options)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._t.get_job(job_id)

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._t.list_jobs()

    def job_events(self, job_id: str, after_seq: int = 0) -> Iterator[dict[str, Any]]:
        """Recorded events after `after_seq`, then live ones until the job ends."""
        return self._t.job_events(job_id, after_seq)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._t.cancel_job(job_id)

    def get_artifact(self, job_id: str, name: str) -> bytes:
        return self._t.get_artifact(job_id, name)

    def submit_regression(self, **request: Any) -> dict[str, Any]:
        return self._t.submit_regression(request)

    def get_regression(self, job_id: str) -> dict[str, Any]:
        return self._t.get_regression(job_id)

    def wait(self, job_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll a job (or regression run) until it ends; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self._t.get_job(job_id)
            if job["status"] in FINAL_JOB_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g}s")
            time.sleep(poll)


__all__ = [
    "APIError",
    "AuthenticationError",
    "CellForgeClient",
    "InvalidRequestError",
    "NotFoundError",
    "QuotaError",
]
