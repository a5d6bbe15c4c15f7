"""The job runner: worker tasks in the server process taking jobs from the store's queue, one at a time each.

A job kind is a handler (an async function of a `JobContext` returning the result dict) and whether it
can resume after a server restart. Handlers report progress with `ctx.emit`, mark phases, and stop
at `ctx.check_cancelled()` points when a cancel arrives.

Reporting never blocks a handler: progress is written, in order, by one task per job on the database's
own threads, with retries. A database that stays unwritable fails the job with a plain message (the
detail goes to the server log) and the worker goes on; nothing a job or the database does ends a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from .store import JOB_LEASE_S, Job, JobStore
from service.errors import CellForgeError

log = logging.getLogger(__name__)
T = TypeVar("T")

CANCELLED_BY_TENANT = "cancelled by its tenant"
STORE_FAILED = "internal error: the job's state could not be recorded (database unavailable); it was stopped"
# Attempts a job gets when what runs it is lost (its Ray node died): a job that takes its node down each
# time (or a cluster losing nodes) ends failed with the reason instead of going round for ever.
MAX_ATTEMPTS = 3
_TENANT_ID_RE = re.compile(r"\btn_[0-9a-f]{12}\b")


class JobCancelled(Exception):
    """Raised inside a handler at a cancellation point after the job was cancelled."""


class JobFailed(CellForgeError):
    """A handler's own, explained failure; the message becomes the job's error."""


class JobLost(CellForgeError):
    """The job's run was lost with where it ran (its Ray node died): requeued to run again from its start
    (on another node) until it has had `JobRunner.max_attempts` attempts, then failed with this message."""


class Reporter(Protocol):
    """Where a JobContext's reports go: `put(what, value)` with what in event/phase/checkpoint."""

    def put(self, what: str, value: Any) -> None: ...


class RemoteJobs(Protocol):
    """Runs a claimed job somewhere else (`ray_jobs.RayJobs`: as a Ray task on a cluster)."""

    async def run(self, ctx: JobContext) -> dict[str, Any]: ...


