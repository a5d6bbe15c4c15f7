"""Where code runs: hardened Docker sandboxes (and a local, non-isolated backend) driving Jupyter kernels.

    backend = new_backend("docker")                  # or DockerBackend(), LocalBackend()
    async with await backend.create(SandboxSpec()) as sb:
        await sb.files.put("code/model.py", data)
        result = await sb.commands.run(["python", "code/model.py"])
        result = await sb.execute("1 + 1")

`RayBackend` (sandbox.ray_backend, the `cellforge[ray]` extra) spreads sandboxes over a Ray cluster.
Knows nothing of agents, biology or the service. Names that need the Docker SDK, ZMQ or Jupyter
are imported on first use, so a process that only reads results (a remote client) does not load them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .backend import BackendHealth, BackendKind, KernelHost, ReapReport, SandboxBackend, backend_class, new_backend
from .errors import (
    CapacityError,
    FileTransferError,
    PoolClosed,
    PoolError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SandboxReaped,
    SandboxStartError,
    SpecError,
    UsageError,
    WarmupFailed,
    WorkspacePathError,
    WorkspaceQuotaError,
)
from .events import (
    AnyStreamEvent,
    DisplayEvent,
    ErrorEvent,
    ExecutionResult,
    Outcome,
    ResultEvent,
    StatusEvent,
    StderrEvent,
    StdoutEvent,
    StreamEvent,
    StreamEventAdapter,
    TruncatedEvent,
)
from .spec import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE, Mount, SandboxSpec, parse_size

if TYPE_CHECKING:
    from .commands import Commands
    from .docker_backend import DockerBackend
    from .files import Files
    from .kernel import Sandbox
    from .local_backend import LocalBackend
    from .pool import PooledSandbox, PoolStats, SandboxPool
    from .provider import BackendProvider, SandboxProvider
    from .ray_backend import RayBackend, RaySandbox
    from .runtimes import RUNC, RUNSC, engine_runtimes, require_runtime
    from .sync import SyncSandbox

_LAZY = {
    "BackendProvider": "provider",
    "Commands": "commands",
    "DockerBackend": "docker_backend",
    "Files": "files",
    "LocalBackend": "local_backend",
    "PoolStats": "pool",
    "PooledSandbox": "pool",
    "RUNC": "runtimes",
    "RUNSC": "runtimes",
    "RayBackend": "ray_backend",
    "RaySandbox": "ray_backend",
    "Sandbox": "kernel",
    "SandboxPool": "pool",
    "SandboxProvider": "provider",
    "SyncSandbox": "sync",
    "engine_runtimes": "runtimes",
    "require_runtime": "runtimes",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CPU_IMAGE",
    "DEFAULT_GPU_IMAGE",
    "RUNC",
    "RUNSC",
    "AnyStreamEvent",
    "BackendHealth",
    "BackendKind",
    "BackendProvider",
    "CapacityError",
    "Commands",
    "DisplayEvent",
    "DockerBackend",
    "ErrorEvent",
    "ExecutionResult",
    "FileTransferError",
    "Files",
    "KernelHost",
    "LocalBackend",
    "Mount",
    "Outcome",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PooledSandbox",
    "RayBackend",
    "RaySandbox",
    "ReapReport",
    "ResultEvent",
    "Sandbox",
    "SandboxBackend",
    "SandboxClosedError",
    "SandboxDeadError",
    "SandboxError",
    "SandboxPool",
    "SandboxProvider",
    "SandboxReaped",
    "SandboxSpec",
    "SandboxStartError",
    "SpecError",
    "StatusEvent",
    "StderrEvent",
    "StdoutEvent",
    "StreamEvent",
    "StreamEventAdapter",
    "SyncSandbox",
    "TruncatedEvent",
    "UsageError",
    "WarmupFailed",
    "WorkspacePathError",
    "WorkspaceQuotaError",
    "backend_class",
    "engine_runtimes",
    "new_backend",
    "parse_size",
    "require_runtime",
]


def __dir__() -> list[str]:
    return sorted(__all__)
