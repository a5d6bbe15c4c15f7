"""The warm pool, the orphan reaper and the sync wrapper, against the real Docker engine and kernels."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import docker
import docker.errors
import docker.types
import psutil
import pytest

from sandbox import DockerBackend, LocalBackend
from sandbox.docker_backend import SANDBOX_LABEL
from sandbox.events import StdoutEvent
from sandbox.errors import PoolClosed, SandboxReaped, WarmupFailed
from sandbox.pool import SandboxPool
from sandbox.reaper import MANAGED_LABEL, OWNER_LABEL, Owner, current_owner, reap_orphans
from sandbox.spec import SandboxSpec
from sandbox.sync import SyncSandbox
from ray_reaping import container_exists

@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = docker.from_env()
    yield client
    client.close()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


@pytest.mark.docker
def test_reaper_removes_containers_of_dead_owners_only(docker_image, engine, tmp_path):
    me = current_owner()
    owners = {
        "dead": Owner(socket.gethostname(), _dead_pid(), time.time() - 60).label,
        # Our own pid with another start time: the pid was reused, the owner is gone.
        "reused": Owner(socket.gethostname(), os.getpid(), me.started - 3600).label,
        "alive": me.label,
        "foreign": Owner("some-other-host", _dead_pid(), time.time()).label,
    }
    made = {
        name: engine.containers.create(docker_image, "true", labels={MANAGED_LABEL: "true", OWNER_LABEL: owner})
        for name, owner in owners.items()
        if name != "dead"
    }
    # The dead owner's sandbox also left its kernel socket folder on the host.
    kernel_dir = tmp_path / "deadbeef0001"
    kernel_dir.mkdir()
    (kernel_dir / "kernel.json").write_text("{}")
    made["dead"] = engine.containers.create(
        docker_image,
        "true",
        labels={MANAGED_LABEL: "true", OWNER_LABEL: owners["dead"], SANDBOX_LABEL: kernel_dir.name},
        mounts=[docker.types.Mount("/run/kernel", str(kernel_dir), type="bind")],
    )
    try:
        report = reap_orphans(engine)
        # Under xdist a pool starting in another worker reaps the same engine and may remove some of these first,
        # so the report need not list them all; what it removed must be ours to remove, and both must be gone.
        assert set(report.removed) & {c.id for c in made.values()} <= {made["dead"].id, made["reused"].id}
        for name in ("dead", "reused"):
            with pytest.raises(docker.errors.NotFound):
                engine.containers.get(made[name].id)
        assert not kernel_dir.exists()
        assert "alive" in report.kept[made["alive"].id]
        assert "another host" in report.kept[made["foreign"].id]
        engine.containers.get(made["alive"].id)
        engine.containers.get(made["foreign"].id)
    finally:
        for container in made.values():
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                pass


@pytest.mark.docker
def test_reapers_racing_for_the_same_orphans_all_succeed(docker_image, engine):
    """Processes starting together (API replicas, a job's pool on a node) reap the same engine at once: a
    removal another reaper has in progress (Docker answers 409) is that orphan gone, not a failed reap that
    would stop a server's start-up."""
    dead = Owner(socket.gethostname(), _dead_pid(), time.time() - 60).label
    # Running orphans: the engine takes a while to stop and remove each, so concurrent removals overlap.
    orphans = [engine.containers.create(docker_image, "sleep 60", labels={MANAGED_LABEL: "true", OWNER_LABEL: dead})
               for _ in range(6)]
    for orphan in orphans:
        try:
            orphan.start()
        except docker.errors.APIError as error:
            # Under xdist a pool starting in another worker may reap it between its creation and its start
            # (Docker: 404, or 409 "marked for removal"): gone, as this test wants every orphan in the end.
            if error.status_code not in (404, 409):
                raise
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: reap_orphans(docker.from_env()), range(4)))  # none raises
        # Gone (by one of these reapers, or by another test's process reaping the engine meanwhile). A reaper
        # answered 409 returns while another's removal is still under way (CI saw one orphan listed right
        # after), so each gets a little time to go; one that nobody removes is still there after it.
        deadline = time.monotonic() + 30
        for orphan in orphans:
            while container_exists(engine, orphan.id):
                assert time.monotonic() < deadline, f"orphan {orphan.short_id} was not reaped"
                time.sleep(0.2)
    finally:
        for orphan in orphans:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                orphan.remove(force=True)


@pytest.mark.docker
async def test_starting_a_docker_pool_reaps_orphans(docker_image, engine):
    dead = Owner(socket.gethostname(), _dead_pid(), time.time() - 60).label
    orphan = engine.containers.create(docker_image, "true", labels={MANAGED_LABEL: "true", OWNER_LABEL: dead})
    try:
        async with SandboxPool(DockerBackend(), [], warm=0):
            with pytest.raises(docker.errors.NotFound):
                engine.containers.get(orphan.id)
    finally:
        try:
            orphan.remove(force=True)
        except docker.errors.NotFound:
            pass


