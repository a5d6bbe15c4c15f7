"""A warm pool of sandboxes: kernels started and imports preloaded before anyone asks for them.

A sandbox is handed to exactly one tenant and destroyed when released — never reused, so no state,
file or process can leak from one tenant to the next. The pool keeps `warm` ready sandboxes per
spec and refills in the background as they are taken. Leases idle for `idle_timeout` or older than
`max_lifetime` are reaped (unless leased with `reapable=False`: a job's, which its own budget ends), and
warm ones older than `max_lifetime` are replaced. How many sandboxes a tenant may hold is not the pool's
business: its owner (the service's quotas) decides before it calls `acquire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .backend import SandboxBackend
from .commands import Commands
from .errors import PoolClosed, PoolError, SandboxReaped, UsageError, WarmupFailed
from .facade import Attribute, Guarded, guarded, guarded_iter
from .files import Files
from .kernel import Sandbox
from .spec import SandboxSpec

log = logging.getLogger(__name__)

DEFAULT_PRELOAD = "import numpy, pandas, scipy, anndata, torch"


def spec_key(spec: SandboxSpec) -> str:
    """Sandboxes are interchangeable when their specs are equal, labels aside (labels are per tenant)."""
    return spec.model_dump_json(exclude={"labels"})


@dataclass
class _Warm:
    sandbox: Sandbox
    created: float


@dataclass
class _Slot:
    """The warm sandboxes of one spec."""

    spec: SandboxSpec
    target: int
    ready: deque[_Warm] = field(default_factory=deque)
    starting: int = 0
    failures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LeasedFiles(Guarded[Files], mirrors=Files):
    """`Files` of a leased sandbox: refused once it is reaped, counted as activity."""

    put = guarded(Files.put)
    get = guarded(Files.get)
    list = guarded(Files.list)
    remove = guarded(Files.remove)
    put_dir = guarded(Files.put_dir)
    get_dir = guarded(Files.get_dir)


class LeasedCommands(Guarded[Commands], mirrors=Commands):
    """`Commands` of a leased sandbox."""

    run = guarded(Commands.run)


class PooledSandbox(Guarded[Sandbox], mirrors=Sandbox, skip=Sandbox.INTERNAL):
    """A tenant's lease on a sandbox: the methods of `Sandbox`; `close()` gives it back to the pool.

    Tracks activity so the pool can reap idle leases, and refuses calls once the pool reaped it.
    """

    id = Attribute[str]()
    spec = Attribute[SandboxSpec]()
    isolated = Attribute[bool]()
    workspace = Attribute[str]()
    data_root = Attribute[str]()
    dead = Attribute["str | None"]()
    healthy = Attribute[bool]()

    execute = guarded(Sandbox.execute)
    stream = guarded_iter(Sandbox.stream)
    interrupt = guarded(Sandbox.interrupt)
    restart = guarded(Sandbox.restart)

    def __init__(self, pool: SandboxPool, sandbox: Sandbox, tenant: str, created: float, reapable: bool = True,
                 on_release: Callable[[PooledSandbox], Awaitable[None]] | None = None) -> None:
        super().__init__(sandbox, self._activity)
        self.files = LeasedFiles(sandbox.files, self._activity)
        self.commands = LeasedCommands(sandbox.commands, self._activity)
        self._pool = pool
        self.tenant = tenant
        self.created = created
        self.acquired = time.monotonic()
        self.last_active = self.acquired
        self.reaped: str | None = None
        self.reapable = reapable
        self.on_release = on_release
        self._busy = 0

    @property
    def busy(self) -> bool:
        return self._busy > 0

    @contextlib.contextmanager
    def _activity(self) -> Iterator[None]:
        if self.reaped:
            raise SandboxReaped(f"sandbox {self.id} of tenant {self.tenant!r} was reaped: {self.reaped}")
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            self.last_active = time.monotonic()

    async def close(self) -> None:
        await self._pool.release(self)

    async def __aenter__(self) -> PooledSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = f"reaped: {self.reaped}" if self.reaped else "live"
        return f"<PooledSandbox {self.id} tenant={self.tenant!r} {state}>"


class PoolStats(BaseModel):
    """A snapshot of the pool, for metrics and tests."""

    warm: int
    starting: int
    live_per_tenant: dict[str, int]
    created: int
    warm_hits: int
    cold_starts: int
    reaped_idle: int
    reaped_lifetime: int
    warm_recycled: int
    warmup_failures: int


class SandboxPool:
    """Warm sandboxes per spec, handed out one tenant at a time and destroyed on release.

    `specs` are kept warm from `start()` on; a spec not in the list is served cold. With
    `reap_orphans` (the default), `start()` first has the backend remove the sandboxes that crashed
    processes left behind (`SandboxBackend.reap`).
    """

    def __init__(
        self,
        backend: SandboxBackend,
        specs: Sequence[SandboxSpec] = (),
        *,
        warm: int = 2,
        preload: str = DEFAULT_PRELOAD,
        preload_timeout: float = 120.0,
        idle_timeout: float = 600.0,
        max_lifetime: float = 3600.0,
        reap_interval: float = 5.0,
        reap_orphans: bool = True,
    ) -> None:
        if warm < 0 or idle_timeout <= 0 or max_lifetime <= 0 or reap_interval <= 0:
            raise UsageError(
                "SandboxPool needs warm >= 0 and positive idle_timeout, max_lifetime and reap_interval; got "
                f"warm={warm}, idle_timeout={idle_timeout}, max_lifetime={max_lifetime}, reap_interval={reap_interval}"
            )
        self.backend = backend
        self.preload = preload
        self.preload_timeout = preload_timeout
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.reap_interval = reap_interval
        self._reap_orphans = reap_orphans
        self._slots: dict[str, _Slot] = {spec_key(s): _Slot(spec=s, target=warm) for s in specs}
        self._leases: set[PooledSandbox] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._closing = asyncio.Event()
        self._counts: defaultdict[str, int] = defaultdict(int)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> SandboxPool:
        """Reap orphans, begin warming every configured spec, start the reaper loop. Idempotent."""
        if self._closed:
            raise PoolClosed("this SandboxPool was shut down; create a new one")
        if self._started:
            return self
        self._started = True
        if self._reap_orphans:
            report = await self.backend.reap()
            if report.removed:
                log.warning("removed %d orphan sandbox(es) at start-up", len(report.removed))
        for key in self._slots:
            self._refill(key)
        self._reaper = asyncio.create_task(self._reap_loop(), name="sandbox-pool-reaper")
        return self

    async def shutdown(self) -> None:
        """Stop refilling and reaping, destroy every warm and leased sandbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._reaper:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        # Sandboxes being started are let finish and then destroyed: cancelling a half-made
        # container could leave it behind.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        doomed = [w.sandbox for slot in self._slots.values() for w in slot.ready]
        for slot in self._slots.values():
            slot.ready.clear()
            slot.changed.set()
        for lease in list(self._leases):
            lease.reaped = "the pool was shut down"
            doomed.append(lease._target)
        self._leases.clear()
        await asyncio.gather(*(self._destroy(sb) for sb in doomed))

    async def __aenter__(self) -> SandboxPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # -- leasing ---------------------------------------------------------------------------------

    async def acquire(self, spec: SandboxSpec | None = None, tenant: str | None = None, *, reapable: bool = True,
                      on_release: Callable[[PooledSandbox], Awaitable[None]] | None = None) -> PooledSandbox:
        """A fresh sandbox for `tenant` (default: the spec's `tenant` label, else "default"): a warm
        one when the spec is pooled and one is ready, else started now (with the same preload).
        `reapable=False` exempts the lease from the idle and lifetime reaper (its holder ends it);
        `on_release(lease)` runs once it is destroyed by `release()`."""
        if self._closed:
            raise PoolClosed("this SandboxPool was shut down; create a new one")
        if not self._started:
            raise PoolError("SandboxPool.start() (or `async with pool`) must run before acquire()")
        if spec is None:
            if len(self._slots) != 1:
                raise UsageError(f"acquire() needs a spec: this pool keeps {len(self._slots)} specs warm")
            spec = next(iter(self._slots.values())).spec
        tenant = tenant or spec.tenant or "default"
        key = spec_key(spec)
        warm = self._take_warm(key)
        if warm is not None:
            self._counts["warm_hits"] += 1
            sandbox, created = warm.sandbox, warm.created
        else:
            self._counts["cold_starts"] += 1
            sandbox, created = await self._start_sandbox(spec), time.monotonic()
        if self._closed:
            await self._destroy(sandbox)
            raise PoolClosed("the SandboxPool was shut down while the sandbox started")
        lease = PooledSandbox(self, sandbox, tenant, created, reapable, on_release)
        self._leases.add(lease)
        return lease

    def adopt(self, sandbox: Sandbox, tenant: str, age: float = 0.0) -> PooledSandbox:
        """A lease on a sandbox this pool did not start (one another process started, reached through a
        backend that shares sandboxes): reaped and released like any lease. The tenant's cap is the
        caller's to enforce (the sandbox exists already)."""
        if self._closed:
            raise PoolClosed("this SandboxPool was shut down; create a new one")
        lease = PooledSandbox(self, sandbox, tenant, time.monotonic() - age)  # age: its lifetime so far
        self._leases.add(lease)
        return lease

    def forget(self, lease: PooledSandbox, why: str) -> None:
        """Drop a lease without destroying its sandbox (it lives on for other processes to use)."""
        self._leases.discard(lease)
        lease.reaped = lease.reaped or why

    async def release(self, lease: PooledSandbox) -> None:
        """Destroy a leased sandbox (it is never handed out again). Releasing twice is harmless."""
        if lease not in self._leases:
            return
        self._leases.discard(lease)
        lease.reaped = lease.reaped or "released"
        try:
            await self._destroy(lease._target)
        finally:
            if lease.on_release is not None:
                await lease.on_release(lease)

    async def wait_warm(self, spec: SandboxSpec | None = None, timeout: float = 120.0) -> None:
        """Block until every configured spec (or `spec`) has its full count of warm sandboxes."""
        keys = [spec_key(spec)] if spec is not None else list(self._slots)

        async def _wait() -> None:
            for key in keys:
                slot = self._slots[key]
                while len(slot.ready) < slot.target:
                    if self._closed:
                        raise PoolClosed("the SandboxPool was shut down while waiting for warm sandboxes")
                    slot.changed.clear()
                    await slot.changed.wait()

        await asyncio.wait_for(_wait(), timeout)

    def stats(self) -> PoolStats:
        live: defaultdict[str, int] = defaultdict(int)
        for lease in self._leases:
            live[lease.tenant] += 1
        return PoolStats(
            warm=sum(len(s.ready) for s in self._slots.values()),
            starting=sum(s.starting for s in self._slots.values()),
            live_per_tenant=dict(live),
            **{
                name: self._counts[name]
                for name in (
                    "created",
                    "warm_hits",
                    "cold_starts",
                    "reaped_idle",
                    "reaped_lifetime",
                    "warm_recycled",
                    "warmup_failures",
                )
            },
        )

    # -- internals -------------------------------------------------------------------------------

    def _take_warm(self, key: str) -> _Warm | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        now = time.monotonic()
        while slot.ready:
            warm = slot.ready.popleft()
            if now - warm.created < self.max_lifetime and warm.sandbox.healthy:
                self._refill(key)
                return warm
            self._counts["warm_recycled"] += 1
            self._spawn(self._destroy(warm.sandbox))
        self._refill(key)
        return None

    def _refill(self, key: str) -> None:
        slot = self._slots[key]
        while not self._closed and len(slot.ready) + slot.starting < slot.target:
            slot.starting += 1
            self._spawn(self._warm_one(key))

    async def _warm_one(self, key: str) -> None:
        slot = self._slots[key]
        try:
            if slot.failures:
                # A broken image or engine would otherwise be hammered in a tight loop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), min(30.0, 0.5 * 2 ** min(slot.failures, 6)))
                if self._closed:
                    slot.starting -= 1
                    return
            sandbox = await self._start_sandbox(slot.spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed warm-up must not kill the pool; it is retried
            slot.failures += 1
            self._counts["warmup_failures"] += 1
            log.warning("warming a sandbox for %s failed (%d in a row): %s", slot.spec.image, slot.failures, exc)
            slot.starting -= 1
            self._refill(key)
            return
        slot.starting -= 1
        slot.failures = 0
        if self._closed:
            await self._destroy(sandbox)
            return
        slot.ready.append(_Warm(sandbox, time.monotonic()))
        slot.changed.set()

    async def _start_sandbox(self, spec: SandboxSpec) -> Sandbox:
        sandbox = await self.backend.create(spec)
        self._counts["created"] += 1
        if not self.preload:
            return sandbox
        try:
            res = await sandbox.execute(self.preload, timeout=self.preload_timeout)
        except BaseException:
            await self._destroy(sandbox)
            raise
        if res.outcome != "ok":
            await self._destroy(sandbox)
            raise WarmupFailed(
                f"preload {self.preload!r} in image {spec.image} ended {res.outcome}: "
                f"{res.ename or res.died_cause or ''} {res.evalue or ''}".strip()
            )
        return sandbox

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval)
            await self.reap_now()

    async def reap_now(self) -> None:
        """One reaping pass (the background loop runs it every `reap_interval` seconds)."""
        now = time.monotonic()
        for lease in list(self._leases):
            if not lease.reapable:
                continue
            if now - lease.created >= self.max_lifetime:
                self._counts["reaped_lifetime"] += 1
                lease.reaped = f"it reached the maximum lifetime of {self.max_lifetime:g} s"
            elif not lease.busy and now - lease.last_active >= self.idle_timeout:
                if await self._used_elsewhere(lease, now) or lease not in self._leases:
                    continue
                self._counts["reaped_idle"] += 1
                lease.reaped = f"it was idle for more than {self.idle_timeout:g} s"
            else:
                continue
            log.info("reaping sandbox %s of tenant %r: %s", lease.id, lease.tenant, lease.reaped)
            self._leases.discard(lease)
            self._spawn(self._destroy(lease._target))
        for key, slot in self._slots.items():
            stale = [w for w in slot.ready if now - w.created >= self.max_lifetime]
            for warm in stale:
                slot.ready.remove(warm)
                self._counts["warm_recycled"] += 1
                self._spawn(self._destroy(warm.sandbox))
            if stale:
                self._refill(key)

    async def _used_elsewhere(self, lease: PooledSandbox, now: float) -> bool:
        """A sandbox other processes share (the Ray backend's) is idle only when idle for all of them:
        it says when it was last used; a recent use counts as this lease's activity."""
        probe = getattr(lease._target, "idle_seconds", None)
        if probe is None:
            return False
        try:
            idle = float(await probe())
        except Exception:  # noqa: BLE001 - a sandbox that cannot answer is reaped as idle
            return False
        if idle >= self.idle_timeout:
            return False
        lease.last_active = max(lease.last_active, now - idle)
        return True

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _destroy(sandbox: Sandbox) -> None:
        try:
            await sandbox.close()
        except Exception as exc:  # noqa: BLE001 - destruction is best effort; the reaper catches leftovers
            log.warning("closing sandbox %s failed: %s", sandbox.id, exc)
