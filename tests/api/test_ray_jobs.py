"""Jobs as Ray tasks (service.jobs.ray_jobs) on a real local multi-node Ray cluster with real Docker: the
runner claims regression jobs from the store and runs each as a Ray task asking for its CPUs, so two jobs
run at once on two nodes, their artifacts come back to the service's store, a cancel ends a running job,
its sandbox included, within seconds, and a job whose node dies is requeued (never stuck `running`). Whole
design runs over the cluster: `cellforge design --ray-address` (every sandbox of the run a Ray actor), a
design job submitted through `cellforge serve --ray-address`, and a design job whose nodes die."""

from __future__ import annotations

import asyncio
import json
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
from ray_reaping import reap_until_gone  # noqa: E402

from .conftest import tenant_id  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

TENANT = f"tn_{secrets.token_hex(6)}"  # this run's: its containers are told apart from any other's
DESIGN_TASK = "Predict expression after knockout of unseen genes"


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


def _mine(stopped: bool = False) -> list:
    """This run's tenant's containers (running ones, and stopped ones too with `stopped`)."""
    return docker.from_env().containers.list(all=stopped, filters={"label": f"cellforge.tenant={TENANT}"},
                                             ignore_removed=True)


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
    deadline = asked + 20  # the node closes the sandbox once its task is cancelled
    while _mine():
        assert time.monotonic() < deadline, "the cancelled job's sandbox is still running"
        await asyncio.sleep(0.5)


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


def _dead_sandbox_actors() -> dict[str, dict]:
    """Every sandbox actor the cluster has seen end (Ray's actor table keeps them), by name."""
    from ray._private import state

    return {a["Name"]: a for a in state.actors().values()
            if a["ActorClassName"] == "SandboxActor" and a["State"] == "DEAD"}


def _screen(path: Path) -> Path:
    from service.data import simulate

    simulate("knockout", 0, n_cells=1500, n_genes=50, n_perturbations=6).write_h5ad(path)
    return path


@pytest.mark.timeout(900)  # a whole design run: minutes on a loaded 2-core machine
async def test_a_whole_cellforge_design_runs_over_ray_every_sandbox_an_actor(cluster, tmp_path):
    before = set(_dead_sandbox_actors())
    out = tmp_path / "run"
    run = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "cellforge"), "design", "--data", str(_screen(tmp_path / "screen.h5ad")),
        "--task", DESIGN_TASK, "--out", str(out), "--llm", "offline", "--max-attempts", "1", "--max-nodes", "1",
        "--cpus", "0.5", "--memory", "1g", "--ray-address", cluster[0].address, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(run.communicate(), 900)
    assert run.returncode == 0, stderr.decode()[-3000:]
    assert json.loads(stdout)["ok"]
    # A model and its metrics delivered.
    assert (out / "model.pt").stat().st_size > 0
    assert "model" in json.loads((out / "metrics.json").read_text())
    # Every sandbox the run started ("starting a ray sandbox") is one of the actors it left behind dead, on
    # the cluster's nodes; every step's outcome names one of them.
    started = stderr.decode().count("starting a ray sandbox")
    dead = {name: a for name, a in _dead_sandbox_actors().items() if name not in before}
    assert started >= 2 and len(dead) == started, (started, sorted(dead))
    used = {json.loads(p.read_text())["sandbox"] for p in out.rglob("outcome.json")}
    assert {f"sandbox-{sid}" for sid in used} == set(dead)
    assert {a["Address"]["NodeID"] for a in dead.values()} <= set(cluster[1])
    # Nothing left: no live sandbox actor, no container owned by any of the run's actors' processes.
    assert not _sandbox_actors()
    pids = {a["Pid"] for a in dead.values()}
    left = [c.name for c in docker.from_env().containers.list(all=True, filters={"label": "cellforge.role=design"},
                                                              ignore_removed=True)
            if int(c.labels.get("cellforge.owner", "x:0:0").split(":")[-2]) in pids]
    assert not left, left


@pytest.mark.timeout(900)  # a whole design run: minutes on a loaded 2-core machine
async def test_a_design_job_through_the_api_runs_as_a_ray_task_and_its_artifacts_land_in_the_store(
        cluster, make_server, tmp_path):
    server = make_server(tmp_path, "--ray-address", cluster[0].address).start(timeout=120)
    try:
        with server.client(server.tenant("erin", max_jobs=1)) as c:
            dataset = c.upload_dataset(_screen(tmp_path / "screen.h5ad"))
            job = c.submit_job(dataset.id, DESIGN_TASK, max_attempts=1, max_nodes=0, cpus=0.5, memory="1g")
            final = await asyncio.to_thread(c.wait, job.id, 900)
            assert final.status == "succeeded", final.error
            events = list(c.job_events(job.id))
            [node] = [e.data["node"] for e in events if e.kind == "node"]
            assert node in cluster[1]  # a Ray task on one of the cluster's nodes, not in the server
            assert "pearson_delta" in final.result["metrics"]["model"]
            # The artifacts came back from the node into the server's store.
            stored = tmp_path / "jobs" / job.id / "artifacts"
            assert json.loads((stored / "metrics.json").read_text())["model"]
            assert c.get_artifact(job.id, "model.pt") == (stored / "model.pt").read_bytes()
        # The job's sandboxes were the node's containers, labelled with the tenant: all gone.
        assert not docker.from_env().containers.list(
            all=True, filters={"label": f"cellforge.tenant={tenant_id(server, 'erin')}"}, ignore_removed=True)
    finally:
        server.stop()


