"""Sandboxes as a tenant-scoped resource: create within quotas, execute (streamed), files, delete, reaping.

Live sandboxes are leases from one `SandboxPool`; this module keeps which tenant owns which, so a
tenant's calls only ever reach its own. A lease the pool reaped (idle, lifetime) is dropped here too.

With a backend whose sandboxes every process of a cluster reaches (the Ray backend's named actors),
the database's rows are the record of which sandboxes exist: a sandbox created through one API
replica is found in its row and attached to by another, and a replica that stops (or is killed)
leaves its sandboxes running for the others. A sandbox whose actor died (its node died) while no replica
held it is found so by the next call: its row is closed as `died: <cause>` (out of the tenant's quota), an
execution on it answers the `died` outcome with the cause, other calls a conflict naming it. One whose node
died while this replica held it stays the tenant's (status `dead`; restart places it anew, delete removes
it), its row `lost`: out of the quota, which a restart must fit again.

The server's jobs lease theirs here as well (`job_provider`): admitted by the same quota, recorded,
labelled and counted like the tenant's own, but not addressable through the API.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select, update

from sandbox import (
    DEFAULT_CPU_IMAGE,
    BackendKind,
    CapacityError,
    ExecutionResult,
    FileTransferError,
    Mount,
    Outcome,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SandboxProvider,
    SandboxReaped,
    SandboxSpec,
    SandboxStartError,
    SpecError,
    StatusEvent,
    StreamEvent,
    UsageError,
    WorkspacePathError,
    WorkspaceQuotaError,
)
from sandbox.pool import PooledSandbox, SandboxPool
from service.db import Database, SandboxRow, TenantRow

from .errors import (BadRequest, Conflict, NotFound, PayloadTooLarge, QuotaExceeded, Unauthenticated, Unavailable,
                     invalid)
from .metrics import ServiceMetrics
from .quotas import LOST, Resources, admit_job_sandbox, admit_sandbox, readmit_sandbox
from .tenants import Tenant

ALLOWED_IMAGE_PREFIX = "cellforge-sandbox:"
# The closed_reason of a sandbox found dead (its Ray actor died with its node): "died: <cause>".
DIED = "died: "
GONE = "its sandbox is gone (its Ray actor no longer exists)"  # closed on purpose, or its death left no record
# The largest file moved in or out of a sandbox in one call, on both transports (gRPC's message limit
# is sized from it).
MAX_FILE_BYTES = 64 << 20


class SandboxRequest(BaseModel):
    """What a tenant may ask for. No host mounts: data comes in as one of the tenant's datasets."""

    model_config = ConfigDict(extra="forbid")

    image: str = DEFAULT_CPU_IMAGE
    cpus: float = Field(default=1.0, gt=0, le=64)
    memory: str = "1g"
    gpus: int = Field(default=0, ge=0, le=16)
    timeout: float = Field(default=60.0, gt=0, le=86400)
    workspace_quota: str = "1g"
    env: dict[str, str] = Field(default_factory=dict)
    dataset_id: str | None = Field(default=None, description="an uploaded dataset, mounted read-only at /data")
    runtime: str | None = Field(default=None, description="container runtime (e.g. 'runsc'); never weaker "
                                                            "than the tenant's default")

    @property
    def resources(self) -> Resources:
        return Resources.of(self.memory, self.cpus, self.gpus)


@dataclass
class SandboxInfo:
    id: str
    tenant_id: str
    spec: dict[str, Any]
    status: str
    created_at: float
    dataset_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "created_at": self.created_at, "spec": self.spec,
                "dataset_id": self.dataset_id}


@dataclass
class _Live:
    lease: PooledSandbox
    tenant_id: str
    request: SandboxRequest
    created_at: float


