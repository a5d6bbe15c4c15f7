"""Uploaded `.h5ad` datasets: streamed to disk under a size cap, validated by `service.data`, kept per tenant."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.jobs.db import Database

from .errors import BadRequest, InvalidDataset, NotFound, PayloadTooLarge
from .quotas import admit_dataset
from .records import DatasetRow
from .tenants import Tenant

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.h5ad$")


def dataset_dict(row: DatasetRow) -> dict[str, Any]:
    return {"id": row.id, "name": row.name, "size_bytes": row.size_bytes, "created_at": row.created_at,
            "layout": row.layout}


class DatasetService:
    def __init__(self, db: Database, root: Path, max_bytes: int) -> None:
        self.db = db
        self.root = root
        self.max_bytes = max_bytes

    async def upload(self, tenant: Tenant, name: str | None, chunks: AsyncIterator[bytes],
                     declared_size: int | None = None) -> dict[str, Any]:
        """Store the upload, then validate it; an invalid file is removed and answered with why."""
        name = name or "dataset.h5ad"
        if not _NAME_RE.match(name):
            raise BadRequest(
                f"dataset name: expected a file name ending in .h5ad (letters, digits, . _ -), got {name!r}")
        if declared_size is not None and declared_size > self.max_bytes:
            raise PayloadTooLarge(f"upload of {declared_size} bytes exceeds the limit of {self.max_bytes} bytes")
        dataset_id = "ds_" + secrets.token_hex(8)
        folder = self.root / tenant.id / dataset_id
        folder.mkdir(parents=True)
        path = folder / name
        try:
            size = 0
            with path.open("wb") as fh:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes")
                    fh.write(chunk)
            if size == 0:
                raise InvalidDataset(f"{name}: the upload is empty; expected an AnnData .h5ad file")
            layout = await asyncio.to_thread(_validate, path, name)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        row = DatasetRow(id=dataset_id, tenant_id=tenant.id, name=name, path=str(path), size_bytes=size,
                         layout=layout, created_at=time.time())
        try:  # the tenant's storage quota, decided atomically with the insert
            await self.db.run(admit_dataset, self.db, tenant.id, row)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return dataset_dict(row)

    def get(self, tenant: Tenant, dataset_id: str) -> DatasetRow:
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
        if row is None or row.tenant_id != tenant.id:
            raise NotFound(f"no dataset {dataset_id!r}")
        return row

    def list(self, tenant: Tenant) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(DatasetRow).where(DatasetRow.tenant_id == tenant.id)
                             .order_by(DatasetRow.created_at)).all()
        return [dataset_dict(r) for r in rows]

    def folder(self, tenant_id: str, dataset_id: str) -> Path:
        """The host folder holding a tenant's dataset (to mount read-only); NotFound for others' ids."""
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
        if row is None or row.tenant_id != tenant_id:
            raise NotFound(f"no dataset {dataset_id!r}")
        return Path(row.path).parent


def _validate(path: Path, name: str) -> dict[str, Any]:
    from service.data import DataError, load_dataset

    try:
        dataset = load_dataset(path)
    except DataError as exc:
        # The caller knows its file by the name it sent, not by our storage path.
        raise InvalidDataset(str(exc).replace(str(path), name)) from None
    return dataset.layout.model_dump(mode="json", exclude={"source"})
