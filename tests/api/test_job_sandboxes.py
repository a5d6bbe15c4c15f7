"""A job's sandboxes are the tenant's: leased from the server's one provider, admitted by the tenant's quota
(a design job waits while it is full), labelled with the tenant and the job, counted in its usage and in
/metrics while they run."""

from __future__ import annotations

import threading
import time

import docker
import httpx
import pytest

from service.client import QuotaError
from service.data import simulate

from .conftest import tenant_id
from .test_tenants_and_limits import _metric

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TASK = "Predict expression after CRISPR knockout of unseen genes"


def _follow(client, job_id: str, events: list) -> threading.Thread:
    def run() -> None:
        for event in client.job_events(job_id):
            events.append(event)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(what, timeout: float, every: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(every)
    return None


def test_a_design_job_waits_for_room_in_its_tenants_quota_and_its_sandboxes_count_there(server, tmp_path):
    tight = server.tenant("tight-jobs", max_sandboxes=1, max_jobs=2, rate_limit=500)
    tenant = tenant_id(server, "tight-jobs")
    data = tmp_path / "small.h5ad"
    simulate("knockout", 1, n_cells=1200, n_genes=60).write_h5ad(data)
    engine = docker.from_env()
    job_containers = lambda: engine.containers.list(  # noqa: E731
        filters={"label": [f"cellforge.tenant={tenant}", "cellforge.role=design"]}, ignore_removed=True)
    events: list = []
    with server.client(tight) as c:
        own = c.create_sandbox(memory="256m")  # the tenant's quota of one sandbox is now full
        dataset = c.upload_dataset(data)
        job = c.submit_job(dataset.id, TASK, max_attempts=1, max_nodes=0, max_minutes=6)
        follower = _follow(c, job.id, events)
        try:
            waiting = _until(lambda: [e for e in events if "waiting for room for a sandbox" in
                                      str(e.data.get("message"))], timeout=240)
            assert waiting, [e.data for e in events][-5:]
            assert "quota 1" in waiting[0].data["message"]
            time.sleep(2)  # still waiting: no container of the job, the job still running
            assert not job_containers() and c.get_job(job.id).status == "running"
            before = httpx.get(f"{server.url}/metrics").text

            c.delete_sandbox(own.id)  # room: the job's attempt goes on
            started = _until(job_containers, timeout=120, every=0.1)
            assert started, c.get_job(job.id)
            labels = started[0].labels
            assert labels["cellforge.tenant"] == tenant and labels["cellforge.job"] == job.id
            # Counted in the tenant's usage (its quota of one is taken by the job's sandbox) and in /metrics.
            with pytest.raises(QuotaError, match="holds 1 live sandboxes \\(quota 1\\)"):
                c.create_sandbox(memory="256m")
            # /metrics: the job's sandbox in place of the deleted one (one at a time: the quota is one).
            assert _metric(before, "cellforge_live_sandboxes") == 1 and _metric(before, "cellforge_job_sandboxes") == 0
            assert _until(lambda: _metric(httpx.get(f"{server.url}/metrics").text, "cellforge_job_sandboxes") == 1,
                          timeout=60)
            assert _metric(httpx.get(f"{server.url}/metrics").text, "cellforge_live_sandboxes") <= 1
        finally:
            c.cancel_job(job.id)
            final = c.wait(job.id, timeout=180)
            follower.join(30)
        assert final.status == "cancelled"
        # The cancelled job's sandbox is given back: its quota is free again.
        assert _until(lambda: not job_containers(), timeout=60)
        sb = _until(lambda: _try_create(c), timeout=60, every=1.0)
        assert sb is not None
        c.delete_sandbox(sb)
        after = httpx.get(f"{server.url}/metrics").text
        assert _metric(after, "cellforge_job_sandboxes") == 0


def _try_create(client) -> str | None:
    try:
        return client.create_sandbox(memory="256m").id
    except QuotaError:
        return None
