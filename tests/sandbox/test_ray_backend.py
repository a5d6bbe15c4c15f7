"""The Ray backend on a real multi-node Ray cluster (ray.cluster_utils.Cluster) with real Docker sandboxes.

The cluster is one per module: a head node and two workers, each a sandbox node with a zone resource of
its own; the node-loss test adds (and removes) a fourth. Nodes have 2 logical CPUs: a sandbox asks for a
quarter of one, so the shared cores of a test machine are not over-promised.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import replace

import docker
import pytest
import pytest_asyncio

from sandbox import (
    FileTransferError,
    Outcome,
    SandboxClosedError,
    SandboxDeadError,
    SandboxPool,
    SandboxStartError,
    SpecError,
    StatusEvent,
    StdoutEvent,
    WorkspacePathError,
)

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from sandbox.ray_channel import ChannelClient  # noqa: E402
from sandbox.ray_backend import MARKER, SLOT_RESOURCE, RayBackend, RaySandbox, placement  # noqa: E402
from ray_reaping import reap_until_gone  # noqa: E402

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ZONES = ("zone_a", "zone_b", "zone_c")
NODE_ARGS = {"num_cpus": 2, "object_store_memory": 80 << 20}


def _node_resources(zone: str) -> dict[str, float]:
    return {SLOT_RESOURCE: 8, zone: 1}


@pytest.fixture(scope="module")
def cluster(docker_image):
    """Three sandbox nodes, one zone each; zones[name] is that node's Ray node id."""
    c = Cluster(
        initialize_head=True,
        head_node_args={**NODE_ARGS, "resources": _node_resources(ZONES[0]), "include_dashboard": False},
    )
    nodes = [c.head_node] + [c.add_node(**NODE_ARGS, resources=_node_resources(z)) for z in ZONES[1:]]
    c.wait_for_nodes()
    ray.init(address=c.address, namespace="cellforge-tests", logging_level="WARNING")
    c.zones = {zone: node.node_id for zone, node in zip(ZONES, nodes, strict=True)}
    yield c
    ray.shutdown()
    c.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ray_backend(cluster) -> RayBackend:
    # With spares, as the API server's: most sandboxes here start on one (the same shape as the one before).
    backend = RayBackend(placement_timeout=20, spare_ttl=30)
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["channel", "ray_calls"])
async def ray_sandbox(request, ray_backend, small_spec) -> RaySandbox:
    """A sandbox whose executions go over its actor's execution channel, or (the fallback) as Ray calls."""
    backend = ray_backend if request.param == "channel" else RayBackend(placement_timeout=20, channel=False)
    sb = await backend.create(small_spec(cpus=0.25))
    assert (sb._channel is not None) is (request.param == "channel")
    yield sb
    await sb.close()
    await backend.close()


def _container(sb: RaySandbox):
    return docker.from_env().containers.get(f"cellforge-{sb.node.container}")


@pytest.mark.asyncio(loop_scope="module")
async def test_placement_asks_ray_for_the_specs_resources():
    from sandbox import SandboxSpec

    spec = SandboxSpec(cpus=1.5, memory="2g", gpus=["0", "1"], runtime="runsc", resources={"zone_a": 0.5})
    assert placement(spec) == {
        "num_cpus": 1.5,
        "num_gpus": 2,
        "memory": 2 << 30,
        "resources": {SLOT_RESOURCE: 1.0, "zone_a": 0.5, "cellforge_runtime_runsc": MARKER},
    }
    with pytest.raises(SpecError, match="resources"):
        SandboxSpec(resources={"CPU": 1})
    with pytest.raises(SpecError, match="resources"):
        SandboxSpec(resources={"zone_a": 0})


