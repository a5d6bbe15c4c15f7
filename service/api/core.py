"""The service core both transports call: authentication, rate limits, audit, sandboxes, datasets, jobs.

HTTP (`http_app`) and gRPC (`grpc_server`) only translate requests and errors; every rule lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandbox import DockerBackend, SandboxPool, SandboxSpec
from sandbox.spec import parse_size
from service.jobs import Job, JobRunner, JobStore, job_kinds
from service.jobs.db import Database, default_db_url

from .audit import AuditLog
from .datasets import DatasetService
from .errors import ServiceError
from .jobs_api import JobService
from .limits import RateLimiter
from .metrics import ServiceMetrics
from .sandboxes import SandboxService
from .tenants import Tenant, authenticate

log = logging.getLogger(__name__)

AUTH_CACHE_S = 1.0


@dataclass
class CoreConfig:
    data_dir: Path
    db_url: str | None = None
    warm: int = 1
    preload: str = "import numpy, pandas, scipy"
    idle_timeout: float = 600.0
    max_lifetime: float = 3600.0
    max_upload: str = "2g"
    workers: int = 2
    backend: Any = field(default=None, repr=False)  # a sandbox backend; DockerBackend() when None


class CellForgeCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.db_url or default_db_url(self.data_dir))
        self.metrics = ServiceMetrics()
        self.audit = AuditLog(self.db)
        self.limiter = RateLimiter()
        self.backend = config.backend or DockerBackend()
        self.pool = SandboxPool(
            self.backend, [SandboxSpec()] if config.warm else [], warm=config.warm, preload=config.preload,
            # Per-tenant caps are the tenants' quotas, enforced by SandboxService.
            max_per_tenant=1 << 20, idle_timeout=config.idle_timeout, max_lifetime=config.max_lifetime,
            reap_interval=min(5.0, config.idle_timeout / 2), reap_orphans=isinstance(self.backend, DockerBackend),
        )
        self.datasets = DatasetService(self.db, self.data_dir / "datasets", parse_size(config.max_upload, "max-upload"))
        self.sandboxes = SandboxService(self.pool, self.db, self.metrics, self.datasets.folder)
        self.store = JobStore(self.db)
        self.runner = JobRunner(self.store, job_kinds(self.pool), self.data_dir / "jobs", workers=config.workers,
                                on_finish=self._job_finished)
        uploads = self.data_dir / "uploads"
        uploads.mkdir(exist_ok=True)
        self.jobs = JobService(self.store, self.runner, self.datasets, uploads)
        self._auth_cache: dict[str, tuple[Tenant, float]] = {}
        self.ready = False

    async def start(self) -> None:
        await asyncio.to_thread(self.db.create_all)
        await asyncio.to_thread(self.sandboxes.mark_lost_after_restart)
        # Starting the pool reaps containers orphaned by a previous (killed) server process.
        await self.pool.start()
        await self.audit.start()
        await self.runner.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.runner.stop()
        await self.sandboxes.close_all()
        await self.pool.shutdown()
        await self.audit.stop()
        self.db.dispose()

    def _job_finished(self, job: Job, seconds: float) -> None:
        self.metrics.job_seconds.labels(kind=job.kind, status=job.status).observe(seconds)

    async def refresh_metrics(self) -> None:
        self.sandboxes.prune()
        queued, running = await asyncio.to_thread(self.store.queue_depth)
        self.metrics.queue_depth.set(queued)
        self.metrics.running_jobs.set(running)

    async def authenticate(self, authorization: str | None, transport: str, action: str) -> Tenant:
        """The caller's tenant, after its rate limit; failures are audited too."""
        tenant: Tenant | None = None
        try:
            tenant = await self._cached_tenant(authorization)
            self.limiter.check(tenant.id, tenant.rate_limit)
        except ServiceError as exc:
            self.audit.record(tenant and tenant.id, transport, action, None, type(exc).__name__, str(exc))
            self.metrics.requests.labels(transport=transport, outcome=type(exc).__name__).inc()
            raise
        return tenant

    async def _cached_tenant(self, authorization: str | None) -> Tenant:
        """A key's tenant is looked up at most once per AUTH_CACHE_S, so a revoke takes effect within that."""
        now = time.monotonic()
        hit = self._auth_cache.get(authorization or "")
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant = await asyncio.to_thread(authenticate, self.db, authorization)
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[authorization or ""] = (tenant, now + AUTH_CACHE_S)
        return tenant

    @contextlib.contextmanager
    def audited(self, tenant: Tenant, transport: str, action: str, resource: str | None = None) -> Iterator[None]:
        """Record the call's outcome (ok, or the error's type and message) in the audit log."""
        try:
            yield
        except ServiceError as exc:
            self.audit.record(tenant.id, transport, action, resource, type(exc).__name__, str(exc))
            self.metrics.requests.labels(transport=transport, outcome=type(exc).__name__).inc()
            raise
        except BaseException as exc:
            self.audit.record(tenant.id, transport, action, resource, "error", f"{type(exc).__name__}: {exc}")
            self.metrics.requests.labels(transport=transport, outcome="error").inc()
            raise
        self.audit.record(tenant.id, transport, action, resource, "ok")
        self.metrics.requests.labels(transport=transport, outcome="ok").inc()
