"""Quota admissions against the real database (SQLite; PostgreSQL too with CELLFORGE_TEST_POSTGRES):
parallel claims from many threads never pass a quota together, and a database made by an older
version gets the new tenant columns with their defaults."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

from service.api.errors import QuotaExceeded
from service.api.quotas import Resources, admit_sandbox, job_admitter
from service.api.records import SandboxRow
from service.api.tenants import create_tenant, list_tenants
from service.jobs.db import Database
from service.jobs.store import JobStore

from .conftest import database_url


@pytest.fixture
def db(tmp_path):
    database = Database(database_url(tmp_path))
    database.create_all()
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


def test_an_older_database_gets_the_new_tenant_columns_with_defaults(tmp_path):
    db = Database(database_url(tmp_path))
    try:
        with db.engine.begin() as conn:  # the tenants table as the first release made it
            conn.execute(text(
                "CREATE TABLE tenants (id VARCHAR(40) PRIMARY KEY, name VARCHAR(128) UNIQUE, key_id VARCHAR(32),"
                " key_hash VARCHAR(64), max_sandboxes INTEGER, max_jobs INTEGER, max_gpus INTEGER,"
                " max_memory VARCHAR(16), rate_limit FLOAT, created_at FLOAT, revoked_at FLOAT)"))
            conn.execute(text("INSERT INTO tenants VALUES ('tn_000000000001', 'old', 'k', 'h', 4, 2, 0, '8g', 50,"
                              " 0, NULL)"))
        db.create_all()
        (old,) = list_tenants(db)
        assert (old.max_cpus, old.max_storage, old.runtime) == (8.0, "20g", None)
        fresh, _ = create_tenant(db, "new", max_storage="1g", runtime="runsc")
        assert (fresh.max_storage, fresh.runtime) == ("1g", "runsc")
    finally:
        db.dispose()