async def test_sandboxes_land_on_the_node_offering_their_resources(cluster, ray_backend, small_spec):
    sandboxes = await asyncio.gather(
        *(ray_backend.create(small_spec(cpus=0.25, resources={zone: MARKER})) for zone in ZONES)
    )
    try:
        assert [sb.node.node_id for sb in sandboxes] == [cluster.zones[zone] for zone in ZONES]
        results = await asyncio.gather(*(sb.execute("6 * 7") for sb in sandboxes))
        assert [r.result for r in results] == ["42"] * 3
        # The tenant's labels reach the container the actor made on its node.
        labels = _container(sandboxes[1]).labels
        assert labels["cellforge.tenant"] == "tests" and labels["cellforge.sandbox"] == sandboxes[1].node.container
    finally:
        await asyncio.gather(*(sb.close() for sb in sandboxes))
    with pytest.raises(docker.errors.NotFound):
        _container(sandboxes[1])


async def test_a_sandbox_no_node_can_hold_is_refused_at_once(ray_backend, small_spec):
    started = time.monotonic()
    with pytest.raises(SandboxStartError, match="zone_x"):
        await ray_backend.create(small_spec(resources={"zone_x": MARKER}))
    with pytest.raises(SandboxStartError, match="cellforge_runtime_kata"):
        await ray_backend.create(small_spec().model_copy(update={"runtime": "kata"}))
    with pytest.raises(SandboxStartError, match="CPU"):
        await ray_backend.create(small_spec(cpus=3))
    assert time.monotonic() - started < 5


async def test_events_stream_back_as_they_happen(ray_sandbox):
    arrivals = []
    async for item in ray_sandbox.stream(
        "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n'done'"
    ):
        arrivals.append((time.monotonic(), item))
    texts = [item.text for _, item in arrivals if isinstance(item, StdoutEvent)]
    assert "".join(texts) == "0\n1\n2\n"
    end, result = arrivals[-1]
    assert result.outcome is Outcome.OK and result.result == "'done'"
    first_output = next(t for t, item in arrivals if isinstance(item, StdoutEvent))
    assert end - first_output > 0.5  # the first line came while the code still ran


async def test_errors_and_the_health_of_the_cluster(ray_backend, ray_sandbox):
    res = await ray_sandbox.execute("1 / 0")
    assert res.outcome is Outcome.ERROR and res.ename == "ZeroDivisionError"
    health = await ray_backend.health()
    assert health.ok and "3 sandbox nodes" in health.detail


async def test_interrupt_stops_the_code_and_keeps_state(ray_sandbox):
    await ray_sandbox.execute("kept = 5")
    started = asyncio.Event()

    def on_event(event):
        if isinstance(event, StdoutEvent):
            started.set()

    running = asyncio.ensure_future(
        ray_sandbox.execute("import time\nprint('go', flush=True)\ntime.sleep(30)", on_event=on_event)
    )
    await asyncio.wait_for(started.wait(), 20)
    await ray_sandbox.interrupt()
    res = await asyncio.wait_for(running, 10)
    assert res.outcome is Outcome.ERROR and res.ename == "KeyboardInterrupt"
    assert (await ray_sandbox.execute("kept")).result == "5"


async def test_an_execution_whose_caller_left_is_interrupted_on_its_node(ray_sandbox):
    slow = "import time\nfor _ in range(300):\n    time.sleep(0.1)\nfinished = True"
    for on_event in (None, lambda event: None):  # one plain actor call; the streaming call
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ray_sandbox.execute(slow, on_event=on_event), 1)
        started = time.monotonic()
        # The kernel was interrupted, not left busy for 30 s: the next execution runs at once.
        assert (await ray_sandbox.execute("'finished' in dir()")).result == "False"
        assert time.monotonic() - started < 10


async def test_a_sandbox_whose_channel_cannot_be_reached_runs_through_ray_calls(ray_backend, small_spec, caplog):
    async with await ray_backend.create(small_spec(cpus=0.25)) as sb:
        assert (await sb.execute("x = 41")).outcome is Outcome.OK
        assert sb._channel is not None and sb._channel._idle  # that run went over the channel
        closed = socket.socket()
        closed.bind((sb.node.channel.host, 0))  # a port of that node nobody listens on
        sb._channel = ChannelClient(replace(sb.node.channel, port=closed.getsockname()[1]))
        closed.close()
        events = []
        res = await sb.execute("print('via ray', flush=True); x + 1", on_event=events.append)
        assert res.result == "42" and any(isinstance(e, StdoutEvent) and e.text == "via ray\n" for e in events)
        assert sb._channel is None and "unreachable" in caplog.text


