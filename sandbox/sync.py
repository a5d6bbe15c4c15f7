"""Blocking access to a sandbox, for scripts: the async sandbox lives on an event loop in a thread.

    with SyncSandbox(SandboxSpec(image=DEFAULT_CPU_IMAGE)) as sb:
        print(sb.execute("1 + 1").result)
        sb.files.put("code/model.py", source)
        sb.commands.run(["python", "code/model.py"])

Works from plain scripts and from code that already runs an event loop (a notebook), since the
sandbox's loop is its own. Every method is the async one's (see facade.py), made blocking.
"""

from __future__ import annotations

from typing import Any

from .backend import BackendKind, SandboxBackend, new_backend
from .commands import Commands
from .facade import Attribute, Blocking, LoopRunner, LoopThread, blocking, blocking_iter
from .files import Files
from .kernel import Sandbox
from .spec import SandboxSpec


class SyncFiles(Blocking[Files], mirrors=Files):
    """`Files`, blocking."""

    put = blocking(Files.put)
    get = blocking(Files.get)
    list = blocking(Files.list)
    remove = blocking(Files.remove)
    put_dir = blocking(Files.put_dir)
    get_dir = blocking(Files.get_dir)


class SyncCommands(Blocking[Commands], mirrors=Commands):
    """`Commands`, blocking."""

    run = blocking(Commands.run)


class SyncSandbox(Blocking[Sandbox], mirrors=Sandbox, skip=Sandbox.INTERNAL):
    """A sandbox with blocking methods, created from `spec` on `backend`: a backend, or the kind of one
    to make for this sandbox alone (closed with it; default: Docker)."""

    id = Attribute[str]()
    spec = Attribute[SandboxSpec]()
    isolated = Attribute[bool]()
    workspace = Attribute[str]()
    data_root = Attribute[str]()  # where the data mounts are seen from inside
    dead = Attribute["str | None"]()

    execute = blocking(Sandbox.execute)
    stream = blocking_iter(Sandbox.stream)
    interrupt = blocking(Sandbox.interrupt)
    restart = blocking(Sandbox.restart)

    def __init__(self, spec: SandboxSpec, backend: SandboxBackend | BackendKind | str = BackendKind.DOCKER) -> None:
        if isinstance(backend, SandboxBackend):
            self._own_backend, chosen = None, backend
        else:
            self._own_backend = chosen = new_backend(backend)
        loop = LoopThread()
        try:
            sandbox = loop.run(chosen.create(spec))
        except BaseException:
            self._close_own_backend(loop)
            loop.stop()
            raise
        self._bind(sandbox, loop, owns_loop=True)

    @classmethod
    def attach(cls, sandbox: Any, loop: LoopRunner) -> SyncSandbox:
        """A blocking view of a sandbox (or a pool's lease) that lives on `loop`, another thread's event loop
        (a provider's): `close()` closes that sandbox and leaves the loop running."""
        view = cls.__new__(cls)
        view._own_backend = None
        view._bind(sandbox, loop, owns_loop=False)
        return view

    def _bind(self, sandbox: Any, loop: LoopRunner, owns_loop: bool) -> None:
        super().__init__(sandbox, loop)
        self.files = SyncFiles(sandbox.files, loop)
        self.commands = SyncCommands(sandbox.commands, loop)
        self._owns_loop = owns_loop
        self._closed = False

    def close(self) -> None:
        """Destroy the sandbox and stop its thread. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._target.close())
        finally:
            if self._owns_loop:
                assert isinstance(self._loop, LoopThread)
                self._close_own_backend(self._loop)
                self._loop.stop()

    def _close_own_backend(self, loop: LoopRunner) -> None:
        if self._own_backend is not None:
            loop.run(self._own_backend.close())

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncSandbox {self.id}{' closed' if self._closed else ''}>"

