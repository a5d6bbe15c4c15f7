"""Uploaded `.h5ad` datasets: streamed to disk under a size cap, validated by `service.data`, kept per tenant.

An upload is hostile until checked, so the check runs in a child process of its own
(`service.data.check_isolated`), under an address-space cap and a deadline after which it is
killed, at most `UploadChecks.workers` at once and `per_tenant` for one tenant; beyond that the
answer is 503 / 429 with Retry-After, never a queue. Neither the default executor (which
authentication uses) nor the event loop ever waits on a tenant's file.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ByteSize, ConfigDict, Field
from sqlalchemy import select

from service.data import H5Limits, check_isolated, start_forkserver
from service.data.h5safety import settings_from_env, size_text
from service.db import Database

from .errors import BadRequest, Conflict, InvalidDataset, NotFound, PayloadTooLarge, QuotaExceeded, Unavailable
from .quotas import admit_dataset
from service.db import DatasetRow
from .tenants import Tenant

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.h5ad$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ENV_PREFIX = "CELLFORGE_UPLOAD_"
MAX_MESSAGE_CHARS = 1_000
RETRY_AFTER_S = 5


class UploadChecks(BaseModel):
    """How uploads are checked; each field is set by `CELLFORGE_UPLOAD_<FIELD>`, `limits` by the
    `CELLFORGE_DATA_*` variables (`service.data.H5Limits`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workers: int = Field(2, gt=0, description="checks running at once, over all tenants")
    per_tenant: int = Field(1, gt=0, description="checks running at once for one tenant")
    timeout_s: float = Field(300.0, gt=0, description="a check still running then is killed (413)")
    memory_bytes: ByteSize = Field(ByteSize(4 << 30), gt=0, description="address space a check may add")
    limits: H5Limits = Field(default_factory=H5Limits)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> UploadChecks:
        return settings_from_env(cls, ENV_PREFIX, env, limits=H5Limits.from_env(env))


class ChecksBusy(Unavailable):
    """Every upload checker is busy: try again in `retry_after` seconds (503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def content_id(tenant_id: str, sha256: str) -> str:
    """A dataset's id: from its tenant and its bytes, so the same file uploaded again is the same dataset
    (and two tenants' copies of one file share nothing, not even an id)."""
    return "ds_" + hashlib.sha256(f"{tenant_id}\0{sha256}".encode()).hexdigest()[:24]


def dataset_dict(row: DatasetRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "size_bytes": row.size_bytes, "created_at": row.created_at,
            "layout": row.layout}


class DatasetService:
    def __init__(self, db: Database, root: Path, max_bytes: int, checks: UploadChecks | None = None) -> None:
        self.db = db
        self.root = root
        self.max_bytes = max_bytes
        self.checker = UploadChecker(checks or UploadChecks.from_env())

    async def upload(self, tenant: Tenant, name: str | None, chunks: AsyncIterator[bytes],
                     declared_size: int | None = None) -> dict[str, Any]:
        """Store the upload, then validate it; an invalid file is removed and answered with why."""
        name = name or "dataset.h5ad"
        if not _NAME_RE.match(name):
            raise BadRequest(
                f"dataset name: expected a file name ending in .h5ad (letters, digits, . _ -), got {name!r}")
        if declared_size is not None and declared_size > self.max_bytes:
            raise PayloadTooLarge(f"upload of {declared_size} bytes exceeds the limit of {self.max_bytes} bytes")
        self.checker.admit(tenant.id)  # before the body: a busy answer should not cost the upload
        incoming = self.root / tenant.id / ("incoming_" + secrets.token_hex(8))
        incoming.mkdir(parents=True)
        try:
            size, digest = 0, hashlib.sha256()
            with (incoming / name).open("wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes")
                    digest.update(chunk)
                    fh.write(chunk)
            if size == 0:
                raise InvalidDataset(f"{name}: the upload is empty; expected an AnnData .h5ad file")
            dataset_id = content_id(tenant.id, digest.hexdigest())
            existing = await self.db.run(self._row, tenant.id, dataset_id)
            if existing is not None:  # the same bytes again: the stored dataset, its storage counted once
                shutil.rmtree(incoming, ignore_errors=True)
                return {**dataset_dict(existing), "reused": True}
            layout = await self.checker.check(tenant.id, incoming / name, name)
            folder = self.root / tenant.id / dataset_id
            try:
                incoming.rename(folder)
            except OSError:  # the same bytes are being stored by a concurrent upload
                raise Conflict(f"{name}: the same file is being uploaded by another request; retry") from None
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        row = DatasetRow(id=dataset_id, tenant_id=tenant.id, name=name, path=str(folder / name), size_bytes=size,
                         layout=layout, created_at=time.time())
        try:  # the tenant's storage quota, decided atomically with the insert
            await self.db.run(admit_dataset, self.db, tenant.id, row)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return dataset_dict(row)

    def find(self, tenant: Tenant, sha256: str) -> dict[str, Any]:
        """The tenant's dataset with these bytes (the SHA-256 of the file), so a client need not send it again."""
        if not _SHA256_RE.match(sha256):
            raise BadRequest(f"sha256: expected 64 lowercase hex digits, got {sha256[:80]!r}")
        row = self._row(tenant.id, content_id(tenant.id, sha256))
        if row is None:
            raise NotFound(f"no dataset with sha256 {sha256}")
        return dataset_dict(row)

    def _row(self, tenant_id: str, dataset_id: str) -> DatasetRow | None:
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
        return row if row is not None and row.tenant_id == tenant_id else None

    def get(self, tenant: Tenant, dataset_id: str) -> DatasetRow:
        row = self._row(tenant.id, dataset_id)
        if row is None:
            raise NotFound(f"no dataset {dataset_id!r}")
        return row

    def list(self, tenant: Tenant) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(DatasetRow).where(DatasetRow.tenant_id == tenant.id)
                             .order_by(DatasetRow.created_at)).all()
        return [dataset_dict(r) for r in rows]

    def folder(self, tenant_id: str, dataset_id: str) -> Path:
        """The host folder holding a tenant's dataset (to mount read-only); NotFound for others' ids."""
        row = self._row(tenant_id, dataset_id)
        if row is None:
            raise NotFound(f"no dataset {dataset_id!r}")
        return Path(row.path).parent


class UploadChecker:
    """Runs upload checks (`service.data.check_isolated`) a bounded number at once."""

    def __init__(self, checks: UploadChecks) -> None:
        self.checks = checks
        # Threads only wait on the children (a poll with a deadline); never the default executor.
        self._threads = ThreadPoolExecutor(checks.workers, thread_name_prefix="upload-check")
        self._running: Counter[str] = Counter()
        start_forkserver()

    def admit(self, tenant_id: str) -> None:
        """Raise QuotaExceeded (429) or ChecksBusy (503) now if a check could not start now."""
        if self._running[tenant_id] >= self.checks.per_tenant:
            raise QuotaExceeded(f"{self._running[tenant_id]} of your uploads are being checked (at most "
                                f"{self.checks.per_tenant} at once); retry when it is done", retry_after=RETRY_AFTER_S)
        if sum(self._running.values()) >= self.checks.workers:
            raise ChecksBusy(f"all {self.checks.workers} upload checkers are busy; retry in {RETRY_AFTER_S}s")

    async def check(self, tenant_id: str, path: Path, name: str) -> dict[str, Any]:
        """The dataset's layout, or InvalidDataset (422) / PayloadTooLarge (413) saying why not."""
        self.admit(tenant_id)
        self._running[tenant_id] += 1
        checks = self.checks
        future = asyncio.get_running_loop().run_in_executor(self._threads, partial(
            check_isolated, path, limits=checks.limits, timeout_s=checks.timeout_s, memory_bytes=checks.memory_bytes))
        # The slot is held until the child is gone, even if the caller hangs up meanwhile.
        future.add_done_callback(lambda _: self._release(tenant_id))
        result = await asyncio.shield(future)
        if result.outcome == "ok" and result.layout is not None:
            return result.layout
        if result.outcome == "too_large":
            raise PayloadTooLarge(_public(result.message, path, name))
        if result.outcome == "memory":
            raise PayloadTooLarge(f"{name}: checking it needs more than {size_text(checks.memory_bytes)} of memory "
                                  f"({ENV_PREFIX}MEMORY_BYTES)")
        if result.outcome == "timeout":
            raise PayloadTooLarge(f"{name}: checking it took longer than {checks.timeout_s:g}s, so it was stopped; "
                                  f"the file is too large or too slow to read ({ENV_PREFIX}TIMEOUT_S)")
        if result.outcome == "crashed":
            raise InvalidDataset(f"{name}: the file crashed the HDF5 reader (exit code {result.exit_code}); "
                                 "it is corrupt")
        raise InvalidDataset(_public(result.message, path, name))

    def _release(self, tenant_id: str) -> None:
        self._running[tenant_id] -= 1
        if self._running[tenant_id] <= 0:
            del self._running[tenant_id]


def _public(message: str, path: Path, name: str) -> str:
    """The caller knows its file by the name it sent, not by our storage path; and a message is short."""
    message = message.replace(str(path), name).replace(str(path.parent), "")
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 3] + "..."