async def test_timeouts_end_timeout_or_killed(ray_sandbox):
    res = await ray_sandbox.execute("import time; time.sleep(30)", timeout=1)
    assert res.outcome is Outcome.TIMEOUT and not res.state_lost
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(30)"
    res = await ray_sandbox.execute(stubborn, timeout=1)
    assert res.outcome is Outcome.KILLED and res.state_lost
    assert (await ray_sandbox.execute("1 + 1")).result == "2"


async def test_files_and_commands_cross_the_cluster(ray_sandbox, tmp_path):
    files = ray_sandbox.files
    await files.put("in/a.txt", b"alpha")
    assert await files.get("in/a.txt") == b"alpha"
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "b.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "sub" / "c.txt").write_text("gamma")
    assert sorted(await files.put_dir(source, "tree")) == ["tree/b.bin", "tree/sub/c.txt"]
    assert await files.list("tree") == ["b.bin", "sub/c.txt"]
    written = await files.get_dir("tree", tmp_path / "back")
    assert sorted(written) == sorted(str((tmp_path / "back" / p).resolve()) for p in ("b.bin", "sub/c.txt"))
    assert (tmp_path / "back" / "sub" / "c.txt").read_text() == "gamma"
    with pytest.raises(FileTransferError, match="at most 10 bytes"):
        await files.get_dir("tree", tmp_path / "small", max_bytes=10)
    await files.remove("in/a.txt")
    with pytest.raises(FileTransferError):
        await files.get("in/a.txt")
    with pytest.raises(WorkspacePathError):
        await files.put("../escape", b"x")
    res = await ray_sandbox.commands.run(["python", "-c", "import sys; print(open('tree/sub/c.txt').read()); sys.exit(3)"])
    assert res.outcome is Outcome.ERROR and res.exit_code == 3 and res.stdout == "gamma\n"


async def test_a_dead_kernel_reports_died_and_restarts(ray_backend, small_spec):
    async with await ray_backend.create(small_spec(cpus=0.25)) as sb:
        await sb.files.put("kept.txt", b"1")
        res = await sb.execute("import os; os._exit(3)")
        assert res.outcome is Outcome.DIED and res.died_cause == "exit code 3" and sb.dead
        with pytest.raises(SandboxDeadError):
            await sb.execute("1")
        await sb.restart()
        assert sb.healthy and (await sb.execute("1 + 1")).result == "2"


@pytest.mark.parametrize("channel", [True, False], ids=["channel", "ray_calls"])
async def test_a_sandbox_closed_by_another_process_is_closed_here_before_its_watch_says_so(
        ray_backend, small_spec, channel):
    """Another replica's close kills the actor; a call here can meet the kill before the close's notice
    arrives, and must answer closed, not that the sandbox died with its node."""
    backend = ray_backend if channel else RayBackend(placement_timeout=20, channel=False)
    sb = await backend.create(small_spec(cpus=0.25))
    other = await backend.attach(sb.id)
    try:
        assert (await other.execute("1 + 1")).result == "2"
        other._watch.cancel()  # the close's notice has not reached this handle yet
        await sb.close()
        with pytest.raises(SandboxClosedError):
            await other.execute("1")
        assert not other.healthy and not other.lost and other.dead is None
    finally:
        other.detach()
        if not channel:
            await backend.close()


async def test_pooled_leases_reach_the_remote_sandbox(ray_backend, small_spec):
    spec = small_spec(cpus=0.25)
    async with SandboxPool(ray_backend, [spec], warm=1, preload="x = 1", reap_orphans=False) as pool:
        await pool.wait_warm(timeout=60)
        lease = await pool.acquire(spec, tenant="tests")
        running = asyncio.ensure_future(lease.execute("import time; time.sleep(30)"))
        await asyncio.sleep(0.5)
        await lease.interrupt()  # the lease calls the Ray sandbox's own interrupt
        assert (await asyncio.wait_for(running, 10)).ename == "KeyboardInterrupt"
        assert (await lease.execute("x")).result == "1"
        await lease.close()


