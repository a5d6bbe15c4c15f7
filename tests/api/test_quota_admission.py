"""Quota admissions against the real database (SQLite; PostgreSQL too with CELLFORGE_TEST_POSTGRES):
parallel claims from many threads never pass a quota together."""

from __future__ import annotations

import threading
import time

import pytest

from service.api.errors import QuotaExceeded
from service.api.quotas import Resources, admit_sandbox, job_admitter
from service.api.tenants import create_tenant
from service.db import Database, SandboxRow
from service.jobs.store import JobStore

from .conftest import database_url


@pytest.fixture
def db(tmp_path):
    database = Database(database_url(tmp_path))
    database.upgrade()
    yield database
    database.dispose()


def _race(n: int, attempt) -> list[bool]:
    """`attempt(i)` from n threads released together; which of them were admitted."""
    start, results = threading.Barrier(n), [False] * n

    def run(i: int) -> None:
        start.wait()
        try:
            attempt(i)
            results[i] = True
        except QuotaExceeded:
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_parallel_job_admissions_never_pass_the_job_quota_together(db):
    tenant, _ = create_tenant(db, "racer", max_jobs=2)
    store = JobStore(db)
    admitted = _race(12, lambda i: store.create(tenant.id, "regression.pytest", {"n": i},
                                                admit=job_admitter(tenant.id, Resources())))
    assert sum(admitted) == 2
    assert len(store.active_ids(tenant.id)) == 2


def test_parallel_sandbox_and_job_admissions_share_the_memory_quota(db):
    tenant, _ = create_tenant(db, "memory", max_memory="2g", max_jobs=10, max_sandboxes=10)
    store, gib = JobStore(db), Resources.of("1g", 1.0)

    def claim(i: int) -> None:
        if i % 2:
            store.create(tenant.id, "regression.pytest", {"resources": gib.as_dict()},
                         admit=job_admitter(tenant.id, gib))
        else:
            admit_sandbox(db, tenant.id, SandboxRow(id=f"rsv_{i}", tenant_id=tenant.id, status="starting",
                                                    created_at=time.time(), spec={"resources": gib.as_dict()}),
                          gib)

    assert sum(_race(10, claim)) == 2  # 2 GiB in 1 GiB claims, whatever their kind
