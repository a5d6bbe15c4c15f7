"""The job runner: worker tasks in the server process taking jobs from the store's queue, one at a time each.

A job kind is a handler (an async function of a `JobContext` returning the result dict) and whether it
can resume after a server restart. Handlers report progress with `ctx.emit`, mark phases, and stop
at `ctx.check_cancelled()` points when a cancel arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import Job, JobStore

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a handler at a cancellation point after the job was cancelled."""


class JobFailed(Exception):
    """A handler's own, explained failure; the message becomes the job's error."""


@dataclass
class JobContext:
    job: Job
    store: JobStore
    work_dir: Path
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir / "artifacts"

    def emit(self, kind: str, **data: Any) -> None:
        """Record an event (callable from worker threads too)."""
        self.store.add_event(self.job.id, kind, {k: v for k, v in data.items() if v is not None})

    def phase(self, name: str, message: str = "") -> None:
        self.check_cancelled()
        self.store.set_phase(self.job.id, name)
        self.emit("phase", phase=name, message=message or None)

    def checkpoint(self, name: str) -> None:
        """`name` finished: a restarted server may resume after it."""
        self.store.set_checkpoint(self.job.id, name)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job.id} was cancelled")


Handler = Callable[[JobContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class JobKind:
    handler: Handler
    resumable: bool = False


class JobRunner:
    def __init__(self, store: JobStore, kinds: dict[str, JobKind], work_root: Path, workers: int = 2,
                 on_finish: Callable[[Job, float], None] | None = None, poll_interval: float = 1.0) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        self.store = store
        self.kinds = kinds
        self.work_root = work_root
        self.workers = workers
        self.on_finish = on_finish
        self.poll_interval = poll_interval
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[str, tuple[JobContext, asyncio.Task[Any]]] = {}
        self._stopping = False

    def work_dir(self, job_id: str) -> Path:
        return self.work_root / job_id

    async def start(self) -> tuple[list[str], list[str]]:
        """Recover what a previous process left running, then start the workers."""
        resumable = {name for name, kind in self.kinds.items() if kind.resumable}
        recovered = await asyncio.to_thread(self.store.recover_after_restart, resumable)
        if any(recovered):
            log.warning("after restart: requeued %s, failed as interrupted %s", *recovered)
        self._tasks = [asyncio.create_task(self._worker(i), name=f"job-worker-{i}") for i in range(self.workers)]
        return recovered

    async def stop(self) -> None:
        """Stop the workers. Jobs they were running stay `running` in the store, so the next start
        recovers them exactly as after a crash."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        running = self._running.get(job_id)
        if running is not None:
            ctx, task = running
            ctx.cancelled.set()
            task.cancel()
        return job

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    async def _worker(self, number: int) -> None:
        while not self._stopping:
            job = await asyncio.to_thread(self.store.claim_next)
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        kind = self.kinds.get(job.kind)
        started = time.monotonic()
        if kind is None:
            final = await asyncio.to_thread(self.store.finish, job.id, "failed", None, f"unknown job kind {job.kind!r}")
            self._finished(final, started)
            return
        work_dir = self.work_dir(job.id)
        (work_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        ctx = JobContext(job=job, store=self.store, work_dir=work_dir)
        task = asyncio.ensure_future(kind.handler(ctx))
        self._running[job.id] = (ctx, task)
        try:
            # A cancel that came between the claim and the line above only reached the database.
            fresh = await asyncio.to_thread(self.store.get, job.id)
            if fresh is not None and fresh.cancel_requested:
                ctx.cancelled.set()
                task.cancel()
            result = await task
        except (JobCancelled, asyncio.CancelledError):
            if not ctx.cancelled.is_set():
                task.cancel()
                raise  # the server is stopping: the job stays `running` for the next start to recover
            status, result, error = "cancelled", None, "cancelled by its tenant"
        except JobFailed as exc:
            status, result, error = "failed", None, str(exc)
        except Exception as exc:  # noqa: BLE001 - a handler bug fails its job, never the worker
            log.exception("job %s (%s) failed", job.id, job.kind)
            status, result, error = "failed", None, f"{type(exc).__name__}: {exc}"
        else:
            status, error = "succeeded", None
        finally:
            self._running.pop(job.id, None)
        final = await asyncio.to_thread(self.store.finish, job.id, status, result, error)
        self._finished(final, started)

    def _finished(self, job: Job, started: float) -> None:
        if self.on_finish is not None:
            self.on_finish(job, time.monotonic() - started)
