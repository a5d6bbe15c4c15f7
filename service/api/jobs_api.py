"""Design jobs and regression runs as tenant-scoped resources: submit (within the job quota), status,
events, cancel, artifacts. The work itself is `service.jobs`; this module checks and translates."""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import io
import posixpath
import secrets
import shutil
import zipfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sandbox.errors import SpecError
from sandbox.spec import parse_size
from service.db import FINAL_STATES
from service.protocol import (
    CompareRegression,
    DesignJobRequest,
    JobEvent,
    JobInfo,
    PytestRegression,
    RegressionRequestAdapter,
    problems,
)
from service.jobs import REGRESSION_KINDS, Job, JobRunner, JobStore, design_settings

from .datasets import DatasetService
from .errors import BadRequest, Conflict, NotFound, PayloadTooLarge, invalid
from .logs import job_line
from .quotas import Resources, job_admitter, precheck_job, within_limits
from .tenants import RUNTIME_STRENGTH, Tenant
from .workpool import WorkPool

BUNDLE_MAX_BYTES = 64 << 20
BUNDLE_MAX_FILES = 2000
EVENT_POLL_S = 0.3


def sandbox_size(tenant: Tenant, memory: str | None, cpus: float | None, gpus: int, default_memory: str,
                 default_cpus: float) -> tuple[str, float, Resources]:
    """A job sandbox's memory and CPUs: what was asked, else the server's default lowered to the
    tenant's limit; QuotaExceeded for a size the tenant can never have."""
    try:
        if memory is None:
            memory = min(default_memory, tenant.max_memory, key=parse_size)
        if cpus is None:
            cpus = min(default_cpus, tenant.max_cpus)
        want = Resources.of(memory, cpus, gpus)
    except SpecError as exc:
        raise BadRequest(str(exc)) from None
    within_limits(tenant, want, "the job's sandbox")
    return memory, cpus, want


