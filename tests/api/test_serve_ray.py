"""`cellforge serve --ray-address`: the API's sandboxes are Ray actors on a cluster's sandbox nodes, API
replicas on one PostgreSQL database and one cluster serve the same sandboxes, a sandbox whose node died
while a replica held it leaves its tenant's quota until a restart fits it again, and one whose node died
while no replica held it answers `died` with the cause and leaves its tenant's quota."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import docker
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from sandbox.ray_backend import NAMESPACE, SLOT_RESOURCE  # noqa: E402
from service.client.errors import APIError, NotFoundError, QuotaError  # noqa: E402
from tests.postgres import create_database, postgres_server  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(docker_image):
    # A head without sandboxes and two sandbox nodes: a node that holds a sandbox can be removed.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20,
                                                            "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20, resources={SLOT_RESOURCE: 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def ray_address(cluster):
    return cluster.address


@contextlib.contextmanager
def _replicas(make_server, tmp_path, address: str, pg_server) -> Iterator[tuple[Any, Any]]:
    """Two `cellforge serve` replicas on one fresh PostgreSQL database and the cluster at `address`."""
    url = create_database(pg_server)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_server(tmp_path / "a", "--ray-address", address)
    b = make_server(tmp_path / "b", "--ray-address", address)
    a.db_url = b.db_url = url
    a.start(timeout=120)
    b.start(timeout=120)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def _gone(actor_name: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name, namespace=NAMESPACE)
        except ValueError:
            return True
        time.sleep(0.2)
    return False


def test_api_sandboxes_run_as_actors_on_the_cluster(make_server, tmp_path, ray_address):
    server = make_server(tmp_path, "--ray-address", ray_address).start(timeout=120)
    try:
        with server.client(server.tenant("carol", max_sandboxes=2)) as client:
            sandbox = client.create_sandbox(cpus=0.5, memory="512m")
            ray.get_actor(f"sandbox-{sandbox.id}", namespace=NAMESPACE)  # raises ValueError when absent
            assert client.execute(sandbox.id, "21 * 2").result == "42"
            # The container is the actor's (its owner is a Ray worker, not the server) and carries the tenant.
            [container] = docker.from_env().containers.list(
                filters={"label": f"cellforge.tenant={server.tenant_id('carol')}"})
            owner_pid = int(container.labels["cellforge.owner"].split(":")[-2])
            assert owner_pid != server.proc.pid
            client.delete_sandbox(sandbox.id)
        assert _gone(f"sandbox-{sandbox.id}", within=10)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pg_server():
    with postgres_server() as url:
        yield url


def test_replicas_on_one_database_serve_the_same_sandboxes_and_a_killed_one_loses_nothing(
        make_server, tmp_path, ray_address, pg_server):
    with _replicas(make_server, tmp_path, ray_address, pg_server) as (a, b):
        dave = a.tenant("dave", max_sandboxes=1)
        with a.client(dave) as via_a, b.client(dave, "grpc") as via_b:
            sandbox = via_a.create_sandbox(cpus=0.5, memory="512m")
            assert via_a.execute(sandbox.id, "x = 20").outcome == "ok"
            # The same kernel through the other replica (and the other transport).
            assert via_b.execute(sandbox.id, "x + 22").result == "42"
            # The tenant's quota holds across replicas: its one sandbox is through a.
            with pytest.raises(QuotaError):
                via_b.create_sandbox(cpus=0.5, memory="512m")

            a.kill()  # SIGKILL: nothing of a's clean-up runs
            assert via_b.execute(sandbox.id, "x * 2").result == "40"
            assert [s.id for s in via_b.list_sandboxes()] == [sandbox.id]

            a.start(timeout=120)  # a restarted replica finds its sandbox where it was
            assert via_a.execute(sandbox.id, "x").result == "20"
            via_b.delete_sandbox(sandbox.id)
            with pytest.raises(NotFoundError):
                via_a.execute(sandbox.id, "x")
        assert _gone(f"sandbox-{sandbox.id}", within=10)


def test_a_held_sandbox_whose_node_died_leaves_the_quota_until_its_restart_fits_again(
        make_server, tmp_path, cluster, pg_server):
    """It adds a sandbox node and removes the one that holds the sandbox (the module keeps two)."""
    cluster.add_node(num_cpus=1, object_store_memory=80 << 20, resources={SLOT_RESOURCE: 4})
    cluster.wait_for_nodes()
    with _replicas(make_server, tmp_path, cluster.address, pg_server) as (a, b):
        gina = a.tenant("gina", max_sandboxes=1)
        with a.client(gina) as via_a, b.client(gina) as via_b:
            sandbox = via_a.create_sandbox(cpus=0.5, memory="512m")
            assert via_a.execute(sandbox.id, "x = 1").outcome == "ok"
            with pytest.raises(QuotaError):  # it counts: the tenant's one sandbox
                via_b.create_sandbox(cpus=0.5, memory="512m")
            node_id = _actor_record(f"sandbox-{sandbox.id}", "ALIVE")["Address"]["NodeID"]
            [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
            cluster.remove_node(node)
            deadline = time.monotonic() + 60
            while via_a.get_sandbox(sandbox.id).status != "dead":  # a, which holds it, learns of the loss
                assert time.monotonic() < deadline, "the replica holding the sandbox never saw its node die"
                time.sleep(0.5)

            # Still the tenant's (a restarts or deletes it), but out of the quota: a new sandbox fits, through b.
            assert [s.id for s in via_a.list_sandboxes()] == [sandbox.id]
            deadline = time.monotonic() + 10
            while True:
                try:
                    fresh = via_b.create_sandbox(cpus=0.5, memory="512m")
                    break
                except QuotaError:
                    assert time.monotonic() < deadline, "the dead sandbox still holds the tenant's quota"
                    time.sleep(0.5)
            assert via_b.execute(fresh.id, "2 + 2").result == "4"
            # Restarted, it would use resources again: refused while the new one holds the quota ...
            with pytest.raises(QuotaError):
                via_a.restart(sandbox.id)
            assert via_a.get_sandbox(sandbox.id).status == "dead"
            # ... placed anew once there is room, and then it counts again.
            via_b.delete_sandbox(fresh.id)
            via_a.restart(sandbox.id)
            assert via_a.get_sandbox(sandbox.id).status == "live"
            assert via_a.execute(sandbox.id, "1 + 1").result == "2"
            assert _actor_record(f"sandbox-{sandbox.id}", "ALIVE")["Address"]["NodeID"] != node_id
            with pytest.raises(QuotaError):
                via_b.create_sandbox(cpus=0.5, memory="512m")
            via_a.delete_sandbox(sandbox.id)
        assert _gone(f"sandbox-{sandbox.id}", within=10)


def _actor_record(name: str, state: str) -> dict | None:
    from ray._private import state as gcs

    return next((a for a in gcs.actors().values() if a["Name"] == name and a["State"] == state), None)


def test_a_sandbox_whose_node_died_while_no_replica_held_it_answers_died_and_leaves_the_quota(
        make_server, tmp_path, cluster, pg_server):
    """Last in the module: it removes a sandbox node."""
    with _replicas(make_server, tmp_path, cluster.address, pg_server) as (a, b):
        frank = a.tenant("frank", max_sandboxes=1)
        with a.client(frank) as via_a:
            sandbox = via_a.create_sandbox(cpus=0.5, memory="512m")
            assert via_a.execute(sandbox.id, "x = 1").outcome == "ok"
        a.kill()  # the replica that held it is gone; b never touched it
        name = f"sandbox-{sandbox.id}"
        record = _actor_record(name, "ALIVE")
        assert record is not None
        node_id = record["Address"]["NodeID"]
        [node] = [n for n in cluster.worker_nodes if n.node_id == node_id]
        cluster.remove_node(node)
        deadline = time.monotonic() + 60
        while _actor_record(name, "DEAD") is None:  # the cluster has noticed the node's death
            assert time.monotonic() < deadline, "the lost node's actor is still not dead"
            time.sleep(0.5)

        with b.client(frank) as via_b, b.client(frank, "grpc") as via_grpc:
            for client in (via_b, via_grpc):  # on both transports, and again after the first answer
                result = client.execute(sandbox.id, "x + 1")
                assert result.outcome == "died" and result.state_lost, result
                assert f"Ray node {node_id[:12]} lost" in result.died_cause, result.died_cause
                assert client.get_sandbox(sandbox.id).status == "dead"
                with pytest.raises(APIError) as refused:
                    client.list_files(sandbox.id)
                assert refused.value.status == 409 and "died" in refused.value.message
            assert via_b.list_sandboxes() == []
            # Out of the quota (one sandbox): a new one fits, on the node left.
            fresh = via_b.create_sandbox(cpus=0.5, memory="512m")
            assert via_b.execute(fresh.id, "2 + 2").result == "4"
            via_b.delete_sandbox(fresh.id)
            via_b.delete_sandbox(sandbox.id)  # a dead sandbox's delete succeeds; then it is gone
            with pytest.raises(NotFoundError):
                via_b.get_sandbox(sandbox.id)
