"""Tenant quotas, decided atomically: each admission (a sandbox, a job, a dataset) reads what the tenant
holds and records its own claim in one transaction holding the tenant's lock (`BEGIN IMMEDIATE` on
SQLite, `SELECT ... FOR UPDATE` of the tenant row on PostgreSQL), so parallel requests cannot all pass
the same check.

What counts against what:
- `max_sandboxes`: the tenant's sandboxes that are starting or live, its own (the API's) and those its
  jobs lease (a design run's attempts, a regression run's sandbox) alike; not those `lost` (their Ray node
  died while a replica held them: no container, no resources) until a restart places them anew;
- `max_jobs`: its queued and running jobs of every kind (design, regression pytest/rescore/replay);
- `max_memory`, `max_cpus`, `max_gpus`: its own sandboxes, plus for every queued or running job the larger
  of one sandbox of its size (reserved from its acceptance to its end) and the sandboxes it holds now (a
  design run may run its folds side by side).
A job's sandbox beyond those limits is not refused for good: `admit_job_sandbox` raises `QuotaExceeded`,
and the job waits for room (`CapacityError` in the sandbox layer).
- `max_storage`: the bytes of its datasets.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.spec import parse_size
from service.db import Database, JobRow

from .errors import QuotaExceeded, Unauthenticated
from service.db import DatasetRow, SandboxRow, TenantRow
from .tenants import Tenant

HELD_SANDBOX_STATES = ("starting", "live")
# A held sandbox whose Ray node died: still the tenant's (restartable, deletable), no longer using anything.
LOST = "lost"
ACTIVE_JOB_STATES = ("queued", "running")
GIB = 1 << 30


@dataclass(frozen=True)
class Resources:
    """What one sandbox takes: memory in bytes, CPUs, GPUs."""

    memory: int = 0
    cpus: float = 0.0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.memory + other.memory, self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.memory - other.memory, self.cpus - other.cpus, self.gpus - other.gpus)

    def most(self, other: Resources) -> Resources:
        """The larger of each amount."""
        return Resources(max(self.memory, other.memory), max(self.cpus, other.cpus), max(self.gpus, other.gpus))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, memory: str | int = 0, cpus: float = 0.0, gpus: int = 0) -> Resources:
        return cls(parse_size(memory) if memory else 0, float(cpus or 0.0), int(gpus or 0))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Resources:
        data = data or {}
        return cls(int(data.get("memory", 0)), float(data.get("cpus", 0.0)), int(data.get("gpus", 0)))


@dataclass(frozen=True)
class Usage:
    sandboxes: int  # starting or live, the jobs' included
    jobs: int
    resources: Resources
    storage: int
    by_job: dict[str, tuple[Resources, Resources]]  # active job -> (its reservation, what its sandboxes hold)


def usage(s: Session, tenant_id: str) -> Usage:
    own, count = Resources(), 0
    held_by_job: defaultdict[str, Resources] = defaultdict(Resources)
    for spec in s.scalars(select(SandboxRow.spec).where(SandboxRow.tenant_id == tenant_id,
                                                        SandboxRow.status.in_(HELD_SANDBOX_STATES))):
        count += 1
        size = Resources.from_dict(spec.get("resources"))
        if spec.get("job_id"):
            held_by_job[spec["job_id"]] += size
        else:
            own += size
    by_job = {job_id: (Resources.from_dict((params or {}).get("resources")), held_by_job.pop(job_id, Resources()))
              for job_id, params in s.execute(select(JobRow.id, JobRow.params).where(
                  JobRow.tenant_id == tenant_id, JobRow.status.in_(ACTIVE_JOB_STATES)))}
    # A job's sandboxes after its end (closed a moment later) count in full.
    total = sum((reserved.most(holding) for reserved, holding in by_job.values()), own + sum(held_by_job.values(),
                                                                                              Resources()))
    return Usage(count, len(by_job), total, _stored(s, tenant_id), by_job)


def _stored(s: Session, tenant_id: str) -> int:
    return int(s.scalar(select(func.coalesce(func.sum(DatasetRow.size_bytes), 0))
                        .where(DatasetRow.tenant_id == tenant_id)) or 0)


@contextlib.contextmanager
def admission(db: Database, tenant_id: str) -> Iterator[tuple[Session, Tenant, Usage]]:
    """The tenant (its limits as stored now) and its usage, in a transaction that holds the tenant's
    lock until the caller's claim is committed."""
    with db.serialized() as s:
        yield s, _locked_tenant(s, tenant_id), usage(s, tenant_id)


def _locked_tenant(s: Session, tenant_id: str) -> Tenant:
    row = s.scalar(select(TenantRow).where(TenantRow.id == tenant_id).with_for_update())
    if row is None or row.revoked_at is not None:
        raise Unauthenticated("this API key was revoked")
    return Tenant.from_row(row)


def fits(tenant: Tenant, held: Resources, want: Resources, what: str) -> None:
    """QuotaExceeded unless `want` on top of `held` stays within the tenant's memory, CPUs and GPUs."""
    total = held + want
    if total.gpus > tenant.max_gpus:
        raise QuotaExceeded(f"tenant {tenant.name!r} may use {tenant.max_gpus} GPUs; {what} would bring it to "
                            f"{total.gpus}", retry_after=30)
    if total.memory > tenant.max_memory_bytes:
        raise QuotaExceeded(f"tenant {tenant.name!r} may use {tenant.max_memory} of sandbox memory; {what} "
                            f"({want.memory / GIB:.2f} GiB) would bring it to {total.memory / GIB:.2f} GiB",
                            retry_after=30)
    if total.cpus > tenant.max_cpus + 1e-9:
        raise QuotaExceeded(f"tenant {tenant.name!r} may use {tenant.max_cpus:g} CPUs; {what} "
                            f"({want.cpus:g}) would bring it to {total.cpus:g}", retry_after=30)


