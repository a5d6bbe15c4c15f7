"""Sandboxes for the sandbox tests: real Docker containers and real kernels.

Sandboxes are expensive (about a second each), so tests that do not break their sandbox share one
per module; tests that kill, restart or exhaust a sandbox make their own. CELLFORGE_TEST_RUNTIME
(e.g. `runsc`) runs every test sandbox under that container runtime.
"""

from __future__ import annotations

import os

import pytest
import pytest_asyncio

from sandbox import DockerBackend, Sandbox, SandboxSpec


def _small_spec(image: str, runtime: str | None, **overrides) -> SandboxSpec:
    values = dict(
        image=image,
        runtime=runtime,
        cpus=1.0,
        memory="512m",
        timeout=20.0,
        pids_limit=128,
        tmpfs_size="64m",
        workspace_quota="64m",
        interrupt_grace=1.5,
        labels={"tenant": "tests"},
    )
    values.update(overrides)
    return SandboxSpec(**values)


@pytest.fixture(scope="session")
def sandbox_runtime() -> str | None:
    """The container runtime test sandboxes run under (None: the engine's default, runc)."""
    return os.environ.get("CELLFORGE_TEST_RUNTIME") or None


@pytest.fixture(scope="session")
def small_spec(docker_image, sandbox_runtime):
    """Build a sandbox spec sized for tests (small limits, short timeouts, quick interrupt grace)."""
    return lambda **overrides: _small_spec(docker_image, sandbox_runtime, **overrides)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(docker_image) -> DockerBackend:
    backend = DockerBackend()
    yield backend
    await backend.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_sandbox(backend, small_spec) -> Sandbox:
    """One sandbox per module for tests that leave it usable."""
    sb = await backend.create(small_spec())
    yield sb
    await sb.close()