def test_owner_label_round_trips():
    me = current_owner()
    assert Owner.parse(me.label) == Owner(me.host, me.pid, round(me.started, 2))
    assert Owner.parse(me.label).is_alive()
    assert Owner.parse("no-colons") is None
    assert Owner.parse("host:notapid:1.0") is None


# -- the pool ------------------------------------------------------------------------------------


PRELOAD = "import numpy, anndata"


@pytest.fixture
def spec(docker_image) -> SandboxSpec:
    return SandboxSpec(image=docker_image, memory="512m")


def _gone(engine: docker.DockerClient, sandbox_id: str) -> bool:
    return not engine.containers.list(all=True, sparse=True, filters={"label": f"{SANDBOX_LABEL}={sandbox_id}"})


@pytest.mark.slow
@pytest.mark.docker
async def test_acquire_hands_out_warm_sandbox_with_preload_and_refills(spec, engine):
    mine = {"label": f"{OWNER_LABEL}={current_owner().label}"}
    before = {c.id for c in engine.containers.list(all=True, sparse=True, filters=mine)}
    async with SandboxPool(DockerBackend(), [spec], warm=1, preload=PRELOAD, reap_orphans=False) as pool:
        await pool.wait_warm(timeout=60)
        start = time.perf_counter()
        lease = await pool.acquire(spec, tenant="t1")
        assert time.perf_counter() - start < 0.05  # warm: no container or kernel start on this path
        res = await lease.execute("import sys; 'anndata' in sys.modules and 'numpy' in sys.modules")
        assert res.outcome == "ok" and res.result == "True"
        first = lease.id
        await lease.close()
        assert _gone(engine, first)
        with pytest.raises(SandboxReaped, match="released"):
            await lease.execute("1+1")
        await pool.wait_warm(timeout=60)
        stats = pool.stats()
        assert stats.warm == 1 and stats.warm_hits == 1 and stats.created == 2
        held = await pool.acquire(spec, tenant="t2")
    # Shutdown destroys the held lease, the refilled warm one and any still starting.
    assert held.reaped == "the pool was shut down"
    assert {c.id for c in engine.containers.list(all=True, sparse=True, filters=mine)} <= before


@pytest.mark.slow
@pytest.mark.docker
async def test_no_sandbox_is_handed_to_a_second_tenant(spec):
    seen: dict[str, str] = {}
    async with SandboxPool(DockerBackend(), [spec], warm=1, preload="", reap_orphans=False) as pool:
        for tenant in ("alice", "bob", "alice"):
            await pool.wait_warm(timeout=60)
            lease = await pool.acquire(spec, tenant=tenant)
            assert lease.id not in seen, f"{lease.id} of {seen[lease.id]} handed again to {tenant}"
            seen[lease.id] = tenant
            left = await lease.execute("print(globals().get('secret')); secret = 'of ' + " + repr(tenant))
            assert left.stdout.strip() == "None"
            await lease.files.put("mine.txt", tenant.encode())
            await lease.close()
            assert (await _workspace_files(pool, spec)) == []


async def _workspace_files(pool: SandboxPool, spec: SandboxSpec) -> list[str]:
    """What the next tenant would find in its workspace."""
    await pool.wait_warm(timeout=60)
    probe = await pool.acquire(spec, tenant="probe")
    try:
        res = await probe.execute("import os; print(sorted(os.listdir('.')))")
        return eval(res.stdout)  # noqa: S307 - our own print of a list of names
    finally:
        await probe.close()


async def test_leases_are_counted_per_tenant_without_a_cap_and_release_runs_its_hook():
    """The pool counts leases per tenant but caps none (a tenant's quota is its owner's decision); a lease's
    `on_release` runs once it is destroyed; a non-reapable lease outlives the idle reaper."""
    local = SandboxSpec(image="local", memory="512m")
    released: list[str] = []

    async def hook(lease) -> None:
        released.append(lease.id)

    async with SandboxPool(LocalBackend(), [], warm=0, preload="", idle_timeout=60, reap_interval=1000,
                           reap_orphans=False) as pool:
        first = await pool.acquire(local, tenant="t1", on_release=hook)
        second = await pool.acquire(local, tenant="t1", reapable=False)
        other = await pool.acquire(local, tenant="t2")
        assert pool.stats().live_per_tenant == {"t1": 2, "t2": 1}
        await first.close()
        await first.close()  # twice is harmless, and the hook ran once
        assert released == [first.id]
        for lease in (second, other):
            lease.last_active -= 120  # idle past the timeout
        await pool.reap_now()  # the reapable one goes, the other stays
        assert other.reaped and "idle" in other.reaped and second.reaped is None
        assert (await second.execute("1 + 1")).result == "2"
        assert pool.stats().live_per_tenant == {"t1": 1}
        await second.close()
    with pytest.raises(PoolClosed):
        await pool.acquire(local, tenant="t1")


