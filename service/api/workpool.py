"""A bounded pool for the untrusted, CPU-heavy part of requests (unpacking uploaded bundles).

At most `threads` run at once and `queue` more wait; beyond that a request is refused at once (503)
rather than queued without bound. It is its own pool: a tenant filling it delays nobody's
authentication, database calls or sandbox starts, which run on other threads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import Unavailable

T = TypeVar("T")


class WorkPool:
    def __init__(self, threads: int, queue: int, name: str) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix=f"cellforge-{name}")
        self._admitted = asyncio.Semaphore(threads + queue)
        self.name = name

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._admitted.locked():
            raise Unavailable(f"the server is busy ({self.name}); retry in a few seconds")
        async with self._admitted:
            return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
