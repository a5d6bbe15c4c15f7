"""The backend interface: where sandboxes run, and how one is chosen.

Modelled on jupyter_client's kernel provisioner (`KernelProvisionerBase`): a backend *provisions* the
place a kernel runs (a container, a host process, later a Ray actor's container) and controls it
through a `KernelHost`; the backend-independent `Sandbox` speaks Jupyter messaging to the kernel and
turns what happens into outcomes. The lifecycle of a backend:

    backend = new_backend("docker")        # cheap: no engine call yet
    await backend.health()                 # can it start sandboxes now? (engine reachable, ...)
    await backend.reap()                   # at a process's start: remove what crashed processes left
    sb = await backend.create(spec)        # provision + start: the kernel answers, or SandboxStartError
    ...                                    # sb.execute / stream / files / commands / interrupt / restart
    await sb.close()                       # KernelHost.destroy(): nothing of that sandbox is left
    await backend.close()                  # shared resources (engine client); sandboxes may close after

and of one sandbox's kernel host, driven by its `Sandbox`:

    provision (running, kernel perhaps not answering yet) → restart_kernel()* (in place, workspace
    kept) → exit_cause() (None while running; why it stopped) → revive() (a fresh host after a
    death; state and workspace lost) → destroy() (idempotent).

A new backend subclasses `SandboxBackend` (implementing `provision`, `health`, `close`, and `reap`
when something can outlive its process), subclasses `KernelHost`, and is named in `BackendKind`.
"""

from __future__ import annotations

import asyncio
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, ClassVar

from .errors import UsageError
from .spec import DATA_ROOT, SandboxSpec

if TYPE_CHECKING:
    from .kernel import Sandbox
    from .messaging import ConnectionInfo


def describe_exit(code: int, oom: bool = False) -> str:
    """The `died_cause` text for a kernel host's exit status (the supervisor exits 128 + signal)."""
    if oom:
        return "out of memory"
    if code < 0:
        return f"signal {-code}"
    if code > 128:
        return f"signal {code - 128}"
    return f"exit code {code}"


class KernelHost(ABC):
    """Where one sandbox's kernel runs: what its `Sandbox` needs beyond Jupyter messaging.

    Made by `SandboxBackend.provision`, already running; the kernel may still be starting. Its
    kernel's sockets are reached through `connection` (host-side paths); code inside sees its
    writable folder at `workspace` and the data mounts under `data_root`.
    """

    def __init__(self, sandbox_id: str, connection: ConnectionInfo, *, workspace: str, data_root: str = DATA_ROOT):
        self.sandbox_id = sandbox_id
        self.connection = connection
        self.workspace = workspace
        self.data_root = data_root

    @abstractmethod
    async def restart_kernel(self) -> None:
        """Replace the kernel process in place (workspace kept); returns once asked, not when ready."""

    @abstractmethod
    async def exit_cause(self, timeout: float) -> str | None:
        """Why the host stopped ('out of memory', 'exit code 1', 'signal 9'), waiting up to `timeout`
        seconds for it to stop; None while it runs."""

    @abstractmethod
    async def revive(self) -> None:
        """Start the host afresh, stopped or not (a fresh kernel; state and workspace are lost)."""

    @abstractmethod
    async def destroy(self) -> None:
        """Stop and remove everything of this sandbox; idempotent, and safe to call concurrently."""

    @abstractmethod
    async def logs(self) -> str:
        """The tail of the host's own output, for start-up errors ('' when there is none)."""


@dataclass(frozen=True)
class BackendHealth:
    """Whether a backend can start sandboxes now, and what it runs on (or why not)."""

    ok: bool
    detail: str


@dataclass
class ReapReport:
    """What a reaping pass found: ids of what it removed, and what it left alone (and why)."""

    removed: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)


class SandboxBackend(ABC):
    """Makes sandboxes. See the module docstring for the lifecycle."""

    kind: ClassVar[BackendKind]
    isolated: ClassVar[bool]  # False: sandboxed code runs with this process's rights (say so loudly)

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """A started sandbox whose kernel answers. On any failure (or cancellation) nothing is left
        behind and SandboxStartError says why."""
        from .kernel import Sandbox  # kernel.py needs nothing of this module at run time

        host = await self.provision(spec)
        try:
            sandbox = Sandbox(spec, host, isolated=self.isolated)
            await sandbox.start()
        except BaseException:
            # Shielded: a second cancellation must not leave the host half-removed.
            await asyncio.shield(host.destroy())
            raise
        return sandbox

    @abstractmethod
    async def provision(self, spec: SandboxSpec) -> KernelHost:
        """A running kernel host for `spec` (its kernel may not answer yet). Whatever fails or is
        cancelled midway is removed before the error propagates (SandboxStartError, SpecError)."""

    @abstractmethod
    async def health(self) -> BackendHealth:
        """Whether sandboxes can be created now; never raises."""

    async def reap(self) -> ReapReport:
        """Remove sandboxes left by processes that died without closing them. Nothing by default:
        a backend whose sandboxes outlive their process overrides this."""
        return ReapReport()

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend shares between its sandboxes (sandboxes may still close after)."""

    async def __aenter__(self) -> SandboxBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class BackendKind(StrEnum):
    """The backends there are; `new_backend(kind)` makes one with its default settings."""

    DOCKER = "docker"  # hardened containers on the local Docker engine
    LOCAL = "local"  # a plain process on this host: NOT ISOLATED, for development
    RAY = "ray"  # hardened containers on the nodes of a Ray cluster ($RAY_ADDRESS; needs cellforge[ray])


# Imported on first use: the Docker SDK is not needed by a process that never starts a container.
_IMPLEMENTATIONS: dict[BackendKind, tuple[str, str]] = {
    BackendKind.DOCKER: ("sandbox.docker_backend", "DockerBackend"),
    BackendKind.LOCAL: ("sandbox.local_backend", "LocalBackend"),
    BackendKind.RAY: ("sandbox.ray_backend", "RayBackend"),
}


def backend_class(kind: BackendKind | str) -> type[SandboxBackend]:
    """The class of backend `kind`; UsageError naming the known kinds for anything else."""
    try:
        kind = BackendKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in BackendKind)
        raise UsageError(f"unknown sandbox backend {kind!r}; expected one of {known}") from None
    module, name = _IMPLEMENTATIONS[kind]
    cls: type[SandboxBackend] = getattr(importlib.import_module(module), name)
    return cls


def new_backend(kind: BackendKind | str = BackendKind.DOCKER) -> SandboxBackend:
    """A backend of `kind` with its default settings (construct its class to configure one)."""
    return backend_class(kind)()
