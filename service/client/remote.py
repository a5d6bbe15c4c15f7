"""What the command line does against a remote server (`--server URL --api-key K`): run one script in a
fresh sandbox, or run a whole design job and fetch its outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sandbox.events import ExecutionResult, StreamEvent

from . import CellForgeClient


def run_script(url: str, api_key: str, code: str, *, transport: Literal["http", "grpc"] = "http",
               on_event: Callable[[StreamEvent], None] | None = None, **spec: Any) -> tuple[str, ExecutionResult]:
    """Run `code` in a new sandbox on the server (spec: image, cpus, memory, gpus, timeout), streaming its
    typed events to `on_event`; the sandbox is deleted afterwards. Returns (sandbox id, result)."""
    with CellForgeClient(url, api_key, transport=transport) as client:
        sandbox = client.create_sandbox(**{k: v for k, v in spec.items() if v is not None}).id
        try:
            return sandbox, client.execute(sandbox, code, timeout=spec.get("timeout"), on_event=on_event)
        finally:
            client.delete_sandbox(sandbox)


def run_design(url: str, api_key: str, data: Path, task: str, *, transport: Literal["http", "grpc"] = "http",
               on_event: Callable[[dict[str, Any]], None] | None = None, download_to: Path | None = None,
               **options: Any) -> dict[str, Any]:
    """Run a design job on `data` (uploaded unless the server has these bytes already) and follow its
    events (`on_event` gets each event as JSON: kind, seq, ts, data with phase/message/round/attempt/
    epoch/losses); the job's artifacts are streamed into `download_to`. Returns the finished job as JSON."""
    with CellForgeClient(url, api_key, transport=transport) as client:
        dataset = client.upload_dataset(data)
        job = client.submit_job(dataset.id, task, **{k: v for k, v in options.items() if v is not None})
        for event in client.job_events(job.id):
            if on_event is not None:
                on_event(event.model_dump(mode="json"))
        job = client.get_job(job.id)
        if download_to is not None:
            download_to.mkdir(parents=True, exist_ok=True)
            for name in job.artifacts:
                client.download_artifact(job.id, name, download_to / name)
        return job.model_dump(mode="json")
