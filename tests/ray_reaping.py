"""Waiting for orphan sandbox containers to be reaped (shared by the pool, Ray backend and Ray job tests)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import docker
import docker.errors

if TYPE_CHECKING:  # importing it needs Ray, which the pool's tests do not
    from sandbox.ray_backend import RayBackend


def container_exists(engine: docker.DockerClient, container: str) -> bool:
    try:
        engine.containers.get(container)
    except docker.errors.NotFound:
        return False
    return True


async def reap_until_gone(backend: RayBackend, containers: set[str], within: float = 30) -> None:
    """Reap the cluster's sandbox nodes until none of `containers` is left. An orphan is reaped once its owner,
    the lost actor's or task's worker process, has exited, which trails the node's removal (and a reaper of
    another process on this machine may be first)."""
    engine = docker.from_env()
    deadline = time.monotonic() + within
    while left := {c for c in containers if container_exists(engine, c)}:
        report = await backend.reap()
        assert time.monotonic() < deadline, f"never reaped: {[f'{c[:12]}: {report.kept.get(c)}' for c in left]}"
        await asyncio.sleep(0.5)