def parse_request(data: Any) -> SandboxRequest:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise BadRequest(f"sandbox request: expected a JSON object, got {type(data).__name__}")
    try:
        request = SandboxRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid("sandbox request", exc.errors()) from None
    if not request.image.startswith(ALLOWED_IMAGE_PREFIX):
        raise BadRequest(f"image: only {ALLOWED_IMAGE_PREFIX}* images are served, got {request.image!r}")
    return request


class SandboxDied(Conflict):
    """A sandbox that died while no replica held it (its Ray actor died with its node); its row is closed."""

    def __init__(self, sandbox_id: str, cause: str, row: SandboxRow) -> None:
        super().__init__(f"sandbox {sandbox_id} died ({cause}); create a new sandbox")
        self.sandbox_id, self.cause, self.row = sandbox_id, cause, row

    def info(self) -> SandboxInfo:
        spec = {k: v for k, v in self.row.spec.items() if k in SandboxRequest.model_fields}
        return SandboxInfo(id=self.sandbox_id, tenant_id=self.row.tenant_id,
                           spec=SandboxRequest.model_validate(spec).model_dump(), status="dead",
                           created_at=self.row.created_at, dataset_id=spec.get("dataset_id"))


@contextlib.contextmanager
def _answers(sandbox_id: str) -> Iterator[None]:
    """The sandbox layer's errors for a file or command call, as the caller's answers."""
    try:
        yield
    except WorkspaceQuotaError as exc:
        raise PayloadTooLarge(str(exc)) from None
    except (WorkspacePathError, UsageError) as exc:
        raise BadRequest(str(exc)) from None
    except FileTransferError as exc:
        raise NotFound(str(exc)) from None
    except (SandboxReaped, SandboxClosedError):
        raise NotFound(f"sandbox {sandbox_id} is gone") from None
    except SandboxDeadError as exc:
        raise Conflict(str(exc)) from None


@dataclass
class _JobLease:
    lease: PooledSandbox
    tenant_id: str
    job_id: str


class JobSandboxes(SandboxProvider):
    """The provider a job's pipeline gets: the server's sandboxes, leased for the job's tenant and counted
    against its quota (`CapacityError` while it is full: the pipeline waits for room)."""

    def __init__(self, service: SandboxService, tenant_id: str, job_id: str) -> None:
        self.service, self.tenant_id, self.job_id = service, tenant_id, job_id

    @property
    def kind(self) -> BackendKind:
        return self.service.pool.backend.kind

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.service.loop

    async def lease(self, spec: SandboxSpec) -> PooledSandbox:
        return await self.service.lease_for_job(spec, self.tenant_id, self.job_id)


