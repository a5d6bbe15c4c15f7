"""Blocking access to a sandbox, for scripts: the async sandbox lives on an event loop in a thread.

    with SyncSandbox(SandboxSpec(image=DEFAULT_CPU_IMAGE)) as sb:
        print(sb.execute("1 + 1").result)

Works from plain scripts and from code that already runs an event loop (a notebook), since the
sandbox's loop is its own.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread until `stop()`."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cellforge-sandbox-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Awaitable[T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable[T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class SyncSandbox:
    """A sandbox with blocking methods, created from `spec` on `backend` (default: Docker)."""

    def __init__(self, spec: Any, backend: Any = None) -> None:
        self._lt = _LoopThread()
        try:
            if backend is None:
                from .docker_backend import DockerBackend

                backend = DockerBackend()
            self._sb = self._lt.run(backend.create(spec))
        except BaseException:
            self._lt.stop()
            raise
        self._closed = False

    @property
    def id(self) -> str:
        return self._sb.id

    @property
    def spec(self) -> Any:
        return self._sb.spec

    @property
    def isolated(self) -> bool:
        return self._sb.isolated

    @property
    def workspace(self) -> str:
        return self._sb.workspace

    @property
    def data_root(self) -> str:
        """Where the data mounts are seen from inside: `/data` in Docker, a folder on the local backend."""
        return self._sb.data_root

    def execute(self, code: str, timeout: float | None = None, on_event: Callable[[Any], Any] | None = None) -> Any:
        """Run code in the kernel; `on_event` is called (on the sandbox's thread) for each stream event."""
        return self._lt.run(self._sb.execute(code, timeout=timeout, on_event=on_event))

    def stream(self, code: str, timeout: float | None = None) -> Iterator[Any]:
        """Yield the execution's events as they happen, the final `ExecutionResult` last."""
        events: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for event in self._sb.stream(code, timeout=timeout):
                    events.put(event)
            finally:
                events.put(_DONE)

        done = self._lt.submit(pump())
        while (event := events.get()) is not _DONE:
            yield event
        done.result()  # re-raise what ended the stream, if anything did

    def run_command(self, argv: Sequence[str], **kwargs: Any) -> Any:
        return self._lt.run(self._sb.run_command(argv, **kwargs))

    def put_file(self, path: str, data: bytes, **kwargs: Any) -> None:
        self._lt.run(self._sb.put_file(path, data, **kwargs))

    def get_file(self, path: str, **kwargs: Any) -> bytes:
        return self._lt.run(self._sb.get_file(path, **kwargs))

    def put_dir(self, local_dir: str | Path, path: str, **kwargs: Any) -> list[str]:
        return self._lt.run(self._sb.put_dir(local_dir, path, **kwargs))

    def get_dir(self, path: str, local_dir: str | Path, **kwargs: Any) -> list[str]:
        return self._lt.run(self._sb.get_dir(path, local_dir, **kwargs))

    def interrupt(self) -> None:
        self._lt.run(self._sb.interrupt())

    def restart(self) -> None:
        self._lt.run(self._sb.restart())

    def close(self) -> None:
        """Destroy the sandbox and stop its thread. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self._lt.run(self._sb.close())
        finally:
            self._lt.stop()

    def __enter__(self) -> SyncSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncSandbox {self._sb.id}{' closed' if self._closed else ''}>"
