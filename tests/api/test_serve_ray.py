"""`cellforge serve --ray-address`: the API's sandboxes are Ray actors on a cluster's sandbox nodes, and API
replicas on one PostgreSQL database and one cluster serve the same sandboxes."""

from __future__ import annotations

import time

import docker
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from sandbox.ray_backend import NAMESPACE, SLOT_RESOURCE  # noqa: E402
from service.client.errors import NotFoundError, QuotaError  # noqa: E402
from tests.postgres import create_database, postgres_server  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_address(docker_image):
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 80 << 20, "include_dashboard": False,
                        "resources": {SLOT_RESOURCE: 4}},
    )
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


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
    url = create_database(pg_server)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_server(tmp_path / "a", "--ray-address", ray_address)
    b = make_server(tmp_path / "b", "--ray-address", ray_address)
    a.db_url = b.db_url = url
    a.start(timeout=120)
    b.start(timeout=120)
    try:
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
    finally:
        a.stop()
        b.stop()
