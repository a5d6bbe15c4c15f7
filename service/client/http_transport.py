"""The HTTP transport of the client (httpx)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.protocol import DatasetInfo, DatasetList, FileList, JobEvent, JobInfo, JobList, SandboxInfo, SandboxList

from .errors import api_error

DOWNLOAD_CHUNK = 1 << 20


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    response.read()
    try:
        error = response.json()["error"]
        kind, message = error["type"], error["message"]
    except (ValueError, KeyError, TypeError):
        kind, message = "HTTPError", response.text[:500]
    retry = response.headers.get("retry-after")
    raise api_error(response.status_code, kind, message, float(retry) if retry else None)


class HttpTransport:
    def __init__(self, url: str, api_key: str, timeout: float) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"},
                                  timeout=httpx.Timeout(timeout, read=None))

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    @contextlib.contextmanager
    def _lines(self, method: str, path: str, **kwargs: Any) -> Iterator[Iterator[str]]:
        """The answer's non-empty lines; leaving the block closes the connection at once (which, for an
        execution, interrupts the code on the server)."""
        with self._http.stream(method, path, **kwargs) as response:
            _raise_for(response)
            yield (line for line in response.iter_lines() if line.strip())

    def create_sandbox(self, spec: dict[str, Any]) -> SandboxInfo:
        return SandboxInfo.model_validate_json(self._call("POST", "/v1/sandboxes", json=spec).content)

    def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return SandboxInfo.model_validate_json(self._call("GET", f"/v1/sandboxes/{sandbox_id}").content)

    def list_sandboxes(self) -> list[SandboxInfo]:
        return SandboxList.model_validate_json(self._call("GET", "/v1/sandboxes").content).sandboxes

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._call("DELETE", f"/v1/sandboxes/{sandbox_id}")

    def stream(self, sandbox_id: str, code: str, timeout: float | None) -> Iterator[dict[str, Any]]:
        with self._lines("POST", f"/v1/sandboxes/{sandbox_id}/execute", json={"code": code, "timeout": timeout}) as lines:
            for line in lines:
                yield json.loads(line)

    def interrupt(self, sandbox_id: str) -> None:
        self._call("POST", f"/v1/sandboxes/{sandbox_id}/interrupt")

    def restart(self, sandbox_id: str) -> None:
        self._call("POST", f"/v1/sandboxes/{sandbox_id}/restart")

    def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._call("PUT", f"/v1/sandboxes/{sandbox_id}/files/{path}", content=data)

    def get_file(self, sandbox_id: str, path: str) -> bytes:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/files/{path}").content

    def list_files(self, sandbox_id: str, folder: str) -> list[str]:
        return FileList.model_validate_json(self._call("GET", f"/v1/sandboxes/{sandbox_id}/files",
                                                       params={"folder": folder}).content).files

    def run_command(self, sandbox_id: str, argv: list[str], cwd: str | None, timeout: float | None) -> dict[str, Any]:
        return self._call("POST", f"/v1/sandboxes/{sandbox_id}/commands",
                          json={"argv": argv, "cwd": cwd, "timeout": timeout}).json()

    def upload_dataset(self, path: Path, name: str) -> DatasetInfo:
        with path.open("rb") as fh:
            return DatasetInfo.model_validate_json(self._call(
                "POST", "/v1/datasets", params={"name": name}, content=fh,
                headers={"Content-Type": "application/octet-stream"}).content)

    def find_dataset(self, sha256: str) -> DatasetInfo | None:
        response = self._http.get(f"/v1/datasets/sha256/{sha256}")
        if response.status_code == 404:
            return None
        _raise_for(response)
        return DatasetInfo.model_validate_json(response.content)

    def list_datasets(self) -> list[DatasetInfo]:
        return DatasetList.model_validate_json(self._call("GET", "/v1/datasets").content).datasets

    def submit_job(self, dataset_id: str, task: str, options: dict[str, Any]) -> JobInfo:
        return JobInfo.model_validate_json(self._call("POST", "/v1/jobs", json={
            "dataset_id": dataset_id, "task": task, "options": options}).content)

    def get_job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate_json(self._call("GET", f"/v1/jobs/{job_id}").content)

    def list_jobs(self) -> list[JobInfo]:
        return JobList.model_validate_json(self._call("GET", "/v1/jobs").content).jobs

    def job_events(self, job_id: str, after_seq: int) -> Iterator[JobEvent]:
        with self._lines("GET", f"/v1/jobs/{job_id}/events", params={"after_seq": after_seq}) as lines:
            for line in lines:
                yield JobEvent.model_validate_json(line)

    def cancel_job(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate_json(self._call("POST", f"/v1/jobs/{job_id}/cancel").content)

    def artifact_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
            _raise_for(response)
            yield from response.iter_bytes(DOWNLOAD_CHUNK)

    def log_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        with self._http.stream("GET", f"/v1/jobs/{job_id}/logs/{name}") as response:
            _raise_for(response)
            yield from response.iter_bytes(DOWNLOAD_CHUNK)

    def submit_regression(self, request: dict[str, Any]) -> JobInfo:
        return JobInfo.model_validate_json(self._call("POST", "/v1/regressions", json=request).content)

    def get_regression(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate_json(self._call("GET", f"/v1/regressions/{job_id}").content)
