"""Errors raised by the sandbox package.

Everything derives from `SandboxError`, so callers can catch the family; each message names the
sandbox, path or value involved and what was expected. Execution outcomes (timeout, killed, died)
are *results*, not exceptions: they come back in `ExecutionResult.outcome`. The image build's
errors (`images.ImageBuildError`, `gpu_lock.LockError`) derive from `SandboxError` too.
"""

from __future__ import annotations


class SandboxError(RuntimeError):
    """Base class of every error raised by `sandbox`."""


class UsageError(SandboxError, ValueError):
    """A call got an argument it cannot take (names the argument, the value and what was expected)."""


class SpecError(UsageError):
    """A `SandboxSpec` value is invalid (names the field, the value and what was expected)."""


class SandboxStartError(SandboxError):
    """The sandbox could not be created or its kernel did not become ready in time."""


class SandboxClosedError(SandboxError):
    """The sandbox was closed; no further calls are accepted."""


class SandboxDeadError(SandboxError):
    """The kernel or container is gone (see the `died` result); call `restart()` to get a fresh one."""


class WorkspacePathError(UsageError):
    """A workspace path is absolute, escapes the workspace (`..`, symlink) or is otherwise unusable."""


class WorkspaceQuotaError(SandboxError):
    """Writing into the workspace ran past its size quota."""


class FileTransferError(SandboxError):
    """A file could not be copied into or out of the sandbox (missing file, wrong type, I/O error)."""


# --- the pool -----------------------------------------------------------------------------------


class PoolError(SandboxError):
    """Base class of the pool's errors."""


class CapacityError(SandboxError):
    """No room for this sandbox now (its tenant's quota is full): the same request may succeed later, after
    `retry_after` seconds or so. A provider raises it; `SandboxProvider.lease_blocking` can wait it out."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PoolClosed(PoolError):
    """The pool was shut down."""


class SandboxReaped(PoolError, SandboxClosedError):
    """The leased sandbox was released, or destroyed by the pool (idle timeout, maximum lifetime, shutdown)."""


class WarmupFailed(PoolError, SandboxStartError):
    """A new sandbox could not run the preload code."""
