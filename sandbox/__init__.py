"""Where code runs: hardened Docker sandboxes (and a local, non-isolated backend) driving Jupyter kernels.

Knows nothing of agents, biology or the service.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    FileTransferError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SandboxStartError,
    SpecError,
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

if TYPE_CHECKING:  # the same names, for type checkers
    from .docker_backend import DockerBackend
    from .images import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE
    from .kernel import KernelHost, Sandbox
    from .local_backend import LocalBackend
    from .pool import (
        PoolClosed,
        PoolError,
        PooledSandbox,
        PoolStats,
        QuotaExceeded,
        SandboxPool,
        SandboxReaped,
        WarmupFailed,
    )
    from .runtimes import RUNC, RUNSC, engine_runtimes, require_runtime
    from .spec import Mount, SandboxSpec, parse_size
    from .sync import SyncSandbox

# The rest pulls in Docker, zmq and the kernel machinery: loaded on first use, so a light importer
# (the service's client, which only needs the event models) stays light.
_LAZY = {
    "DockerBackend": "docker_backend",
    "DEFAULT_CPU_IMAGE": "images",
    "DEFAULT_GPU_IMAGE": "images",
    "KernelHost": "kernel",
    "Sandbox": "kernel",
    "LocalBackend": "local_backend",
    "PoolClosed": "pool",
    "PoolError": "pool",
    "PoolStats": "pool",
    "PooledSandbox": "pool",
    "QuotaExceeded": "pool",
    "SandboxPool": "pool",
    "SandboxReaped": "pool",
    "WarmupFailed": "pool",
    "RUNC": "runtimes",
    "RUNSC": "runtimes",
    "engine_runtimes": "runtimes",
    "require_runtime": "runtimes",
    "Mount": "spec",
    "SandboxSpec": "spec",
    "parse_size": "spec",
    "SyncSandbox": "sync",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "AnyStreamEvent",
    "DEFAULT_CPU_IMAGE",
    "DEFAULT_GPU_IMAGE",
    "DisplayEvent",
    "DockerBackend",
    "ErrorEvent",
    "ExecutionResult",
    "FileTransferError",
    "KernelHost",
    "LocalBackend",
    "Mount",
    "Outcome",
    "PoolClosed",
    "PoolError",
    "PoolStats",
    "PooledSandbox",
    "QuotaExceeded",
    "RUNC",
    "RUNSC",
    "ResultEvent",
    "Sandbox",
    "SandboxClosedError",
    "SandboxDeadError",
    "SandboxError",
    "SandboxPool",
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
    "WarmupFailed",
    "WorkspacePathError",
    "WorkspaceQuotaError",
    "engine_runtimes",
    "parse_size",
    "require_runtime",
]