class Redactor:
    """Server paths and tenant ids out of what a tenant reads (events, errors, results): paths inside
    the job's folder become relative to it, other server paths `<server>`, tenant ids `<tenant>`."""

    def __init__(self, work_dir: Path, private_roots: tuple[Path, ...]) -> None:
        self._names = {str(work_dir) + "/": "", str(work_dir): ".", **{str(root): "<server>" for root in private_roots}}
        # Longest first, and a root only as a whole path component (`/d` is not the start of `/data`).
        alternatives = sorted(self._names, key=len, reverse=True)
        self._paths = re.compile("|".join(re.escape(p) + ("" if p.endswith("/") else r"(?![\w.-])")
                                          for p in alternatives))

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            value = self._paths.sub(lambda m: self._names[m.group(0)], value)
            return _TENANT_ID_RE.sub("<tenant>", value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


class _Recorder:
    """A job's progress, written in order by one task on the database's threads, so reporting never
    blocks the caller (the event loop or a pipeline thread). Updates are kept until written."""

    def __init__(self, store: JobStore, job_id: str, redact: Redactor) -> None:
        self._store, self._job_id, self._redact = store, job_id, redact
        self._loop = asyncio.get_running_loop()
        self._pending: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        # One flush at a time: the last flush after the handler ends waits for one in flight, so no batch is
        # taken by a flush the end then cancels (it would be put back and never written: a lost last event).
        self._flushing = asyncio.Lock()

    def put(self, what: str, value: Any) -> None:
        with self._lock:
            self._pending.append((what, self._redact(value) if what == "event" else value))
        self._loop.call_soon_threadsafe(self._wake.set)

    async def flush(self) -> None:
        async with self._flushing:
            with self._lock:
                batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await self._store.db.run(self._store.record, self._job_id, batch)
            except BaseException:
                with self._lock:
                    self._pending[:0] = batch
                raise

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()


@dataclass
class JobContext:
    job: Job
    store: JobStore | None  # None: a context on another node, whose reports go through its recorder
    work_dir: Path
    cancelled: threading.Event = field(default_factory=threading.Event)
    recorder: Reporter | None = field(default=None, repr=False)
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def artifacts_dir(self) -> Path:
        return self.work_dir / "artifacts"

    def emit(self, kind: str, **data: Any) -> None:
        """Record an event (callable from worker threads too; never blocks)."""
        self._put("event", (kind, {k: v for k, v in data.items() if v is not None}))

    def set_phase(self, name: str) -> None:
        """The job's current phase, as its status shows it."""
        self._put("phase", name)

    def phase(self, name: str, message: str = "") -> None:
        self.check_cancelled()
        self.set_phase(name)
        self.emit("phase", phase=name, message=message or None)

    def checkpoint(self, name: str) -> None:
        """`name` finished: a restarted server may resume after it."""
        self._put("checkpoint", name)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled(f"job {self.job.id} was cancelled")

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A long blocking call (the design pipeline, the evaluator) on the runner's job threads, one per
        worker, so jobs never take the threads that serve requests."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    def _put(self, what: str, value: Any) -> None:
        if self.recorder is None:  # a context made outside the runner (tests, tools): write directly
            assert self.store is not None, "a JobContext needs a store or a recorder"
            self.store.record(self.job.id, [(what, value)])
        else:
            self.recorder.put(what, value)


Handler = Callable[[JobContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class JobKind:
    handler: Handler
    resumable: bool = False


class JobRunner:
    """`workers` jobs at a time from the store's queue. With `owner` (this API replica's name), claims are
    held in that name and heartbeated every `lease_s / 6` seconds; the same beat picks up cancels asked for
    through other replicas and recovers jobs whose replica's heartbeat is older than `lease_s`. A job whose
    run was lost with its Ray node (`JobLost`) runs again from its start, whatever its kind (a design run
    too: it starts from scratch), up to `max_attempts` attempts in all."""

    def __init__(self, store: JobStore, kinds: dict[str, JobKind], work_root: Path, workers: int = 2,
                 on_finish: Callable[[Job, float], None] | None = None, poll_interval: float = 1.0,
                 private_roots: tuple[Path, ...] = (), owner: str | None = None,
                 lease_s: float = JOB_LEASE_S, remote: RemoteJobs | None = None,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        if workers < 1:
            raise ValueError(f"workers: expected at least 1, got {workers}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts: expected at least 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.store = store
        self.owner = owner
        self.lease_s = lease_s
        self.remote = remote  # None: jobs run here, in this process
        self.kinds = kinds
        self.work_root = work_root
        self.workers = workers
        self.on_finish = on_finish
        self.poll_interval = poll_interval
        self.private_roots = (work_root, *private_roots)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="cellforge-job")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._running: dict[str, tuple[JobContext, asyncio.Task[Any]]] = {}
        self._cancel_reasons: dict[str, str] = {}
        # Final states the database would not take yet: written again before the next claim.
        self._unwritten: dict[str, tuple[str, dict[str, Any] | None, str | None, float]] = {}
        self._stopping = False

    def work_dir(self, job_id: str) -> Path:
        return self.work_root / job_id

    async def start(self) -> tuple[list[str], list[str]]:
        """Recover what a previous process left running, then start the workers."""
        resumable = {name for name, kind in self.kinds.items() if kind.resumable}
        recovered = await self.store.db.run(self.store.recover_after_restart, resumable, self.owner)
        if any(recovered):
            log.warning("after restart: requeued %s, failed as interrupted %s", *recovered)
        self._tasks = [asyncio.create_task(self._worker(i), name=f"job-worker-{i}") for i in range(self.workers)]
        if self.owner is not None:
            self._tasks.append(asyncio.create_task(self._beat(resumable), name="job-heartbeat"))
        return recovered

    async def _beat(self, resumable: set[str]) -> None:
        """Heartbeat the running jobs, stop those cancelled elsewhere, recover those of dead replicas."""
        assert self.owner is not None
        while not self._stopping:
            await asyncio.sleep(self.lease_s / 6)
            try:
                for job_id in await self.store.db.run(self.store.heartbeat, self.owner, list(self._running)):
                    running = self._running.get(job_id)
                    if running is not None and not running[0].cancelled.is_set():
                        running[0].cancelled.set()
                        running[1].cancel()
                requeued, failed = await self.store.db.run(
                    self.store.recover_after_restart, resumable, None, self.lease_s)
            except Exception:  # noqa: BLE001 - the database is down: the workers say so; beat again later
                log.warning("job heartbeat failed; retrying", exc_info=True)
                continue
            if requeued or failed:
                log.warning("jobs of a replica that stopped answering: requeued %s, failed %s", requeued, failed)
                self.wake()

    async def stop(self) -> None:
        """Stop the workers. Jobs they were running stay `running` in the store, so the next start
        recovers them exactly as after a crash."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._wake.set()

    async def cancel(self, job_id: str, reason: str = CANCELLED_BY_TENANT) -> Job:
        self._cancel_reasons[job_id] = reason
        queued_reason = "cancelled before it started" if reason == CANCELLED_BY_TENANT else reason
        job = await self.store.db.run(self.store.request_cancel, job_id, queued_reason)
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
        failures = 0
        while not self._stopping:
            try:
                await self._write_unwritten()
                job = await self.store.db.run(self.store.claim_next, self.owner)
                failures = 0
            except Exception:  # noqa: BLE001 - the database is down: wait and try again, never stop
                failures += 1
                if failures == 1:
                    log.exception("job worker %d: the job store is unavailable; retrying", number)
                await asyncio.sleep(min(30.0, self.poll_interval * 2 ** min(failures, 5)))
                continue
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        started = time.monotonic()
        kind = self.kinds.get(job.kind)
        if kind is None:
            await self._finish(job, started, "failed", None, f"unknown job kind {job.kind!r}")
            return
        work_dir = self.work_dir(job.id)
        (work_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        redact = Redactor(work_dir, self.private_roots)
        recorder = _Recorder(self.store, job.id, redact)
        ctx = JobContext(job=job, store=self.store, work_dir=work_dir, recorder=recorder, executor=self._executor)
        task = asyncio.ensure_future(kind.handler(ctx) if self.remote is None else self.remote.run(ctx))
        recording = asyncio.ensure_future(recorder.run())
        self._running[job.id] = (ctx, task)
        error: str | None
        try:
            # A cancel that came between the claim and the line above only reached the database.
            fresh = await self.store.db.run(self.store.get, job.id)
            if fresh is not None and fresh.cancel_requested:
                ctx.cancelled.set()
                task.cancel()
            await asyncio.wait({task, recording}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():  # the recorder gave up: the job cannot report, so it stops
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                recording.result()
            result = task.result()
            await recorder.flush()
        except (JobCancelled, asyncio.CancelledError):
            if not ctx.cancelled.is_set():
                task.cancel()
                raise  # the server is stopping: the job stays `running` for the next start to recover
            status, result, error = "cancelled", None, self._cancel_reasons.get(job.id, CANCELLED_BY_TENANT)
        except JobFailed as exc:
            status, result, error = "failed", None, str(exc)
        except JobLost as exc:
            if job.attempts < self.max_attempts and not ctx.cancelled.is_set():
                self._running.pop(job.id, None)
                recording.cancel()
                with contextlib.suppress(Exception):
                    await recorder.flush()
                log.warning("job %s (attempt %d): %s; requeued", job.id, job.attempts, exc)
                # It runs again from its start (a design run from scratch: its handler clears what a previous
                # attempt left in its folder), on whichever node Ray places it.
                await self.store.db.run(self.store.requeue, job.id, self.owner,
                                        f"requeued (attempt {job.attempts + 1} of {self.max_attempts}): {exc}")
                self.wake()
                return
            status, result, error = "failed", None, f"{exc}; failed after {job.attempts} attempt(s)"
        except SQLAlchemyError:
            log.exception("job %s (%s): the job store failed", job.id, job.kind)
            status, result, error = "failed", None, STORE_FAILED
        except Exception as exc:  # noqa: BLE001 - a handler bug fails its job, never the worker
            log.exception("job %s (%s) failed", job.id, job.kind)
            status, result, error = "failed", None, f"internal error ({type(exc).__name__}); see the server log"
        else:
            status, error = "succeeded", None
        finally:
            recording.cancel()
            self._running.pop(job.id, None)
            self._cancel_reasons.pop(job.id, None)
        if status != "succeeded":
            with contextlib.suppress(Exception):  # what was reported before the end, if the database takes it
                await recorder.flush()
        await self._finish(job, started, status, redact(result), redact(error))

    async def _finish(self, job: Job, started: float, status: str, result: dict[str, Any] | None,
                      error: str | None) -> None:
        try:
            final = await self.store.db.run(self.store.finish, job.id, status, result, error, self.owner)
        except Exception:  # noqa: BLE001 - kept, and written before this worker's next claim
            log.exception("job %s: could not record its end (%s); will retry", job.id, status)
            self._unwritten[job.id] = (status, result, error, started)
            return
        self._finished(final, started)

    async def _write_unwritten(self) -> None:
        for job_id in list(self._unwritten):
            item = self._unwritten.pop(job_id, None)
            if item is None:  # another worker took it
                continue
            status, result, error, started = item
            try:
                final = await self.store.db.run(self.store.finish, job_id, status, result, error, self.owner)
            except BaseException:
                self._unwritten[job_id] = item
                raise
            self._finished(final, started)

    def _finished(self, job: Job, started: float) -> None:
        if self.on_finish is not None:
            self.on_finish(job, time.monotonic() - started)