async def test_a_sandbox_of_a_shape_started_before_starts_on_a_spare_actor_which_otherwise_ends_itself(
        cluster, small_spec):
    backend = RayBackend(placement_timeout=20, spare_ttl=8)
    spec = small_spec(cpus=0.25, resources={"zone_b": MARKER})
    before = _sandbox_actors()  # the module's own (its sandbox, its backend's spares)
    first = await backend.create(spec)
    try:
        await backend.spares_ready()
        [spare] = _sandbox_actors() - before - {f"sandbox-{first.id}"}
        second = await backend.create(spec)  # started in the spare: its actor, its name
        assert f"sandbox-{second.id}" == spare and second.node.node_id == cluster.zones["zone_b"]
        assert (await second.execute("6 * 7")).result == "42"
        assert _container(second).labels["cellforge.sandbox"] == second.node.container
        await second.close()
        await backend.spares_ready()
        [unused] = _sandbox_actors() - before - {f"sandbox-{first.id}"}
    finally:
        await first.close()
    # An unused spare ends itself after its time to live, whoever made it (here not even closing the backend).
    deadline = time.monotonic() + 30
    while unused in _sandbox_actors():
        assert time.monotonic() < deadline, "an unused spare outlived its time to live"
        await asyncio.sleep(0.5)
    await backend.close()


def _sandbox_actors() -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "cellforge" and a["name"].startswith("sandbox-")}


async def test_a_node_with_the_channel_off_serves_executions_as_ray_calls(cluster, ray_backend, small_spec):
    node = cluster.add_node(**NODE_ARGS, resources={SLOT_RESOURCE: 2, "walled": 1},
                            env_vars={"CELLFORGE_RAY_CHANNEL_PORTS": "off"})
    cluster.wait_for_nodes()
    sb = await ray_backend.create(small_spec(cpus=0.25, resources={"walled": MARKER}))
    try:
        assert sb.node.node_id == node.node_id and sb.node.channel is None and sb._channel is None
        res = await sb.execute("print(6 * 7)")
        assert res.outcome is Outcome.OK and res.stdout.strip() == "42"
    finally:
        await sb.close()
        cluster.remove_node(node)


@pytest.mark.parametrize("channel", [True, False], ids=["channel", "ray_calls"])
async def test_a_lost_node_fails_its_sandboxes_with_the_cause(cluster, ray_backend, small_spec, channel):
    doomed = cluster.add_node(**NODE_ARGS, resources={SLOT_RESOURCE: 2, "doomed": 1})
    cluster.wait_for_nodes()
    backend = ray_backend if channel else RayBackend(placement_timeout=20, channel=False)
    sb = await backend.create(small_spec(cpus=0.25, resources={"doomed": MARKER}))
    try:
        assert sb.node.node_id == doomed.node_id and (sb._channel is not None) is channel
        container = _container(sb).id
        started = asyncio.Event()
        events: list = []

        def on_event(event):
            events.append(event)
            started.set()

        running = asyncio.ensure_future(
            sb.execute("import time\nprint('go', flush=True)\ntime.sleep(60)", on_event=on_event)
        )
        await asyncio.wait_for(started.wait(), 20)
        cluster.remove_node(doomed)
        res = await asyncio.wait_for(running, 60)
        assert res.outcome is Outcome.DIED and res.state_lost
        assert res.died_cause and "lost" in res.died_cause and doomed.node_id[:12] in res.died_cause
        assert isinstance(events[-1], StatusEvent) and events[-1].state == "died"
        assert sb.dead == res.died_cause and not sb.healthy
        with pytest.raises(SandboxDeadError, match="lost"):
            await sb.files.get("x")
        # restart() places a fresh sandbox by the same spec: no live node offers `doomed` any more.
        with pytest.raises(SandboxStartError, match="doomed"):
            await sb.restart()
        # Its container outlived the actor; the nodes' reapers remove it.
        await reap_until_gone(ray_backend, {container})
    finally:
        await sb.close()