def within_limits(tenant: Tenant, want: Resources, what: str) -> None:
    """QuotaExceeded for a size the tenant could never get, held nothing else."""
    fits(tenant, Resources(), want, what)


def admit_sandbox(db: Database, tenant_id: str, row: SandboxRow, want: Resources) -> None:
    """Record a starting sandbox if the tenant's sandbox count and resources allow it."""
    with admission(db, tenant_id) as (s, tenant, held):
        if held.sandboxes + 1 > tenant.max_sandboxes:
            raise QuotaExceeded(f"tenant {tenant.name!r} holds {held.sandboxes} live sandboxes (quota "
                                f"{tenant.max_sandboxes}); delete one first", retry_after=5)
        fits(tenant, held.resources, want, "this sandbox")
        s.add(row)


def readmit_sandbox(db: Database, tenant_id: str, sandbox_id: str, want: Resources) -> bool:
    """A `lost` sandbox about to be placed anew (restart) counts again if the tenant's sandbox count and resources
    allow it (QuotaExceeded if not); False when its row is not `lost` (nothing to readmit)."""
    with admission(db, tenant_id) as (s, tenant, held):
        row = s.scalar(select(SandboxRow).where(SandboxRow.id == sandbox_id, SandboxRow.tenant_id == tenant_id,
                                                SandboxRow.status == LOST))
        if row is None:
            return False
        if held.sandboxes + 1 > tenant.max_sandboxes:
            raise QuotaExceeded(f"tenant {tenant.name!r} holds {held.sandboxes} live sandboxes (quota "
                                f"{tenant.max_sandboxes}); restarting sandbox {sandbox_id}, whose node died, would "
                                "exceed it: delete one first", retry_after=5)
        fits(tenant, held.resources, want, f"restarting sandbox {sandbox_id}")
        row.status = "live"
        return True


def admit_job_sandbox(db: Database, tenant_id: str, job_id: str, row: SandboxRow, want: Resources) -> None:
    """Record a starting sandbox of a job if the tenant's sandbox count and resources allow it; its resources
    count beyond what the job reserved only (its first sandbox of the job's size is always within them)."""
    with admission(db, tenant_id) as (s, tenant, held):
        if held.sandboxes + 1 > tenant.max_sandboxes:
            raise QuotaExceeded(f"tenant {tenant.name!r} holds {held.sandboxes} live sandboxes (quota "
                                f"{tenant.max_sandboxes})", retry_after=5)
        reserved, holding = held.by_job.get(job_id, (Resources(), Resources()))
        extra = reserved.most(holding + want) - reserved.most(holding)
        fits(tenant, held.resources, extra, "this job's sandbox")
        s.add(row)


def job_admitter(tenant_id: str, want: Resources) -> Callable[[Session], None]:
    """For `JobStore.create(admit=...)`: the job quota and the job sandbox's resources, checked in the
    transaction that queues the job (which holds the write lock; the tenant row is locked too)."""

    def admit(s: Session) -> None:
        tenant, held = _locked_tenant(s, tenant_id), usage(s, tenant_id)
        if held.jobs + 1 > tenant.max_jobs:
            raise QuotaExceeded(f"tenant {tenant.name!r} has {held.jobs} queued or running jobs (quota "
                                f"{tenant.max_jobs}); wait for one to finish", retry_after=30)
        fits(tenant, held.resources, want, "this job's sandbox")

    return admit


def precheck_job(db: Database, tenant_id: str, want: Resources) -> None:
    """The same check without taking the lock: refuses early (before costly work) what is already
    over quota; only the admission itself decides."""
    with db.session() as s:
        job_admitter(tenant_id, want)(s)


def admit_dataset(db: Database, tenant_id: str, row: DatasetRow) -> None:
    """Record an uploaded dataset if the tenant's storage allows it."""
    with admission(db, tenant_id) as (s, tenant, held):
        check_storage(tenant, held.storage, row.size_bytes)
        s.add(row)


def check_storage(tenant: Tenant, used: int, adding: int) -> None:
    if used + adding > tenant.max_storage_bytes:
        raise QuotaExceeded(f"tenant {tenant.name!r} may store {tenant.max_storage} of datasets; it holds "
                            f"{used / GIB:.3f} GiB and this upload would add {adding / GIB:.3f} GiB",
                            retry_after=60)


def stored_bytes(db: Database, tenant_id: str) -> int:
    with db.session() as s:
        return _stored(s, tenant_id)


class UploadMeter:
    """Upload bytes in flight per tenant: an upload stops as soon as what the tenant stores plus what
    all its uploads have sent so far passes its storage quota (the insert then decides atomically)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._in_flight: defaultdict[str, int] = defaultdict(int)

    async def metered(self, tenant: Tenant, chunks: AsyncIterator[bytes],
                      declared: int | None = None) -> AsyncGenerator[bytes, None]:
        used = await self.db.run(stored_bytes, self.db, tenant.id)
        if declared:
            check_storage(tenant, used + self._in_flight.get(tenant.id, 0), declared)
        sent = 0
        try:
            async for chunk in chunks:
                sent += len(chunk)
                self._in_flight[tenant.id] += len(chunk)
                check_storage(tenant, used + self._in_flight[tenant.id] - sent, sent)
                yield chunk
        finally:
            self._in_flight[tenant.id] -= sent
            if not self._in_flight[tenant.id]:
                del self._in_flight[tenant.id]
