"""Sandboxes as a tenant-scoped resource: create within quotas, execute (streamed), files, delete, reaping.

Live sandboxes are leases from one `SandboxPool`; this module keeps which tenant owns which, so a
tenant's calls only ever reach its own. A lease the pool reaped (idle, lifetime) is dropped here too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import update

from sandbox import ExecutionResult, SandboxSpec, StreamEvent
from sandbox.errors import (
    FileTransferError,
    SandboxClosedError,
    SandboxDeadError,
    SandboxError,
    SandboxStartError,
    SpecError,
    WorkspacePathError,
    WorkspaceQuotaError,
)
from sandbox.images import DEFAULT_CPU_IMAGE
from sandbox.pool import PooledSandbox, SandboxPool, SandboxReaped
from sandbox.spec import Mount, parse_size
from service.jobs.db import Database

from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge, QuotaExceeded, Unavailable
from .metrics import ServiceMetrics
from .records import SandboxRow
from .tenants import Tenant

ALLOWED_IMAGE_PREFIX = "cellforge-sandbox:"
MAX_FILE_BYTES = 256 << 20


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
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise BadRequest(f"invalid sandbox request: {problems}") from None
    if not request.image.startswith(ALLOWED_IMAGE_PREFIX):
        raise BadRequest(f"image: only {ALLOWED_IMAGE_PREFIX}* images are served, got {request.image!r}")
    return request


class SandboxService:
    def __init__(self, pool: SandboxPool, db: Database, metrics: ServiceMetrics,
                 dataset_dir: Callable[[str, str], Path]) -> None:
        self.pool = pool
        self.db = db
        self.metrics = metrics
        self._dataset_dir = dataset_dir  # (tenant id, dataset id) -> host folder; NotFound for others' ids
        self._live: dict[str, _Live] = {}
        self._reserved: dict[str, list[_Live | SandboxRequest]] = {}
        self._lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    def mark_lost_after_restart(self) -> None:
        """Rows of sandboxes from a previous server process: their containers are gone (reaped)."""
        with self.db.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.status == "live").values(
                status="closed", closed_at=time.time(), closed_reason="server restarted"))

    async def close_all(self) -> None:
        for sid in list(self._live):
            await self._drop(sid, "server shut down")

    # -- tenant calls ---------------------------------------------------------------------------

    async def create(self, tenant: Tenant, request: SandboxRequest) -> SandboxInfo:
        spec = self._spec(tenant, request)
        async with self._lock:
            self.prune()
            mine = [lv.request for lv in self._live.values() if lv.tenant_id == tenant.id]
            mine += self._reserved.get(tenant.id, [])
            self._check_quota(tenant, request, mine)
            self._reserved.setdefault(tenant.id, []).append(request)
        try:
            lease = await self.pool.acquire(spec, tenant=tenant.id)
        except SandboxStartError as exc:
            raise Unavailable(f"the sandbox did not start: {exc}") from None
        except SandboxError as exc:
            raise Unavailable(f"no sandbox available: {exc}") from None
        finally:
            self._reserved[tenant.id].remove(request)
        live = _Live(lease=lease, tenant_id=tenant.id, request=request, created_at=time.time())
        self._live[lease.id] = live
        self.metrics.live_sandboxes.set(len(self._live))
        spec_dict = request.model_dump()
        await asyncio.to_thread(self._insert_row, lease.id, tenant.id, spec_dict, live.created_at)
        return self._info(lease.id, live)

    def get(self, tenant: Tenant, sandbox_id: str) -> SandboxInfo:
        return self._info(sandbox_id, self._own(tenant, sandbox_id))

    def list(self, tenant: Tenant) -> list[SandboxInfo]:
        self.prune()
        return [self._info(sid, lv) for sid, lv in self._live.items() if lv.tenant_id == tenant.id]

    async def delete(self, tenant: Tenant, sandbox_id: str) -> None:
        self._own(tenant, sandbox_id)
        await self._drop(sandbox_id, "deleted by its tenant")

    async def execute(
        self, tenant: Tenant, sandbox_id: str, code: str, timeout: float | None, transport: str
    ) -> AsyncIterator[StreamEvent | ExecutionResult]:
        """The execution's events as they happen, then its result. Closing the iterator early (a
        client that went away) interrupts the code."""
        if not isinstance(code, str):
            raise BadRequest(f"code: expected a string, got {type(code).__name__}")
        if timeout is not None and not (0 < timeout <= 86400):
            raise BadRequest(f"timeout: expected seconds in (0, 86400], got {timeout}")
        live = self._own(tenant, sandbox_id)
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
        await self._control(self._own(tenant, sandbox_id), "interrupt")

    async def restart(self, tenant: Tenant, sandbox_id: str) -> None:
        await self._control(self._own(tenant, sandbox_id), "restart")

    async def put_file(self, tenant: Tenant, sandbox_id: str, path: str, data: bytes) -> None:
        if len(data) > MAX_FILE_BYTES:
            raise PayloadTooLarge(f"file {path!r} is {len(data)} bytes; the limit is {MAX_FILE_BYTES}")
        live = self._own(tenant, sandbox_id)
        try:
            await live.lease.put_file(path, data)
        except WorkspaceQuotaError as exc:
            raise PayloadTooLarge(str(exc)) from None
        except WorkspacePathError as exc:
            raise BadRequest(str(exc)) from None
        except (SandboxReaped, SandboxClosedError):
            raise NotFound(f"sandbox {sandbox_id} is gone") from None
        except SandboxDeadError as exc:
            raise Conflict(str(exc)) from None

    async def get_file(self, tenant: Tenant, sandbox_id: str, path: str) -> bytes:
        live = self._own(tenant, sandbox_id)
        try:
            return await live.lease.get_file(path, max_bytes=MAX_FILE_BYTES)
        except WorkspacePathError as exc:
            raise BadRequest(str(exc)) from None
        except FileTransferError as exc:
            raise NotFound(str(exc)) from None
        except (SandboxReaped, SandboxClosedError):
            raise NotFound(f"sandbox {sandbox_id} is gone") from None
        except SandboxDeadError as exc:
            raise Conflict(str(exc)) from None

    # -- internals ------------------------------------------------------------------------------

    def prune(self) -> None:
        """Forget leases the pool reaped (idle or too old), recording why."""
        for sid, live in list(self._live.items()):
            if live.lease.reaped:
                del self._live[sid]
                self._close_row(sid, live.lease.reaped)
        self.metrics.live_sandboxes.set(len(self._live))
        self.metrics.warm_sandboxes.set(self.pool.stats().warm)

    def _own(self, tenant: Tenant, sandbox_id: str) -> _Live:
        live = self._live.get(sandbox_id)
        # Another tenant's sandbox answers exactly like one that does not exist.
        if live is None or live.tenant_id != tenant.id:
            raise NotFound(f"no sandbox {sandbox_id!r}")
        if live.lease.reaped:
            self.prune()
            raise NotFound(f"sandbox {sandbox_id!r} is gone: {live.lease.reaped}")
        return live

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
        self.metrics.live_sandboxes.set(len(self._live))
        await live.lease.close()
        await asyncio.to_thread(self._close_row, sandbox_id, reason)

    def _spec(self, tenant: Tenant, request: SandboxRequest) -> SandboxSpec:
        mounts = []
        if request.dataset_id:
            mounts.append(Mount(source=str(self._dataset_dir(tenant.id, request.dataset_id)), target="/data"))
        try:
            return SandboxSpec.parse({
                "image": request.image, "cpus": request.cpus, "memory": request.memory,
                "gpus": request.gpus or None, "timeout": request.timeout,
                "workspace_quota": request.workspace_quota, "env": request.env,
                "labels": {"tenant": tenant.id}, "mounts": [m.model_dump() for m in mounts],
            })
        except SpecError as exc:
            raise BadRequest(str(exc)) from None

    @staticmethod
    def _check_quota(tenant: Tenant, request: SandboxRequest, mine: list[SandboxRequest]) -> None:
        if len(mine) + 1 > tenant.max_sandboxes:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} holds {len(mine)} live sandboxes (quota {tenant.max_sandboxes}); "
                "delete one first", retry_after=5)
        gpus = sum(r.gpus for r in mine) + request.gpus
        if gpus > tenant.max_gpus:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} may use {tenant.max_gpus} GPUs; this sandbox would bring it to {gpus}",
                retry_after=30)
        memory = sum(parse_size(r.memory) for r in mine) + parse_size(request.memory)
        if memory > tenant.max_memory_bytes:
            raise QuotaExceeded(
                f"tenant {tenant.name!r} may use {tenant.max_memory} of sandbox memory; this sandbox "
                f"({request.memory}) would bring it to {memory / (1 << 30):.2f} GiB", retry_after=30)

    def _info(self, sandbox_id: str, live: _Live) -> SandboxInfo:
        return SandboxInfo(id=sandbox_id, tenant_id=live.tenant_id, spec=live.request.model_dump(),
                           status="dead" if live.lease.dead else "live", created_at=live.created_at,
                           dataset_id=live.request.dataset_id)

    def _insert_row(self, sid: str, tenant_id: str, spec: dict, created: float) -> None:
        with self.db.session() as s:
            s.add(SandboxRow(id=sid, tenant_id=tenant_id, spec=spec, status="live", created_at=created))

    def _close_row(self, sid: str, reason: str) -> None:
        with self.db.session() as s:
            s.execute(update(SandboxRow).where(SandboxRow.id == sid).values(
                status="closed", closed_at=time.time(), closed_reason=reason))
