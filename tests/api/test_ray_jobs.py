"""Jobs as Ray tasks (service.jobs.ray_jobs) on a real local multi-node Ray cluster with real Docker: the
runner claims regression jobs from the store and runs each as a Ray task asking for its CPUs, so two jobs
run at once on two nodes, their artifacts come back to the service's store, a cancel ends a running job,
its sandbox included, within seconds, and a job whose node dies is requeued (never stuck `running`)."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
import pytest_asyncio

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from sandbox.ray_backend import RayBackend  # noqa: E402
from service.db import Database  # noqa: E402
from service.jobs import JobRunner, JobStore, job_kinds  # noqa: E402
from service.jobs.ray_jobs import SLOT_RESOURCE, RayJobs  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TENANT = f"tn_{secrets.token_hex(6)}"  # this run's: its containers are told apart from any other's


@pytest.fixture(scope="module")
def cluster(docker_image):
    # A head that runs no jobs and two job nodes of one CPU each: two one-CPU jobs need both nodes.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20,
                                                      "include_dashboard": False})
    nodes = [c.add_node(num_cpus=1, object_store_memory=80 << 20, resources={SLOT_RESOURCE: 4}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    yield c, {n.node_id: n for n in nodes}
    ray.shutdown()
    c.shutdown()


@pytest_asyncio.fixture(loop_scope="module")
async def runner(cluster, tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.upgrade()
    store = JobStore(db)
    jobs = JobRunner(store, job_kinds(None), tmp_path / "jobs", workers=2, poll_interval=0.2, owner="replica-t",
                     remote=RayJobs(cluster[0].address))
    await jobs.start()
    yield jobs
    await jobs.stop()
    db.dispose()


def _bundle(folder, seconds: float):
    folder.mkdir(exist_ok=True)
    (folder / "test_wait.py").write_text(f"import time\n\ndef test_waits():\n    time.sleep({seconds})\n")
    return str(folder)


def _submit(runner: JobRunner, bundle: str) -> str:
    job = runner.store.create(TENANT, "regression.pytest", {"bundle_dir": bundle, "data_dir": None, "cpus": 1.0,
                                                            "memory": "512m", "timeout": 300})
    runner.wake()
    return job.id


async def _until(runner: JobRunner, job_id: str, done, within: float):
    deadline = time.monotonic() + within
    while True:
        job = await runner.store.db.run(runner.store.get, job_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.status} ({job.phase}) after {within}s"
        await asyncio.sleep(0.2)


async def test_two_jobs_run_at_once_on_two_nodes_and_their_artifacts_come_back(runner, cluster, tmp_path):
    ids = [_submit(runner, _bundle(tmp_path / f"b{i}", 6)) for i in range(2)]
    jobs = [await _until(runner, j, lambda job: job.final, within=240) for j in ids]
    assert [j.status for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    assert all(j.result["passed"] and j.result["summary"]["passed"] == 1 for j in jobs)
    # Both ran at once (each started before the other ended), on the two nodes.
    assert jobs[0].started_at < jobs[1].finished_at and jobs[1].started_at < jobs[0].finished_at
    nodes = [next(e.data["node"] for e in runner.store.events(j) if e.kind == "node") for j in ids]
    assert set(nodes) == set(cluster[1])
    for job_id in ids:  # the artifacts, in the service's store
        assert (runner.work_dir(job_id) / "artifacts" / "junit.xml").read_bytes().startswith(b"<?xml")


async def test_a_cancel_ends_a_running_job_and_its_sandbox_within_seconds(runner, tmp_path):
    job_id = _submit(runner, _bundle(tmp_path / "long", 300))
    await _until(runner, job_id, lambda job: job.phase == "pytest", within=120)
    asked = time.monotonic()
    await runner.cancel(job_id)
    job = await _until(runner, job_id, lambda job: job.final, within=10)
    assert job.status == "cancelled"
    engine = docker.from_env()
    deadline = asked + 20  # the node closes the sandbox once its task is cancelled
    while engine.containers.list(filters={"label": f"cellforge.tenant={TENANT}"}):
        assert time.monotonic() < deadline, "the cancelled job's sandbox is still running"
        time.sleep(0.5)


async def test_cellforge_design_with_a_ray_address_runs_its_sandboxes_on_the_cluster(cluster, tmp_path):
    """Until its first sandbox is up (a whole design run is minutes): it is a Ray actor on the cluster, and
    the run's sandboxes go with the run when it is stopped."""
    from service.data import simulate

    data = tmp_path / "screen.h5ad"
    simulate("knockout", 0, n_cells=1500, n_genes=50, n_perturbations=6).write_h5ad(data)
    run = subprocess.Popen(
        [str(Path(sys.executable).parent / "cellforge"), "design", "--data", str(data), "--task", "Predict "
         "expression after knockout of unseen genes", "--out", str(tmp_path / "run"), "--llm", "offline",
         "--max-attempts", "1", "--cpus", "0.5", "--memory", "1g", "--ray-address", cluster[0].address, "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (actors := _sandbox_actors()):
            assert run.poll() is None, f"the run ended without a Ray sandbox: {run.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no sandbox of the run appeared on the cluster"
            await asyncio.sleep(0.5)
    finally:
        run.terminate()
        run.wait(30)
    deadline = time.monotonic() + 30
    while actors & _sandbox_actors():
        assert time.monotonic() < deadline, "the stopped run's sandbox actors are still alive"
        await asyncio.sleep(0.5)


def _sandbox_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "cellforge" and a["name"].startswith("sandbox-")}


async def test_a_job_whose_node_dies_is_requeued_with_the_reason(runner, cluster, tmp_path):
    """Last in the module: it removes one of the two job nodes."""
    job_id = _submit(runner, _bundle(tmp_path / "doomed", 300))
    await _until(runner, job_id, lambda job: job.phase == "pytest", within=120)
    node_id = next(e.data["node"] for e in runner.store.events(job_id) if e.kind == "node")
    cluster[0].remove_node(cluster[1][node_id])
    await _until(runner, job_id, lambda job: job.attempts == 2 and job.status == "running", within=60)
    requeued = [e.data for e in runner.store.events(job_id) if e.kind == "status" and e.data["status"] == "queued"]
    assert any("Ray node was lost" in e.get("detail", "") for e in requeued), requeued
    # The first run's container lost its owner with the node; the node reaper removes it (not the second's).
    await _until(runner, job_id, lambda job: job.phase == "pytest", within=120)
    mine = {"label": f"cellforge.tenant={TENANT}"}
    engine = docker.from_env()
    assert len(engine.containers.list(filters=mine)) == 2
    await RayBackend(cluster[0].address).reap()
    assert len(engine.containers.list(filters=mine)) == 1
    await runner.cancel(job_id)  # its second run, on the node left
    assert (await _until(runner, job_id, lambda job: job.final, within=15)).status == "cancelled"