@pytest.mark.timeout(600)
async def test_a_design_job_whose_node_dies_restarts_on_another_then_fails_after_its_attempts(cluster, tmp_path):
    """Removes both job nodes (adding two fresh ones after), so it comes last but one."""
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    db.upgrade()
    jobs = JobRunner(JobStore(db), job_kinds(None), tmp_path / "jobs", workers=1, poll_interval=0.2,
                     owner="replica-d", remote=RayJobs(cluster[0].address), max_attempts=2)
    await jobs.start()
    try:
        job = jobs.store.create(TENANT, "design", {
            "dataset_path": str(_screen(tmp_path / "screen.h5ad")), "task": DESIGN_TASK,
            "options": {"max_attempts": 1, "max_nodes": 0, "cpus": 0.5, "memory": "1g"}})
        jobs.wake()

        def nodes() -> list[str]:
            return [e.data["node"] for e in jobs.store.events(job.id) if e.kind == "node"]

        # Attempt 1 runs the pipeline on a node; that node dies.
        await _until(jobs, job.id, lambda j: len(nodes()) == 1 and j.phase not in (None, "queued"), within=120)
        first = nodes()[0]
        cluster[0].remove_node(cluster[1].pop(first))
        # Requeued with the reason, and run again from scratch, as attempt 2, on the other node.
        await _until(jobs, job.id, lambda j: j.attempts == 2 and len(nodes()) == 2, within=90)
        requeued = [e.data for e in jobs.store.events(job.id) if e.kind == "status" and e.data["status"] == "queued"
                    and "detail" in e.data]
        assert len(requeued) == 1 and "attempt 2 of 2" in requeued[0]["detail"], requeued
        assert "Ray node was lost" in requeued[0]["detail"]
        second = nodes()[1]
        assert second != first and second in cluster[1]
        # From scratch: the pipeline reports its progress again after the second node's first event.
        def progress_on_second() -> bool:
            kinds = [e.kind for e in jobs.store.events(job.id)]
            return "progress" in kinds[len(kinds) - kinds[::-1].index("node"):]

        await _until(jobs, job.id, lambda j: progress_on_second(), within=60)
        # Its node dies too: the attempts are spent, so the job fails with the reason (never stuck running).
        cluster[0].remove_node(cluster[1].pop(second))
        final = await _until(jobs, job.id, lambda j: j.final, within=90)
        assert final.status == "failed"
        assert "Ray node was lost" in final.error and "after 2 attempt(s)" in final.error, final.error
    finally:
        await jobs.stop()
        db.dispose()
        for _ in range(2):  # the last test needs two job nodes again
            node = cluster[0].add_node(num_cpus=1, object_store_memory=80 << 20, resources={SLOT_RESOURCE: 4})
            cluster[1][node.node_id] = node
        cluster[0].wait_for_nodes()
    # The lost attempts' containers are orphans (their owners died with the nodes): the nodes' reaper takes them.
    await reap_until_gone(RayBackend(cluster[0].address), {c.id for c in _mine(stopped=True)})
    assert not _mine(stopped=True)


async def test_a_job_whose_node_dies_is_requeued_with_the_reason(runner, cluster, tmp_path):
    """Last in the module: it removes one of the two job nodes."""
    job_id = _submit(runner, _bundle(tmp_path / "doomed", 300))
    await _until(runner, job_id, lambda job: job.phase == "pytest", within=120)
    first = {c.id for c in _mine()}
    assert len(first) == 1, first
    node_id = next(e.data["node"] for e in runner.store.events(job_id) if e.kind == "node")
    cluster[0].remove_node(cluster[1][node_id])
    await _until(runner, job_id, lambda job: job.attempts == 2 and job.status == "running", within=60)
    requeued = [e.data for e in runner.store.events(job_id) if e.kind == "status" and e.data["status"] == "queued"]
    assert any("Ray node was lost" in e.get("detail", "") for e in requeued), requeued
    # The first run's container lost its owner with the node: a reaper removes it, not the second run's. Which
    # reaper comes first is a race (the second run's pool reaps its node's engine as it starts, and the lost
    # worker's exit trails the node's removal), so the second run's sandbox is told apart by id, not by count.
    # (The job's phase still reads the first run's: the second run's sandbox is waited for by its container.)
    deadline = time.monotonic() + 120
    while not {c.id for c in _mine()} - first:
        assert time.monotonic() < deadline, "the second run's sandbox did not start"
        await asyncio.sleep(0.5)
    await reap_until_gone(RayBackend(cluster[0].address), first)
    assert len(_mine()) == 1  # the second run's, kept
    await runner.cancel(job_id)  # its second run, on the node left
    assert (await _until(runner, job_id, lambda job: job.final, within=15)).status == "cancelled"
