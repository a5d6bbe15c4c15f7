"""Where a process's sandboxes come from: one provider, one backend, every sandbox leased through it.

    provider = BackendProvider("docker")            # no engine call yet: the backend is made on first use
    with provider:                                  # close(): the sandboxes still leased, then the backend
        sb = provider.lease_blocking(spec)          # a SyncSandbox; from any thread but the provider's loop
        sb.commands.run(["ls"]); sb.close()

A provider owns one backend for the whole process (a design run from the CLI, or a server), so every
sandbox shares its engine client and threads, and it is closed once. The server's provider (the service's
sandbox layer) implements the same interface with the tenant's quota, its records and metrics; a job's
pipeline gets that one, so its sandboxes are the tenant's like those the API hands out. When a tenant has
no room, `lease` raises `CapacityError` and `lease_blocking(wait=...)` waits for room.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .backend import BackendKind, SandboxBackend, new_backend
from .errors import CapacityError, SandboxClosedError, UsageError
from .facade import LoopRunner, LoopThread
from .spec import SandboxSpec
from .sync import SyncSandbox

if TYPE_CHECKING:
    from .kernel import Sandbox


class SandboxProvider(ABC):
    """Leases sandboxes to the code of one process, all from one backend."""

    @property
    @abstractmethod
    def kind(self) -> BackendKind:
        """The kind of backend the sandboxes run on."""

    @property
    @abstractmethod
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the provider's sandboxes live on (their async methods run there)."""

    @abstractmethod
    async def lease(self, spec: SandboxSpec) -> Any:
        """A started sandbox for `spec` (its `tenant` label says whose): an object with `Sandbox`'s methods
        whose `close()` ends the lease. `CapacityError` when there is no room for it now."""

    def lease_blocking(self, spec: SandboxSpec, *, wait: float = 0.0,
                       on_wait: Callable[[str], None] | None = None) -> SyncSandbox:
        """`lease`, blocking, from a thread other than the provider's loop. While there is no room
        (`CapacityError`), it tries again each second for up to `wait` seconds, calling `on_wait(why)` before
        each pause (raising there stops the wait), then raises the last `CapacityError`."""
        runner = LoopRunner(self.loop)
        deadline = time.monotonic() + wait
        while True:
            try:
                return SyncSandbox.attach(runner.run(self.lease(spec)), runner)
            except CapacityError as exc:
                pause = min(max(exc.retry_after, 0.2), 1.0)
                if time.monotonic() + pause > deadline:
                    raise
                if on_wait is not None:
                    on_wait(str(exc))
                time.sleep(pause)


class BackendProvider(SandboxProvider):
    """One backend, made on the first lease (or the one given, which stays the caller's to close), its
    sandboxes on one event loop: a thread of its own, or `loop` (an async program's, which then calls
    `aclose()`). No quota: every lease is granted. `close()` destroys the sandboxes still leased and closes
    the backend it made; idempotent."""

    def __init__(self, backend: SandboxBackend | BackendKind | str = BackendKind.DOCKER,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if isinstance(backend, SandboxBackend):
            self._backend: SandboxBackend | None = backend
            self._kind, self._owns_backend = backend.kind, False
        else:
            self._backend, self._kind, self._owns_backend = None, BackendKind(backend), True
        self.backends_made = 0
        self._thread: LoopThread | None = None
        self._given_loop = loop
        self._lock = threading.Lock()
        self._leased: set[Sandbox] = set()
        self._closed = False

    @property
    def kind(self) -> BackendKind:
        return self._kind

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise SandboxClosedError("this sandbox provider was closed")
            if self._given_loop is not None:
                return self._given_loop
            if self._thread is None:
                self._thread = LoopThread()
            return self._thread.loop

    @property
    def backend(self) -> SandboxBackend:
        """The provider's backend (made now if this is the first use)."""
        with self._lock:
            if self._closed:
                raise SandboxClosedError("this sandbox provider was closed")
            if self._backend is None:
                self._backend = new_backend(self._kind)
                self.backends_made += 1
            return self._backend

    async def lease(self, spec: SandboxSpec) -> Sandbox:
        if asyncio.get_running_loop() is not self.loop:
            raise UsageError("BackendProvider.lease runs on the provider's loop (lease_blocking from elsewhere)")
        sandbox = await self.backend.create(spec)
        # Kept until closed, so close() can destroy what a holder left open.
        self._leased = {sb for sb in self._leased if not sb.closed} | {sandbox}
        return sandbox

    async def aclose(self) -> None:
        """`close()` from a coroutine on the provider's given loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await self._close_all(self._backend if self._owns_backend else None)

    def close(self) -> None:
        if self._given_loop is not None:
            raise UsageError("a BackendProvider on a given loop is closed with `await provider.aclose()`")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread, backend = self._thread, self._backend
        if thread is None:
            if backend is not None and self._owns_backend:
                asyncio.run(backend.close())
            return
        try:
            thread.run(self._close_all(backend if self._owns_backend else None))
        finally:
            thread.stop()

    async def _close_all(self, backend: SandboxBackend | None) -> None:
        await asyncio.gather(*(sb.close() for sb in list(self._leased)), return_exceptions=True)
        if backend is not None:
            await backend.close()

    def __enter__(self) -> BackendProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
