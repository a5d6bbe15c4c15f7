"""The service core both transports call: authentication, rate limits, audit, sandboxes, datasets, jobs.

HTTP (`http_app`) and gRPC (`grpc_server`) only translate requests and errors; every rule lives here.

Threads: authentication has its own two threads and every other database call the database's own
(`Database.run`); untrusted CPU work (bundle unpacking) has a bounded pool, job pipelines the runner's.
None of them is the event loop's default executor, so whatever fills one (a tenant's uploads, Docker
calls) never delays another tenant's authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from sandbox import BackendKind, DockerBackend, SandboxPool, SandboxSpec
from sandbox.spec import parse_size
from service.jobs import Job, JobRunner, JobStore, job_kinds
from service.db import Database, default_db_url
from service.jobs.store import WRITE_RETRY_S

from .audit import AuditLog
from .datasets import DatasetService
from .errors import ServiceError
from .jobs_api import JobService
from .limits import RateLimiter
from .logs import job_line
from .metrics import ServiceMetrics
from .quotas import UploadMeter
from service.db import TenantRow
from .sandboxes import SandboxService
from .tenants import Tenant, authenticate
from .workpool import WorkPool

log = logging.getLogger(__name__)

AUTH_CACHE_S = 1.0
# How often the server looks for revoked tenants whose sandboxes and jobs it must stop.
REVOCATION_POLL_S = 1.0
REVOKED = "its tenant's API key was revoked"
# How often a replica on a Ray cluster has every sandbox node remove its orphan containers (those whose
# owner, a sandbox actor or a job's task, died with its worker or node).
ORPHAN_REAP_S = 60.0


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
    db_retry: float = WRITE_RETRY_S  # seconds a failing write of the job machinery is retried
    backend: Any = field(default=None, repr=False)  # a sandbox backend; DockerBackend() when None
    # This server's name among API replicas sharing the database: it holds its job claims and sandbox rows
    # in it. None: a lone server (what it left running is recovered at its next start).
    replica: str | None = None
    # A Ray cluster: claimed jobs run there as Ray tasks (service.jobs.ray_jobs); None: in this process.
    ray_address: str | None = None


class CellForgeCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(config.db_url or default_db_url(self.data_dir))
        self.metrics = ServiceMetrics()
        self.audit = AuditLog(self.db)
        self.limiter = RateLimiter()
        # The process's one backend: the API's sandboxes and every job's come from it, through one pool and
        # the SandboxService, which admits each within its tenant's quota (the pool has no cap of its own).
        self.backend = config.backend or DockerBackend()
        # Sandboxes any replica can reach (named Ray actors): no warm pool, whose sandboxes would be one
        # replica's and outlive it unseen.
        shared = getattr(self.backend, "shared", False)
        warm = 0 if shared else config.warm
        self.pool = SandboxPool(
            self.backend, [SandboxSpec()] if warm else [], warm=warm, preload=config.preload,
            idle_timeout=config.idle_timeout, max_lifetime=config.max_lifetime,
            reap_interval=min(5.0, config.idle_timeout / 2), reap_orphans=self.backend.kind is not BackendKind.LOCAL,
        )
        self.datasets = DatasetService(self.db, self.data_dir / "datasets", parse_size(config.max_upload, "max-upload"))
        self.uploads = UploadMeter(self.db)
        self.sandboxes = SandboxService(self.pool, self.db, self.metrics, self.datasets.folder, owner=config.replica)
        self.store = JobStore(self.db, retry_for=config.db_retry)
        self.runner = JobRunner(self.store, job_kinds(self.sandboxes.job_provider), self.data_dir / "jobs",
                                workers=config.workers, on_finish=self._job_finished, owner=config.replica,
                                remote=_remote_jobs(config),
                                private_roots=(self.data_dir, Path(getattr(self.backend, "runtime_root", self.data_dir))))
        uploads = self.data_dir / "uploads"
        uploads.mkdir(exist_ok=True)
        self.work = WorkPool(threads=2, queue=4, name="bundle unpacking")
        self.jobs = JobService(self.store, self.runner, self.datasets, uploads, self.work)
        self._auth_cache: dict[str, tuple[Tenant, float]] = {}
        self._auth_executor = ThreadPoolExecutor(2, thread_name_prefix="cellforge-auth")
        self._revoked: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._orphans: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Future[int]] = set()
        self.ready = False

    async def start(self) -> None:
        await self.db.run(self.db.upgrade)
        await self.sandboxes.recover_after_restart()
        self.sandboxes.start()
        # Starting the pool reaps containers orphaned by a previous (killed) server process.
        await self.pool.start()
        await self.audit.start()
        await self.stop_revoked()  # before the runner: a revoked tenant's queued jobs never start
        await self.runner.start()
        self._watcher = asyncio.create_task(self._watch_revocations(), name="revocation-watch")
        if getattr(self.backend, "shared", False):
            self._orphans = asyncio.create_task(self._reap_orphans(), name="orphan-reaper")
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in (self._watcher, self._orphans):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.runner.stop()
        await self.sandboxes.close_all()
        await self.pool.shutdown()
        if getattr(self.backend, "shared", False):
            await self.backend.close()  # the Ray backend's spare actors end now, not at their time-to-live
        await self.audit.stop()
        self.work.shutdown()
        self._auth_executor.shutdown(wait=False, cancel_futures=True)
        self.db.dispose()

    def _job_finished(self, job: Job, seconds: float) -> None:
        # A cancelled job's pipeline thread stops at its next progress report; its sandboxes go back now.
        closing = asyncio.ensure_future(self.sandboxes.close_job(job.id))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        self.metrics.job_seconds.labels(kind=job.kind, status=job.status).observe(seconds)
        job_line("job finished", job=job.id, tenant=job.tenant_id, kind=job.kind, status=job.status,
                 seconds=round(seconds, 1), error=job.error)
        self.jobs.job_finished(job)

    async def refresh_metrics(self) -> None:
        await self.sandboxes.prune()
        queued, running = await self.db.run(self.store.queue_depth)
        self.metrics.queue_depth.set(queued)
        self.metrics.running_jobs.set(running)

    # -- revocation -------------------------------------------------------------------------------

    async def stop_revoked(self) -> list[str]:
        """Close the sandboxes and cancel the jobs of tenants revoked since the last look (by the CLI,
        in another process: the database is where revocations meet). Returns their ids."""
        revoked = await self.db.run(_revoked_ids, self.db)
        fresh = [tenant_id for tenant_id in revoked if tenant_id not in self._revoked]
        for tenant_id in fresh:
            self._auth_cache = {k: v for k, v in self._auth_cache.items() if v[0].id != tenant_id}
            closed = await self.sandboxes.close_tenant(tenant_id, REVOKED)
            jobs = await self.db.run(self.store.active_ids, tenant_id)
            for job_id in jobs:
                await self.runner.cancel(job_id, reason=REVOKED)
            self._revoked.add(tenant_id)
            if closed or jobs:
                log.warning("tenant %s was revoked: closed %d sandboxes, cancelled %d jobs", tenant_id, closed,
                            len(jobs))
        return fresh

    async def _reap_orphans(self) -> None:
        """Every ORPHAN_REAP_S, the Docker reaper on every sandbox node of the cluster (label-based: a
        container whose owning process is gone is removed by its own node)."""
        while True:
            await asyncio.sleep(ORPHAN_REAP_S)
            try:
                report = await self.backend.reap()
            except Exception:  # noqa: BLE001 - the cluster is unreachable now: try again next time
                log.warning("reaping orphan containers on the cluster failed", exc_info=True)
                continue
            if report.removed:
                log.warning("removed %d orphan sandbox container(s) on the cluster", len(report.removed))

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_POLL_S)
            try:
                await self.stop_revoked()
            except Exception:  # noqa: BLE001 - a database hiccup: look again next time
                log.exception("could not check for revoked tenants")

    # -- datasets ---------------------------------------------------------------------------------

    async def upload_dataset(self, tenant: Tenant, name: str | None, chunks: AsyncIterator[bytes],
                             declared_size: int | None = None) -> dict[str, Any]:
        """An upload within the tenant's storage quota: stopped once it would pass it, and admitted
        atomically with its record."""
        async with contextlib.aclosing(self.uploads.metered(tenant, chunks, declared_size)) as metered:
            return await self.datasets.upload(tenant, name, metered, declared_size)

    async def authenticate(self, authorization: str | None, transport: str, action: str) -> Tenant:
        """The caller's tenant, after its rate limit; failures are audited too."""
        tenant: Tenant | None = None
        try:
            tenant = await self._cached_tenant(authorization)
            self.limiter.check(tenant.id, tenant.rate_limit)
        except ServiceError as exc:
            self.audit.record(tenant.id if tenant else None, transport, action, None, type(exc).__name__, str(exc))
            self.metrics.requests.labels(transport=transport, outcome=type(exc).__name__).inc()
            raise
        return tenant

    async def _cached_tenant(self, authorization: str | None) -> Tenant:
        """A key's tenant is looked up at most once per AUTH_CACHE_S, so a revoke takes effect within that."""
        now = time.monotonic()
        hit = self._auth_cache.get(authorization or "")
        if hit is not None and hit[1] > now:
            return hit[0]
        loop = asyncio.get_running_loop()
        tenant = await loop.run_in_executor(self._auth_executor, authenticate, self.db, authorization)
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


def _remote_jobs(config: CoreConfig) -> Any:
    if config.ray_address is None:
        return None
    from service.jobs.ray_jobs import RayJobs  # Ray is an optional extra, imported only when asked for

    return RayJobs(config.ray_address)


def _revoked_ids(db: Database) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(TenantRow.id).where(TenantRow.revoked_at.is_not(None))))
