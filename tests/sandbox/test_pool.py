"""The warm pool, the orphan reaper and the sync wrapper, against the real Docker engine and kernels."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time

import docker
import docker.errors
import psutil
import pytest

from sandbox.reaper import MANAGED_LABEL, OWNER_LABEL, Owner, current_owner, reap_orphans

pytestmark = pytest.mark.docker


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


def test_reaper_removes_containers_of_dead_owners_only(docker_image, engine):
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
    }
    try:
        report = reap_orphans(engine)
        assert set(report.removed) >= {made["dead"].id, made["reused"].id}
        for name in ("dead", "reused"):
            with pytest.raises(docker.errors.NotFound):
                engine.containers.get(made[name].id)
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


def test_owner_label_round_trips():
    me = current_owner()
    assert Owner.parse(me.label) == Owner(me.host, me.pid, round(me.started, 2))
    assert Owner.parse(me.label).is_alive()
    assert Owner.parse("no-colons") is None
    assert Owner.parse("host:notapid:1.0") is None
