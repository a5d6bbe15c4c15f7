"""Facades over the one async implementation: the sync `SyncSandbox` and the pool's leases.

A facade class names each method of the async class it mirrors once, with a wrapper that makes the
call one way: `blocking` (on a background event loop, for scripts) or `guarded` (inside the owner's
guard, e.g. a lease's reaped check and activity count). The wrapper takes the async method itself,
so the signature, the docs and the types (through ParamSpec) are the async method's and are never
written twice; the call goes to the target's own method of that name, so a subclass's override (the
Ray backend's remote sandbox) is what runs. A facade that misses a public coroutine method of the
class it mirrors fails at import time, so the facades cannot drift from the implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import queue
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
V = TypeVar("V")

_DONE = object()


class LoopRunner:
    """Blocking calls into an event loop that runs in another thread (a `LoopThread`'s, or a server's main
    loop for its job threads). Calling from that loop's own thread would deadlock, so it is refused."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def submit(self, coro: Coroutine[Any, Any, R]) -> Future[R]:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            coro.close()
            raise RuntimeError("a blocking sandbox call from the event loop its sandbox lives on would deadlock; "
                               "await the async sandbox instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.submit(coro).result()

    def iterate(self, items: AsyncIterator[R]) -> Iterator[R]:
        """The items of an async iterator, as they come; what ended it is raised here."""
        handoff: queue.Queue[Any] = queue.Queue()

        async def pump() -> None:
            try:
                async for item in items:
                    handoff.put(item)
            finally:
                handoff.put(_DONE)

        done = self.submit(pump())
        while (item := handoff.get()) is not _DONE:
            yield item
        done.result()


class LoopThread(LoopRunner):
    """An asyncio event loop running in a daemon thread until `stop()`: blocking calls for code
    with no loop, or whose loop is busy (a notebook)."""

    def __init__(self) -> None:
        super().__init__(asyncio.new_event_loop())
        self._thread = threading.Thread(target=self.loop.run_forever, name="cellforge-sandbox-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Facade(Generic[T]):
    """Base of a facade over an async object of class `T` (passed as `mirrors=`)."""

    _target: T

    def __init_subclass__(cls, mirrors: type | None = None, skip: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if mirrors is None:
            return
        wanted = {
            name
            for name, member in inspect.getmembers(mirrors)
            if not name.startswith("_") and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
        }
        missing = sorted(wanted - set(skip) - set(dir(cls)))
        if missing:
            raise TypeError(f"{cls.__name__} does not offer {', '.join(missing)} of {mirrors.__name__}")


class Attribute(Generic[V]):
    """A read-only attribute of the facade's target, e.g. `id = Attribute[str]()`."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, facade: Facade[Any] | None, owner: type | None = None) -> V:
        if facade is None:
            return self  # type: ignore[return-value]
        value: V = getattr(facade._target, self.name)
        return value


class Blocking(Facade[T]):
    """A facade whose calls block until the target's coroutine, run on `loop`, is done."""

    def __init__(self, target: T, loop: LoopRunner) -> None:
        self._target = target
        self._loop = loop


class Guarded(Facade[T]):
    """A facade whose calls run inside `guard()` (it may refuse them by raising)."""

    def __init__(self, target: T, guard: Callable[[], AbstractContextManager[Any]]) -> None:
        self._target = target
        self._guard = guard


def _bound(target: T, method: Callable[Concatenate[T, P], R]) -> Callable[P, R]:
    """The target's own method of that name: a subclass's override (a remote sandbox) is the one called."""
    bound: Callable[P, R] = getattr(target, method.__name__)
    return bound


def blocking(method: Callable[Concatenate[T, P], Coroutine[Any, Any, R]]) -> Callable[Concatenate[Blocking[T], P], R]:
    @functools.wraps(method)
    def call(self: Blocking[T], *args: P.args, **kwargs: P.kwargs) -> R:
        return self._loop.run(_bound(self._target, method)(*args, **kwargs))

    return call


def blocking_iter(
    method: Callable[Concatenate[T, P], AsyncIterator[R]],
) -> Callable[Concatenate[Blocking[T], P], Iterator[R]]:
    @functools.wraps(method)
    def call(self: Blocking[T], *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        return self._loop.iterate(_bound(self._target, method)(*args, **kwargs))

    return call


def guarded(
    method: Callable[Concatenate[T, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[Guarded[T], P], Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def call(self: Guarded[T], *args: P.args, **kwargs: P.kwargs) -> R:
        with self._guard():
            return await _bound(self._target, method)(*args, **kwargs)

    return call


def guarded_iter(
    method: Callable[Concatenate[T, P], AsyncGenerator[R, None]],
) -> Callable[Concatenate[Guarded[T], P], AsyncGenerator[R, None]]:
    @functools.wraps(method)
    async def call(self: Guarded[T], *args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[R, None]:
        with self._guard():
            async with contextlib.aclosing(_bound(self._target, method)(*args, **kwargs)) as items:
                async for item in items:
                    yield item

    return call
