"""The HTTP transport of the client (httpx)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .errors import api_error


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

    def create_sandbox(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/sandboxes", json=spec).json()

    def get_sandbox(self, sandbox_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}").json()

    def list_sandboxes(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/sandboxes").json()["sandboxes"]

    def delete_sandbox(self, sandbox_id: str) -> None:
        self._call("DELETE", f"/v1/sandboxes/{sandbox_id}")

    def stream(self, sandbox_id: str, code: str, timeout: float | None) -> Iterator[dict[str, Any]]:
        with self._http.stream("POST", f"/v1/sandboxes/{sandbox_id}/execute",
                               json={"code": code, "timeout": timeout}) as response:
            _raise_for(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def interrupt(self, sandbox_id: str) -> None:
        self._call("POST", f"/v1/sandboxes/{sandbox_id}/interrupt")

    def restart(self, sandbox_id: str) -> None:
        self._call("POST", f"/v1/sandboxes/{sandbox_id}/restart")

    def put_file(self, sandbox_id: str, path: str, data: bytes) -> None:
        self._call("PUT", f"/v1/sandboxes/{sandbox_id}/files/{path}", content=data)

    def get_file(self, sandbox_id: str, path: str) -> bytes:
        return self._call("GET", f"/v1/sandboxes/{sandbox_id}/files/{path}").content

    def upload_dataset(self, path: Path, name: str) -> dict[str, Any]:
        with path.open("rb") as fh:
            return self._call("POST", "/v1/datasets", params={"name": name}, content=fh,
                              headers={"Content-Type": "application/octet-stream"}).json()

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/datasets").json()["datasets"]

    def submit_job(self, dataset_id: str, task: str, options: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/jobs", json={"dataset_id": dataset_id, "task": task,
                                                    "options": options}).json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}").json()

    def list_jobs(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/jobs").json()["jobs"]

    def job_events(self, job_id: str, after_seq: int) -> Iterator[dict[str, Any]]:
        with self._http.stream("GET", f"/v1/jobs/{job_id}/events", params={"after_seq": after_seq}) as response:
            _raise_for(response)
            for line in response.iter_lines():
                if line.strip():
                    yield json.loads(line)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel").json()

    def get_artifact(self, job_id: str, name: str) -> bytes:
        return self._call("GET", f"/v1/jobs/{job_id}/artifacts/{name}").content

    def submit_regression(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/regressions", json=request).json()

    def get_regression(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/regressions/{job_id}").json()
