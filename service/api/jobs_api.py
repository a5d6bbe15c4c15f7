"""Design jobs and regression runs as tenant-scoped resources: submit (within the job quota), status,
events, cancel, artifacts. The work itself is `service.jobs`; this module checks and translates."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import posixpath
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox.spec import parse_size
from service.jobs import FINAL_STATES, REGRESSION_KINDS, Job, JobRunner, JobStore, design_settings

from .datasets import DatasetService
from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge, QuotaExceeded
from .tenants import Tenant

BUNDLE_MAX_BYTES = 64 << 20
BUNDLE_MAX_FILES = 2000
EVENT_POLL_S = 0.3


class _Regression(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PytestRegression(_Regression):
    kind: Literal["pytest"]
    bundle_zip_b64: str | None = Field(default=None, description="the code bundle as a base64 zip")
    job_id: str | None = Field(default=None, description="or: a finished design job whose code bundle to test")
    dataset_id: str | None = Field(default=None, description="mounted read-only at /data")
    timeout: float = Field(default=600.0, gt=0, le=86400)
    memory: str = "2g"
    cpus: float = Field(default=1.0, gt=0, le=64)


class CompareRegression(_Regression):
    kind: Literal["rescore", "replay"]
    job_id: str = Field(description="the stored design run")
    tolerances: dict[str, float] = Field(default_factory=dict, description="absolute tolerance per metric")
    default_tolerance: float | None = Field(default=None, ge=0)


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


class JobService:
    def __init__(self, store: JobStore, runner: JobRunner, datasets: DatasetService, uploads: Path) -> None:
        self.store = store
        self.runner = runner
        self.datasets = datasets
        self.uploads = uploads

    # -- submit ---------------------------------------------------------------------------------

    async def submit_design(self, tenant: Tenant, dataset_id: str, task: str,
                            options: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(task, str) or not task.strip():
            raise BadRequest("task: expected a non-empty description of what to predict")
        if not isinstance(options, dict):
            raise BadRequest(f"options: expected an object, got {type(options).__name__}")
        row = await asyncio.to_thread(self.datasets.get, tenant, dataset_id or "")
        params = {"dataset_id": row.id, "dataset_path": row.path, "task": task, "options": options}
        try:
            settings = design_settings(params, Path("/unused"))
        except ValidationError as exc:
            raise BadRequest(f"invalid design options: {_problems(exc)}") from None
        if settings.gpus > tenant.max_gpus:
            raise QuotaExceeded(f"tenant {tenant.name!r} may use {tenant.max_gpus} GPUs; the job asks for "
                                f"{settings.gpus}", retry_after=60)
        if parse_size(settings.memory) > tenant.max_memory_bytes:
            raise QuotaExceeded(f"tenant {tenant.name!r} may use {tenant.max_memory} of memory; the job asks for "
                                f"{settings.memory}", retry_after=60)
        return await self._enqueue(tenant, "design", params)

    async def submit_regression(self, tenant: Tenant, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise BadRequest(f"regression request: expected a JSON object, got {type(request).__name__}")
        kind = request.get("kind")
        try:
            if kind == "pytest":
                spec = PytestRegression.model_validate(request)
            elif kind in ("rescore", "replay"):
                spec = CompareRegression.model_validate(request)
            else:
                raise BadRequest(f"kind: expected 'pytest', 'rescore' or 'replay', got {kind!r}")
        except ValidationError as exc:
            raise BadRequest(f"invalid regression request: {_problems(exc)}") from None
        if isinstance(spec, PytestRegression):
            params = await self._pytest_params(tenant, spec)
        else:
            source = await self._own(tenant, spec.job_id)
            params = {"source_job_id": source.id, "run_dir": str(self._run_dir(source)),
                      "tolerances": spec.tolerances}
            if spec.default_tolerance is not None:
                params["default_tolerance"] = spec.default_tolerance
        return await self._enqueue(tenant, f"regression.{spec.kind}", params)

    async def _pytest_params(self, tenant: Tenant, spec: PytestRegression) -> dict[str, Any]:
        if (spec.bundle_zip_b64 is None) == (spec.job_id is None):
            raise BadRequest("pytest regression: give exactly one of bundle_zip_b64 or job_id")
        try:
            parse_size(spec.memory, "memory")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        if spec.job_id is not None:
            source = await self._own(tenant, spec.job_id)
            bundle_dir = self._run_dir(source) / "code"
            if not bundle_dir.is_dir():
                raise Conflict(f"job {source.id} has no code bundle")
        else:
            bundle_dir = await asyncio.to_thread(self._unpack, spec.bundle_zip_b64)
        data_dir = None
        if spec.dataset_id:
            data_dir = str(await asyncio.to_thread(self.datasets.folder, tenant.id, spec.dataset_id))
        return {"bundle_dir": str(bundle_dir), "data_dir": data_dir, "dataset_id": spec.dataset_id,
                "source_job_id": spec.job_id, "timeout": spec.timeout, "memory": spec.memory, "cpus": spec.cpus}

    def _unpack(self, encoded: str) -> Path:
        """Unzip an uploaded bundle, refusing absolute or escaping names, links and oversized contents."""
        if len(encoded) > BUNDLE_MAX_BYTES * 4 // 3 + 4:
            raise PayloadTooLarge(f"bundle_zip_b64 exceeds {BUNDLE_MAX_BYTES} bytes")
        try:
            raw = base64.b64decode(encoded, validate=True)
            archive = zipfile.ZipFile(io.BytesIO(raw))
        except (binascii.Error, ValueError):
            raise BadRequest("bundle_zip_b64: not valid base64") from None
        except zipfile.BadZipFile:
            raise BadRequest("bundle_zip_b64: not a zip archive") from None
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > BUNDLE_MAX_FILES:
            raise BadRequest(f"bundle: {len(members)} files; at most {BUNDLE_MAX_FILES} are accepted")
        if sum(m.file_size for m in members) > BUNDLE_MAX_BYTES:
            raise PayloadTooLarge(f"bundle: unpacks to more than {BUNDLE_MAX_BYTES} bytes")
        if not members:
            raise BadRequest("bundle: the zip archive is empty")
        for member in members:
            name = posixpath.normpath(member.filename)
            if name.startswith(("/", "../")) or name == ".." or "\x00" in name:
                raise BadRequest(f"bundle: member {member.filename!r} escapes the bundle folder")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise BadRequest(f"bundle: member {member.filename!r} is a symbolic link")
        target = self.uploads / ("bundle_" + secrets.token_hex(8))
        try:
            for member in members:
                path = target / posixpath.normpath(member.filename)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(archive.read(member))
        except (zipfile.BadZipFile, ValueError, EOFError) as exc:
            shutil.rmtree(target, ignore_errors=True)
            raise BadRequest(f"bundle: a member cannot be unpacked ({exc})") from None
        return target

    async def _enqueue(self, tenant: Tenant, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        active = await asyncio.to_thread(self.store.active_count, tenant.id)
        if active >= tenant.max_jobs:
            raise QuotaExceeded(f"tenant {tenant.name!r} has {active} queued or running jobs (quota "
                                f"{tenant.max_jobs}); wait for one to finish", retry_after=30)
        job = await asyncio.to_thread(self.store.create, tenant.id, kind, params)
        self.runner.wake()
        return self.to_dict(job)

    # -- read and control -----------------------------------------------------------------------

    async def get(self, tenant: Tenant, job_id: str, regression: bool = False) -> dict[str, Any]:
        job = await self._own(tenant, job_id)
        if regression and job.kind not in REGRESSION_KINDS:
            raise NotFound(f"no regression run {job_id!r}")
        return self.to_dict(job)

    async def list(self, tenant: Tenant) -> list[dict[str, Any]]:
        return [self.to_dict(j) for j in await asyncio.to_thread(self.store.list, tenant.id)]

    async def cancel(self, tenant: Tenant, job_id: str) -> dict[str, Any]:
        job = await self._own(tenant, job_id)
        if job.final:
            raise Conflict(f"job {job_id} already ended ({job.status})")
        await self.runner.cancel(job_id)
        return self.to_dict(await self._own(tenant, job_id))

    async def events(self, tenant: Tenant, job_id: str, after_seq: int = 0) -> AsyncIterator[dict[str, Any]]:
        """Recorded events after `after_seq`, then new ones as they come, until the job has ended."""
        await self._own(tenant, job_id)
        seq = max(0, int(after_seq))
        while True:
            job = await asyncio.to_thread(self.store.get, job_id)
            batch = await asyncio.to_thread(self.store.events, job_id, seq)
            for event in batch:
                seq = event.seq
                yield {"seq": event.seq, "ts": event.ts, "kind": event.kind, "data": event.data}
            if job is None or (job.final and not batch):
                return
            if not batch:
                await asyncio.sleep(EVENT_POLL_S)

    async def artifact(self, tenant: Tenant, job_id: str, name: str) -> Path:
        job = await self._own(tenant, job_id)
        names = self._artifacts(job.id)
        if name not in names:
            raise NotFound(f"job {job_id} has no artifact {name!r}; it has {sorted(names) or 'none yet'}")
        return self.runner.work_dir(job.id) / "artifacts" / name

    # -- helpers --------------------------------------------------------------------------------

    async def _own(self, tenant: Tenant, job_id: str) -> Job:
        job = await asyncio.to_thread(self.store.get, job_id or "")
        # Another tenant's job answers exactly like one that does not exist.
        if job is None or job.tenant_id != tenant.id:
            raise NotFound(f"no job {job_id!r}")
        return job

    def _run_dir(self, source: Job) -> Path:
        if source.kind != "design":
            raise BadRequest(f"job {source.id} is a {source.kind} job, not a design run")
        if source.status != "succeeded":
            raise Conflict(f"job {source.id} is {source.status}; only a succeeded design run can be compared")
        return self.runner.work_dir(source.id) / "run"

    def _artifacts(self, job_id: str) -> list[str]:
        folder = self.runner.work_dir(job_id) / "artifacts"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def to_dict(self, job: Job) -> dict[str, Any]:
        # Host paths stay on the server.
        params = {k: v for k, v in job.params.items() if not k.endswith(("_dir", "_path"))}
        return {"id": job.id, "kind": job.kind, "status": job.status, "phase": job.phase, "error": job.error,
                "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
                "attempts": job.attempts, "params": params, "result": job.result,
                "artifacts": self._artifacts(job.id), "final": job.status in FINAL_STATES}
