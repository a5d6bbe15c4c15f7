"""Where code runs: hardened Docker sandboxes (and a local, non-isolated backend) driving Jupyter kernels.

Knows nothing of agents, biology or the service.
"""

from .docker_backend import DockerBackend
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
from .images import DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE
from .kernel import KernelHost, Sandbox
from .local_backend import LocalBackend
from .pool import SandboxPool
from .runtimes import RUNC, RUNSC, engine_runtimes, require_runtime
from .spec import Mount, SandboxSpec, parse_size
from .sync import SyncSandbox

__all__ = [
    "DEFAULT_CPU_IMAGE",
    "DEFAULT_GPU_IMAGE",
    "RUNC",
    "RUNSC",
    "AnyStreamEvent",
    "DisplayEvent",
    "DockerBackend",
    "ErrorEvent",
    "ExecutionResult",
    "FileTransferError",
    "KernelHost",
    "LocalBackend",
    "Mount",
    "Outcome",
    "ResultEvent",
    "Sandbox",
    "SandboxClosedError",
    "SandboxDeadError",
    "SandboxError",
    "SandboxPool",
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
    "WorkspacePathError",
    "WorkspaceQuotaError",
    "engine_runtimes",
    "parse_size",
    "require_runtime",
]
from .pool import PoolClosed, PoolError, PooledSandbox, PoolStats, QuotaExceeded, SandboxReaped, WarmupFailed  # noqa: E402,F401