@pytest.mark.docker
async def test_idle_leases_are_reaped_and_their_containers_removed(spec, engine):
    async with SandboxPool(
        DockerBackend(), [], warm=0, preload="", idle_timeout=0.5, reap_interval=0.1, reap_orphans=False
    ) as pool:
        lease = await pool.acquire(spec, tenant="t1")
        res = await lease.execute("import time; time.sleep(1.0); 'still here'")  # busy is not idle
        assert res.result == "'still here'" and lease.reaped is None
        for _ in range(50):
            if lease.reaped:
                break
            await asyncio.sleep(0.1)
        assert "idle for more than 0.5 s" in lease.reaped
        with pytest.raises(SandboxReaped, match="idle"):
            await lease.execute("1+1")
        for _ in range(50):
            if _gone(engine, lease.id):
                break
            await asyncio.sleep(0.1)
        assert _gone(engine, lease.id)
        assert pool.stats().reaped_idle == 1 and pool.stats().live_per_tenant == {}


async def test_leases_and_warm_sandboxes_past_max_lifetime_are_replaced():
    local = SandboxSpec(image="local", memory="512m")
    async with SandboxPool(
        LocalBackend(), [local], warm=1, preload="", max_lifetime=1.5, reap_interval=0.1, reap_orphans=False
    ) as pool:
        await pool.wait_warm(timeout=30)
        lease = await pool.acquire(local, tenant="t1")
        deadline = time.monotonic() + 10
        while not lease.reaped and time.monotonic() < deadline:
            await lease.execute("1+1")  # activity does not extend the lifetime
            await asyncio.sleep(0.1)
        assert "maximum lifetime of 1.5 s" in lease.reaped
        while pool.stats().warm_recycled == 0 and time.monotonic() < deadline + 10:
            await asyncio.sleep(0.1)
        stats = pool.stats()
        assert stats.reaped_lifetime == 1 and stats.warm_recycled >= 1


@pytest.mark.slow
@pytest.mark.docker
async def test_out_of_memory_in_a_pooled_sandbox_dies_and_the_pool_recovers(docker_image):
    small = SandboxSpec(image=docker_image, memory="256m")
    async with SandboxPool(DockerBackend(), [small], warm=1, preload="", reap_orphans=False) as pool:
        await pool.wait_warm(timeout=60)
        lease = await pool.acquire(small, tenant="t1")
        res = await lease.execute("x = b'x' * (600 << 20)", timeout=60)
        assert res.outcome == "died" and "out of memory" in res.died_cause
        await lease.close()
        await pool.wait_warm(timeout=60)
        after = await pool.acquire(small, tenant="t1")
        assert (await after.execute("1+1")).result == "2"
        await after.close()


@pytest.mark.slow
@pytest.mark.docker
async def test_a_warm_sandbox_that_died_while_waiting_is_never_handed_out(spec, engine):
    async with SandboxPool(DockerBackend(), [spec], warm=1, preload="", reap_orphans=False) as pool:
        await pool.wait_warm(timeout=60)
        (victim,) = engine.containers.list(filters={"label": f"{OWNER_LABEL}={current_owner().label}"})
        victim.kill()
        await asyncio.sleep(0.5)  # the kernel client's socket monitor notices the lost connection
        lease = await pool.acquire(spec, tenant="t1")
        assert (await lease.execute("1+1")).result == "2"
        assert pool.stats().warm_recycled == 1 and pool.stats().cold_starts == 1
        await lease.close()


async def test_a_failing_preload_is_reported_and_retried_with_backoff():
    local = SandboxSpec(image="local", memory="512m")
    async with SandboxPool(
        LocalBackend(), [local], warm=1, preload="import no_such_module_xyz", reap_orphans=False
    ) as pool:
        with pytest.raises(WarmupFailed, match="import no_such_module_xyz.*ModuleNotFoundError"):
            await pool.acquire(local, tenant="t1")
        await asyncio.sleep(1.0)
        failures = pool.stats().warmup_failures
        assert 1 <= failures <= 3  # backing off (0.5 s, 1 s, ...), not a tight loop
        assert pool.stats().live_per_tenant == {}


# -- the sync wrapper ------------------------------------------------------------------------------


@pytest.mark.docker
def test_sync_sandbox_blocks_streams_and_closes(docker_image, engine):
    with SyncSandbox(SandboxSpec(image=docker_image, memory="512m")) as sb:
        assert sb.isolated
        assert sb.execute("x = 20\nx * 2 + 2").result == "42"
        events = list(sb.stream("import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.2)"))
        printed = "".join(e.text for e in events if isinstance(e, StdoutEvent))
        assert printed == "0\n1\n2\n"
        assert events[-1].outcome == "ok"
        sb.files.put("hello.txt", b"hi")
        assert sb.files.get("hello.txt") == b"hi"
        sandbox_id = sb.id
    assert _gone(engine, sandbox_id)
    sb.close()  # twice is harmless
