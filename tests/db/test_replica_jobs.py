"""API replicas on one PostgreSQL database (a real server, started for this module): each replica is a
`Database` engine of its own, as separate processes have. Claims never double-run, a cancel asked
through one replica stops the job another runs, and a replica that stops answering loses its jobs to
the others, which it then cannot overwrite."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from service.db import Database
from service.jobs import JobContext, JobRunner
from service.jobs.runner import JobKind
from service.jobs.store import JobStore
from tests.postgres import create_database, postgres_server

pytestmark = pytest.mark.slow  # a PostgreSQL server per module, and heartbeats left to go stale


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as url:
        yield url


@pytest.fixture
def replicas(pg_server):
    url = create_database(pg_server)
    dbs = [Database(url), Database(url)]
    dbs[0].upgrade()
    yield dbs
    for db in dbs:
        db.dispose()


def test_two_replicas_claiming_together_take_each_job_exactly_once(replicas):
    stores = [JobStore(db) for db in replicas]
    jobs = {stores[0].create("tn_000000000001", "regression.pytest", {"n": i}).id for i in range(40)}
    claimed: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(8)

    def worker(store: JobStore, owner: str) -> None:
        start.wait()
        while (job := store.claim_next(owner)) is not None:
            assert job.status == "running"
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(stores[i % 2], f"replica-{i % 2}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert Counter(claimed).most_common(1)[0][1] == 1  # nothing claimed twice
    assert set(claimed) == jobs  # and nothing left behind
    owners = {stores[0].get(j).attempts for j in jobs}  # type: ignore[union-attr]
    assert owners == {1}


def test_a_silent_replicas_job_is_requeued_by_another_and_its_late_end_is_refused(replicas):
    a, b = JobStore(replicas[0]), JobStore(replicas[1])
    job = a.create("tn_000000000001", "design", {})
    assert a.claim_next("replica-a").id == job.id  # type: ignore[union-attr]
    # Replica a beats: nothing to recover while its heartbeat is fresh.
    assert b.recover_after_restart({"design"}, None, stale_after=2.0) == ([], [])
    time.sleep(2.5)  # a stops answering
    assert b.recover_after_restart({"design"}, None, stale_after=2.0) == ([job.id], [])
    requeued = b.events(job.id)[-1].data
    assert requeued["status"] == "queued" and "replica-a stopped answering" in requeued["detail"]
    assert b.claim_next("replica-b").id == job.id  # type: ignore[union-attr]
    # a comes back and reports the end of its (stale) run: refused, b's run stands.
    assert a.finish(job.id, "succeeded", {"from": "a"}, owner="replica-a").status == "running"
    assert b.finish(job.id, "succeeded", {"from": "b"}, owner="replica-b").result == {"from": "b"}


def test_a_job_that_cannot_resume_fails_with_the_reason_when_its_replica_is_gone(replicas):
    a, b = JobStore(replicas[0]), JobStore(replicas[1])
    job = a.create("tn_000000000001", "regression.pytest", {})
    a.claim_next("replica-a")
    time.sleep(1.2)
    assert b.recover_after_restart(set(), None, stale_after=1.0) == ([], [job.id])
    failed = b.get(job.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and "replica-a stopped answering" in failed.error


async def test_a_cancel_through_one_replica_stops_the_job_another_runs(replicas, tmp_path):
    started = asyncio.Event()

    async def forever(ctx: JobContext) -> dict:
        started.set()
        while True:
            await asyncio.sleep(0.05)

    runner = JobRunner(JobStore(replicas[0]), {"spin": JobKind(forever)}, tmp_path, workers=1,
                       owner="replica-a", lease_s=1.2, poll_interval=0.1)
    other = JobStore(replicas[1])
    job = other.create("tn_000000000001", "spin", {})
    await runner.start()
    try:
        await asyncio.wait_for(started.wait(), 10)
        asked = time.monotonic()
        other.request_cancel(job.id)  # what replica b's API does: the flag, in the shared database
        while (now := other.get(job.id)).status == "running":  # type: ignore[union-attr]
            assert time.monotonic() - asked < 5, "the cancel did not reach the replica running the job"
            await asyncio.sleep(0.05)
        assert now.status == "cancelled"  # type: ignore[union-attr]
    finally:
        await runner.stop()