class SandboxService:
    def __init__(self, pool: SandboxPool, db: Database, metrics: ServiceMetrics,
                 dataset_dir: Callable[[str, str], Path], owner: str | None = None) -> None:
        self.pool = pool
        self.owner = owner  # this replica's name, on the rows of the sandboxes it creates
        # Sandboxes other replicas reach (the backend attaches to them by id): the rows are the record.
        self.shared = bool(getattr(pool.backend, "shared", False))
        self._adopting: dict[str, asyncio.Lock] = {}
        self.db = db
        self.metrics = metrics
        self._dataset_dir = dataset_dir  # (tenant id, dataset id) -> host folder; NotFound for others' ids
        self._live: dict[str, _Live] = {}
        self._jobs: dict[str, _JobLease] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._losing: dict[str, asyncio.Future[None]] = {}  # rows being marked lost

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The server's event loop, where every sandbox lives (set by `start`)."""
        if self._loop is None:
            raise RuntimeError("SandboxService.start() has not run")
        return self._loop

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    def job_provider(self, tenant_id: str, job_id: str) -> JobSandboxes:
        return JobSandboxes(self, tenant_id, job_id)

    async def lease_for_job(self, spec: SandboxSpec, tenant_id: str, job_id: str) -> PooledSandbox:
        """A sandbox for a job of `tenant_id`, labelled with both, within the tenant's quota (the same
        admission as `create`; `CapacityError` while there is no room). Closing it ends the lease and its
        record. Not reaped for idleness or age: the job's own budget ends it."""
        spec = spec.model_copy(update={"labels": {**spec.labels, "tenant": tenant_id, "job": job_id}})
        want = Resources.of(spec.memory, spec.cpus, len(spec.gpus) if isinstance(spec.gpus, list) else spec.gpus or 0)
        reservation = "rsv_" + secrets.token_hex(8)
        row = SandboxRow(id=reservation, tenant_id=tenant_id, status="starting", created_at=time.time(),
                         spec={"job_id": job_id, "image": spec.image, "resources": want.as_dict()})
        try:
            await self.db.run(admit_job_sandbox, self.db, tenant_id, job_id, row, want)
        except QuotaExceeded as exc:
            raise CapacityError(str(exc), retry_after=float(exc.retry_after)) from None
        try:
            lease = await self.pool.acquire(spec, tenant=tenant_id, reapable=False, on_release=self._job_released)
        except BaseException:
            await self.db.run(self._close_row, reservation, "did not start")
            raise
        self._jobs[lease.id] = _JobLease(lease, tenant_id, job_id)
        self._count()
        await self.db.run(self._activate_row, reservation, lease.id, tenant_id)
        return lease

    async def _job_released(self, lease: PooledSandbox) -> None:
        if self._jobs.pop(lease.id, None) is not None:
            self._count()
            await self.db.run(self._close_row, lease.id, lease.reaped or "released")

    async def close_job(self, job_id: str) -> int:
        """Give back the sandboxes a job still holds (it ended: cancelled, failed; its pipeline thread may
        not have noticed yet). Returns how many."""
        mine = [held.lease for held in self._jobs.values() if held.job_id == job_id]
        await asyncio.gather(*(lease.close() for lease in mine), return_exceptions=True)
        return len(mine)

    def _count(self) -> None:
        self.metrics.live_sandboxes.set(len(self._live) + len(self._jobs))
        self.metrics.job_sandboxes.set(len(self._jobs))

    # -- lifecycle ------------------------------------------------------------------------------

    async def recover_after_restart(self) -> None:
        """Rows of sandboxes a previous process of this replica left open. Unshared: their containers are
        gone (reaped), so the rows are closed. Shared: only rows whose sandbox no longer exists anywhere in
        the cluster are closed; the others stay usable through any replica."""
        if not self.shared:
            await self.db.run(self._close_rows, None, "server restarted")
            return
        alive = await self.pool.backend.live_ids()  # type: ignore[attr-defined]
        gone = set(await self.db.run(self._live_rows, None)) - alive
        for sid, cause in (await self.pool.backend.death_causes(gone)).items():  # type: ignore[attr-defined]
            await self.db.run(self._close_row, sid, DIED + cause)
        await self.db.run(self._close_rows, alive, GONE)

    def _close_rows(self, alive: set[str] | None, reason: str) -> None:
        mine = SandboxRow.owner.is_(None) | (SandboxRow.owner == self.owner)
        with self.db.session() as s:
            if alive is None:
                s.execute(update(SandboxRow).where(SandboxRow.status.in_(("starting", "live", LOST)), mine).values(
                    status="closed", closed_at=time.time(), closed_reason=reason))
                return
            # A `starting` row of another replica may be a sandbox being placed right now: not ours to close.
            s.execute(update(SandboxRow).where(SandboxRow.status == "starting", mine).values(
                status="closed", closed_at=time.time(), closed_reason=reason))
            s.execute(update(SandboxRow).where(SandboxRow.status.in_(("live", LOST)), SandboxRow.id.not_in(alive))
                      .values(status="closed", closed_at=time.time(), closed_reason=reason))

    async def close_all(self) -> None:
        jobs = [held.lease.close() for held in list(self._jobs.values())]
        if self.shared:
            # The sandboxes live on for the other replicas (and this one's next start): only let go of them.
            for live in self._live.values():
                self.pool.forget(live.lease, "this API replica shut down")
                live.lease._target.detach()  # type: ignore[attr-defined]
            self._live.clear()
            await asyncio.gather(*jobs, return_exceptions=True)
            return
        await asyncio.gather(*(self._drop(sid, "server shut down") for sid in list(self._live)), *jobs,
                             return_exceptions=True)

    async def close_tenant(self, tenant_id: str, reason: str) -> int:
        """Close every sandbox of a tenant (its key was revoked); returns how many. Shared: also those this
        replica does not hold (every replica closes what it finds; a second close is harmless)."""
        if self.shared:
            for sid in await self.db.run(self._live_rows, tenant_id):
                if sid not in self._live:
                    with contextlib.suppress(NotFound, Conflict):
                        await self._adopt(tenant_id, sid)
        mine = [sid for sid, live in self._live.items() if live.tenant_id == tenant_id]
        await asyncio.gather(*(self._drop(sid, reason) for sid in mine))
        return len(mine)

    # -- tenant calls ---------------------------------------------------------------------------

    async def create(self, tenant: Tenant, request: SandboxRequest) -> SandboxInfo:
        """Start a sandbox within the tenant's quotas. The quota check and a `starting` row are one
        transaction, so parallel creates cannot overshoot; the row becomes the live sandbox's."""
        spec = await self.db.run(self._spec, tenant, request)
        await self.prune()
        reservation = "rsv_" + secrets.token_hex(8)
        row = SandboxRow(id=reservation, tenant_id=tenant.id, status="starting", created_at=time.time(), owner=self.owner,
                         spec={**request.model_dump(), "resources": request.resources.as_dict()})
        await self.db.run(admit_sandbox, self.db, tenant.id, row, request.resources)
        try:
            lease = await self.pool.acquire(spec, tenant=tenant.id)
        except BaseException as exc:
            await self.db.run(self._close_row, reservation, "did not start")
            if isinstance(exc, SandboxStartError):
                raise Unavailable(f"the sandbox did not start: {exc}") from None
            if isinstance(exc, SandboxError):
                raise Unavailable(f"no sandbox available: {exc}") from None
            raise
        live = _Live(lease=lease, tenant_id=tenant.id, request=request, created_at=time.time())
        self._live[lease.id] = live
        self._watch_loss(lease)
        self._count()
        if not await self.db.run(self._activate_row, reservation, lease.id, tenant.id):
            # Revoked while it started: the revocation closed the tenant's other sandboxes already.
            await self._drop(lease.id, "its tenant's API key was revoked")
            raise Unauthenticated("this API key was revoked")
        return self._info(lease.id, live)

    async def get(self, tenant: Tenant, sandbox_id: str) -> SandboxInfo:
        try:
            return self._info(sandbox_id, await self._own(tenant, sandbox_id))
        except SandboxDied as exc:
            return exc.info()

    async def list(self, tenant: Tenant) -> list[SandboxInfo]:
        await self.prune()
        if self.shared:  # those created through other replicas too
            for sid in await self.db.run(self._live_rows, tenant.id):
                if sid not in self._live:
                    with contextlib.suppress(NotFound, Conflict):
                        await self._adopt(tenant.id, sid)
        return [self._info(sid, lv) for sid, lv in self._live.items() if lv.tenant_id == tenant.id]

    async def delete(self, tenant: Tenant, sandbox_id: str) -> None:
        try:
            await self._own(tenant, sandbox_id)
        except SandboxDied as exc:  # nothing left to remove; from now on it answers as deleted
            await self.db.run(self._close_row, sandbox_id, f"deleted by its tenant (it had died: {exc.cause})")
            return
        await self._drop(sandbox_id, "deleted by its tenant")

    async def execute(
        self, tenant: Tenant, sandbox_id: str, code: str, timeout: float | None, transport: str
    ) -> AsyncGenerator[StreamEvent | ExecutionResult, None]:
        """The execution's events as they happen, then its result. Closing the iterator early (a
        client that went away) interrupts the code."""
        if not isinstance(code, str):
            raise BadRequest(f"code: expected a string, got {type(code).__name__}")
        if timeout is not None and not (0 < timeout <= 86400):
            raise BadRequest(f"timeout: expected seconds in (0, 86400], got {timeout}")
        try:
            live = await self._own(tenant, sandbox_id)
        except SandboxDied as exc:  # as an execution running when its node died ends
            self.metrics.executions.labels(outcome=Outcome.DIED.value, transport=transport).inc()
            yield StatusEvent(state="died", detail=exc.cause)
            yield ExecutionResult(outcome=Outcome.DIED, died_cause=exc.cause, state_lost=True)
            return
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            async for item in live.lease.stream(code, timeout=timeout):
                if isinstance(item, ExecutionResult):
                    outcome = item.outcome.value
                yield item
        except (SandboxReaped, SandboxClosedError):
            raise NotFound(f"sandbox {sandbox_id} is gone: {live.lease.reaped or 'closed'}") from None
        except SandboxDeadError as exc:
            raise Conflict(f"{exc}") from None
        finally:
            self.metrics.executions.labels(outcome=outcome, transport=transport).inc()
            self.metrics.execution_seconds.observe(time.perf_counter() - started)

    async def interrupt(self, tenant: Tenant, sandbox_id: str) -> None:
        await self._control(await self._own(tenant, sandbox_id), "interrupt")

    async def restart(self, tenant: Tenant, sandbox_id: str) -> None:
        live = await self._own(tenant, sandbox_id)
        if not getattr(live.lease._target, "lost", False):
            await self._control(live, "restart")
            return
        # Its node died: placed anew, it uses resources again, so it must fit the quota again.
        if (marking := self._losing.get(sandbox_id)) is not None:
            await marking
        readmitted = await self.db.run(readmit_sandbox, self.db, tenant.id, sandbox_id, live.request.resources)
        try:
            await self._control(live, "restart")
        except BaseException:
            if readmitted:
                await self.db.run(self._set_status, sandbox_id, "live", LOST)
            raise

    def _watch_loss(self, lease: PooledSandbox) -> None:
        """When the sandbox's Ray node dies, its row turns `lost` (out of the quota) at once."""
        hooks = getattr(lease._target, "on_lost", None)
        if hooks is None:
            return

        def lost(cause: str) -> None:
            marking = asyncio.ensure_future(self.db.run(self._set_status, lease.id, "live", LOST))
            self._losing[lease.id] = marking

            def marked(_: object) -> None:
                if self._losing.get(lease.id) is marking:
                    del self._losing[lease.id]

            marking.add_done_callback(marked)

        hooks.append(lost)

    async def put_file(self, tenant: Tenant, sandbox_id: str, path: str, data: bytes) -> None:
        if len(data) > MAX_FILE_BYTES:
            raise PayloadTooLarge(f"file {path!r} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
        live = await self._own(tenant, sandbox_id)
        with _answers(sandbox_id):
            await live.lease.files.put(path, data)

    async def get_file(self, tenant: Tenant, sandbox_id: str, path: str) -> bytes:
        live = await self._own(tenant, sandbox_id)
        with _answers(sandbox_id):
            return await live.lease.files.get(path, max_bytes=MAX_FILE_BYTES)

    async def list_files(self, tenant: Tenant, sandbox_id: str, folder: str = "") -> builtins.list[str]:
        live = await self._own(tenant, sandbox_id)
        with _answers(sandbox_id):
            return await live.lease.files.list(folder)

    async def run_command(self, tenant: Tenant, sandbox_id: str, argv: builtins.list[str], cwd: str | None,
                          timeout: float | None) -> ExecutionResult:
        """`argv` run without a shell; `ok` only for exit code 0 (the code is in `exit_code`)."""
        live = await self._own(tenant, sandbox_id)
        with _answers(sandbox_id):
            return await live.lease.commands.run(argv, cwd=cwd, timeout=timeout)

    # -- internals ------------------------------------------------------------------------------

    async def prune(self) -> None:
        """Forget leases the pool reaped (idle or too old), recording why (and freeing their quota), and
        sandboxes another replica closed (it recorded why)."""
        for sid, live in list(self._live.items()):
            if live.lease.reaped and self._live.pop(sid, None) is not None:
                await self.db.run(self._close_row, sid, live.lease.reaped)
            elif self._closed_elsewhere(live) and self._live.pop(sid, None) is not None:
                self.pool.forget(live.lease, "closed through another API replica")
        self._count()
        self.metrics.warm_sandboxes.set(self.pool.stats().warm)

    async def _own(self, tenant: Tenant, sandbox_id: str) -> _Live:
        live = self._live.get(sandbox_id)
        if live is not None and self.shared and not live.lease.healthy and not live.lease.reaped:
            # Closed or lost as seen from here: the row says whether another replica closed it.
            if await self.db.run(self._live_row, live.tenant_id, sandbox_id) is None:
                self._live.pop(sandbox_id, None)
                self.pool.forget(live.lease, "closed through another API replica")
                mine = live.tenant_id == tenant.id  # another tenant's answers like one that does not exist
                raise NotFound(f"sandbox {sandbox_id!r} is gone: closed through another API replica" if mine
                               else f"no sandbox {sandbox_id!r}")
        if live is None and self.shared:
            live = await self._adopt(tenant.id, sandbox_id)
        # Another tenant's sandbox answers exactly like one that does not exist.
        if live is None or live.tenant_id != tenant.id:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        if live.lease.reaped:
            raise NotFound(f"sandbox {sandbox_id!r} is gone: {live.lease.reaped}")
        return live

    def _closed_elsewhere(self, live: _Live) -> bool:
        return self.shared and bool(getattr(live.lease._target, "closed", False)) and not live.lease.reaped

    async def _adopt(self, tenant_id: str, sandbox_id: str) -> _Live:
        """A sandbox of the tenant created through another replica (its row is live), attached to here.
        NotFound when there is none (another tenant's answers the same)."""
        lock = self._adopting.setdefault(sandbox_id, asyncio.Lock())
        try:
            async with lock:
                if (held := self._live.get(sandbox_id)) is not None:
                    return held
                row = await self.db.run(self._live_row, tenant_id, sandbox_id)
                if row is None:
                    died = await self.db.run(self._died_row, tenant_id, sandbox_id)
                    if died is not None:
                        raise SandboxDied(sandbox_id, (died.closed_reason or "").removeprefix(DIED), died)
                    raise NotFound(f"no sandbox {sandbox_id!r}")
                try:
                    sandbox = await self.pool.backend.attach(sandbox_id)  # type: ignore[attr-defined]
                except SandboxClosedError:
                    # The row says it lives, its actor is gone: it died (its node died) while no replica held
                    # it, or it was closed a moment ago. Either way its row closes (out of the quota).
                    cause = (await self.pool.backend.death_causes({sandbox_id})).get(sandbox_id)  # type: ignore[attr-defined]
                    reason = DIED + cause if cause else GONE
                    await self.db.run(self._close_row, sandbox_id, reason)
                    if cause:
                        raise SandboxDied(sandbox_id, cause, row) from None
                    raise NotFound(f"no sandbox {sandbox_id!r}") from None
                except SandboxDeadError as exc:
                    raise Conflict(str(exc)) from None
                spec = {k: v for k, v in row.spec.items() if k in SandboxRequest.model_fields}
                lease = self.pool.adopt(sandbox, tenant_id, age=max(0.0, time.time() - row.created_at))
                live = _Live(lease=lease, tenant_id=tenant_id, request=SandboxRequest.model_validate(spec),
                             created_at=row.created_at)
                self._live[sandbox_id] = live
                self._watch_loss(lease)
                self._count()
                return live
        finally:
            if not lock.locked():
                self._adopting.pop(sandbox_id, None)

    def _live_row(self, tenant_id: str, sandbox_id: str) -> SandboxRow | None:
        """Its row while the sandbox is the tenant's (live, or lost with its node and not yet restarted)."""
        with self.db.session() as s:
            return s.scalar(select(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.tenant_id == tenant_id,
                                                     SandboxRow.status.in_(("live", LOST))))

    def _live_rows(self, tenant_id: str | None) -> builtins.list[str]:
        """The live (and lost) rows of a tenant (None: of every tenant)."""
        query = select(SandboxRow.id).where(SandboxRow.status.in_(("live", LOST)))
        if tenant_id is not None:
            query = query.where(SandboxRow.tenant_id == tenant_id)
        with self.db.session() as s:
            return list(s.scalars(query))

    def _died_row(self, tenant_id: str, sandbox_id: str) -> SandboxRow | None:
        with self.db.session() as s:
            return s.scalar(select(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.tenant_id == tenant_id,
                                                     SandboxRow.status == "closed",
                                                     SandboxRow.closed_reason.startswith(DIED)))

    async def _control(self, live: _Live, what: str) -> None:
        try:
            await getattr(live.lease, what)()
        except (SandboxReaped, SandboxClosedError):
            raise NotFound(f"sandbox {live.lease.id} is gone") from None
        except SandboxDeadError as exc:
            raise Conflict(str(exc)) from None
        except SandboxStartError as exc:
            # The restart failed: the sandbox is now dead (its status says so); another restart
            # starts its container afresh.
            raise Unavailable(f"{exc}; restart it again for a fresh container, or delete it") from None

    async def _drop(self, sandbox_id: str, reason: str) -> None:
        live = self._live.pop(sandbox_id, None)
        if live is None:
            return
        self._count()
        try:
            await live.lease.close()
        finally:
            await self.db.run(self._close_row, sandbox_id, reason)

    def _spec(self, tenant: Tenant, request: SandboxRequest) -> SandboxSpec:
        """The engine's spec for a request (blocking: a dataset id is looked up in the database)."""
        runtime = tenant.runtime_for(request.runtime)
        mounts = []
        if request.dataset_id:
            mounts.append(Mount(source=str(self._dataset_dir(tenant.id, request.dataset_id)), target="/data"))
        try:
            return SandboxSpec.parse({
                "image": request.image, "cpus": request.cpus, "memory": request.memory,
                "gpus": request.gpus or None, "timeout": request.timeout,
                "workspace_quota": request.workspace_quota, "env": request.env,
                "labels": {"tenant": tenant.id}, "mounts": [m.model_dump() for m in mounts],
                "runtime": runtime,
            })
        except SpecError as exc:
            raise BadRequest(str(exc)) from None

    def _info(self, sandbox_id: str, live: _Live) -> SandboxInfo:
        return SandboxInfo(id=sandbox_id, tenant_id=live.tenant_id, spec=live.request.model_dump(),
                           status="dead" if live.lease.dead else "live", created_at=live.created_at,
                           dataset_id=live.request.dataset_id)

    def _activate_row(self, reservation: str, sid: str, tenant_id: str) -> bool:
        """The reservation becomes the live sandbox's row; False if the tenant was revoked meanwhile."""
        with self.db.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id == reservation).values(id=sid, status="live"))
            return s.scalar(select(TenantRow.revoked_at).where(TenantRow.id == tenant_id)) is None

    def _set_status(self, sid: str, was: str, status: str) -> None:
        with self.db.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id == sid, SandboxRow.status == was).values(status=status))

    def _close_row(self, sid: str, reason: str) -> None:
        with self.db.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id == sid).values(
                status="closed", closed_at=time.time(), closed_reason=reason))