class JobService:
    def __init__(self, store: JobStore, runner: JobRunner, datasets: DatasetService, uploads: Path,
                 work: WorkPool) -> None:
        self.store = store
        self.db = store.db
        self.runner = runner
        self.datasets = datasets
        self.uploads = uploads
        self.work = work  # untrusted CPU work (bundle unpacking), bounded

    # -- submit ---------------------------------------------------------------------------------

    async def submit_design(self, tenant: Tenant, request: DesignJobRequest | dict[str, Any]) -> JobInfo:
        """A design job; `request` as the HTTP body, already typed there, or as a dict (gRPC)."""
        if not isinstance(request, DesignJobRequest):
            try:
                request = DesignJobRequest.model_validate(request)
            except ValidationError as exc:
                raise invalid("design job request", exc.errors()) from None
        if not request.task.strip():
            raise BadRequest("task: expected a non-empty description of what to predict")
        row = await self.db.run(self.datasets.get, tenant, request.dataset_id)
        options = request.options.chosen()
        # The tenant's runtime, or a stronger one it asks for (never a weaker one): the server's decision.
        runtime = tenant.runtime_for(options.pop("runtime", None))
        params: dict[str, Any] = {"dataset_id": row.id, "dataset_path": row.path, "task": request.task,
                                  "options": options, "runtime": runtime}
        try:
            defaults = design_settings(params, Path("/unused"))
        except ValidationError as exc:
            raise BadRequest(f"invalid design options: {problems(exc)}") from None
        memory, cpus, want = sandbox_size(tenant, options.get("memory"), options.get("cpus"), defaults.gpus,
                                          defaults.memory, defaults.cpus)
        params["options"].update(memory=memory, cpus=cpus)
        params["resources"] = want.as_dict()
        return await self._enqueue(tenant, "design", params)

    async def submit_regression(self, tenant: Tenant, request: PytestRegression | CompareRegression | dict[str, Any]
                                ) -> JobInfo:
        """A regression run; `request` as the HTTP body, already typed there, or as a dict (gRPC)."""
        if isinstance(request, PytestRegression | CompareRegression):
            spec = request
        else:
            try:
                spec = RegressionRequestAdapter.validate_python(request)
            except ValidationError as exc:
                raise invalid("regression request", exc.errors()) from None
        if isinstance(spec, PytestRegression):
            return await self._submit_pytest(tenant, spec)
        source = await self._own(tenant, spec.job_id)
        params: dict[str, Any] = {"source_job_id": source.id, "run_dir": str(self._run_dir(source)),
                                  "tolerances": spec.tolerances}
        if spec.default_tolerance is not None:
            params["default_tolerance"] = spec.default_tolerance
        if spec.kind == "replay":  # a design run again, in a sandbox sized within the tenant's limits
            recorded = source.params.get("options") or {}
            memory, cpus, want = sandbox_size(tenant, None, None, int(recorded.get("gpus") or 0),
                                              recorded.get("memory", "4g"), float(recorded.get("cpus", 2.0)))
            # The stronger of the run's recorded runtime and the tenant's current one: a replay never runs
            # weaker than the design it repeats, nor than the tenant now allows.
            runtime = max((source.params.get("runtime"), tenant.runtime),
                          key=lambda r: -1 if r is None else RUNTIME_STRENGTH.get(r, -1))
            params["sandbox"] = {"memory": memory, "cpus": cpus, "runtime": runtime}
            params["resources"] = want.as_dict()
        return await self._enqueue(tenant, f"regression.{spec.kind}", params)

    async def _submit_pytest(self, tenant: Tenant, spec: PytestRegression) -> JobInfo:
        if (spec.bundle_zip_b64 is None) == (spec.job_id is None):
            raise BadRequest("pytest regression: give exactly one of bundle_zip_b64 or job_id")
        memory, cpus, want = sandbox_size(tenant, spec.memory, spec.cpus, 0, "2g", 1.0)
        params = {"data_dir": None, "dataset_id": spec.dataset_id, "source_job_id": spec.job_id,
                  "timeout": spec.timeout, "memory": memory, "cpus": cpus, "runtime": tenant.runtime,
                  "resources": want.as_dict()}
        if spec.dataset_id:
            params["data_dir"] = str(await self.db.run(self.datasets.folder, tenant.id, spec.dataset_id))
        if spec.job_id is not None:
            source = await self._own(tenant, spec.job_id)
            bundle_dir = self._run_dir(source) / "code"
            if not bundle_dir.is_dir():
                raise Conflict(f"job {source.id} has no code bundle")
            return await self._enqueue(tenant, "regression.pytest", {**params, "bundle_dir": str(bundle_dir)})
        # Refused before the bundle is unpacked when the quota is already full; the unpacked bundle is
        # removed if the admission (which decides atomically) still refuses it.
        await self.db.run(precheck_job, self.db, tenant.id, want)
        bundle_dir = await self.work.run(self._unpack, spec.bundle_zip_b64)
        try:
            return await self._enqueue(tenant, "regression.pytest", {**params, "bundle_dir": str(bundle_dir)})
        except BaseException:
            shutil.rmtree(bundle_dir, ignore_errors=True)
            raise

    def job_finished(self, job: Job) -> None:
        """An uploaded bundle is kept while its run may still start again (a restart requeues it)."""
        bundle = job.params.get("bundle_dir")
        if job.kind == "regression.pytest" and bundle and Path(bundle).parent == self.uploads:
            shutil.rmtree(bundle, ignore_errors=True)

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

    async def _enqueue(self, tenant: Tenant, kind: str, params: dict[str, Any]) -> JobInfo:
        want = Resources.from_dict(params.get("resources"))
        job = await self.db.run(self.store.create, tenant.id, kind, params, admit=job_admitter(tenant.id, want))
        job_line("job queued", job=job.id, tenant=tenant.id, kind=kind)
        self.runner.wake()
        return self.info(job)

    # -- read and control -----------------------------------------------------------------------

    async def get(self, tenant: Tenant, job_id: str, regression: bool = False) -> JobInfo:
        job = await self._own(tenant, job_id)
        if regression and job.kind not in REGRESSION_KINDS:
            raise NotFound(f"no regression run {job_id!r}")
        return self.info(job)

    async def list(self, tenant: Tenant) -> list[JobInfo]:
        return [self.info(j) for j in await self.db.run(self.store.list, tenant.id)]

    async def cancel(self, tenant: Tenant, job_id: str) -> JobInfo:
        job = await self._own(tenant, job_id)
        if job.final:
            raise Conflict(f"job {job_id} already ended ({job.status})")
        await self.runner.cancel(job_id)
        return self.info(await self._own(tenant, job_id))

    async def events(self, tenant: Tenant, job_id: str, after_seq: int = 0) -> AsyncGenerator[JobEvent, None]:
        """Recorded events after `after_seq`, then new ones as they come, until the job has ended."""
        await self._own(tenant, job_id)
        seq = max(0, int(after_seq))
        while True:
            job = await self.db.run(self.store.get, job_id)
            batch = await self.db.run(self.store.events, job_id, seq)
            for event in batch:
                seq = event.seq
                yield JobEvent(seq=event.seq, ts=event.ts, kind=event.kind, data=event.data)
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

    async def logs(self, tenant: Tenant, job_id: str) -> builtins.list[str]:
        """The job's attempt logs (`attempts/NN/runs/FOLD/train.log`), as paths relative to the run."""
        return self._logs((await self._own(tenant, job_id)).id)

    async def log_file(self, tenant: Tenant, job_id: str, name: str) -> Path:
        job = await self._own(tenant, job_id)
        names = self._logs(job.id)
        if name not in names:  # only listed names are served: nothing outside the run folder is reachable
            raise NotFound(f"job {job_id} has no log {name!r}; it has {names or 'none yet'}")
        return self.runner.work_dir(job.id) / "run" / name

    # -- helpers --------------------------------------------------------------------------------

    async def _own(self, tenant: Tenant, job_id: str) -> Job:
        job = await self.db.run(self.store.get, job_id or "")
        # Another tenant's job answers exactly like one that does not exist.
        if job is None or job.tenant_id != tenant.id:
            raise NotFound(f"no job {job_id!r}")
        return job

    def _run_dir(self, source: Job) -> Path:
        """A succeeded design run's folder (`source` is the caller's own job)."""
        if source.kind != "design":
            raise BadRequest(f"job {source.id} is a {source.kind} job, not a design run")
        if source.status != "succeeded":
            raise Conflict(f"job {source.id} is {source.status}; only a succeeded design run can be compared")
        return self.runner.work_dir(source.id) / "run"

    def _artifacts(self, job_id: str) -> builtins.list[str]:
        folder = self.runner.work_dir(job_id) / "artifacts"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def _logs(self, job_id: str) -> builtins.list[str]:
        run = self.runner.work_dir(job_id) / "run"
        attempts = run / "attempts"
        if not attempts.is_dir():
            return []
        root = run.resolve()  # a link written by generated code never leads out of the run folder
        return sorted(p.relative_to(run).as_posix() for p in attempts.rglob("*.log")
                      if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(root))

    def info(self, job: Job) -> JobInfo:
        # Host paths stay on the server.
        params = {k: v for k, v in job.params.items() if not k.endswith(("_dir", "_path"))}
        return JobInfo(id=job.id, kind=job.kind, status=job.status, phase=job.phase,
                       error=job.error, created_at=job.created_at, started_at=job.started_at,
                       finished_at=job.finished_at, attempts=job.attempts, params=params, result=job.result,
                       artifacts=self._artifacts(job.id), final=job.status in FINAL_STATES, logs=self._logs(job.id))
