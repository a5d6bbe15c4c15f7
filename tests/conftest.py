"""Fixtures shared by every test package.

Tests that need Docker use `docker_image`. On a developer machine without an engine they skip;
under CI (`CI=true`) a missing engine or image is a failure, so CI can never go green by skipping.

Under pytest-xdist (`-n N`; `--dist loadfile` is in pyproject's addopts) each test file runs whole on one
worker, so its module-scoped servers, clusters and sandboxes are made once, as without xdist; the files
in one of `_GROUPS` share a worker, one after the other (`pytest_xdist_make_scheduler`).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import pathlib
import sys

# The repository root goes first so that `sandbox` is the package, never the namespace `tests/sandbox`
# (the editable install's finder comes after sys.path). tests/ is appended for the scripted
# OpenAI-compatible server (the only stand-in allowed), a plugin every package can use.
_TESTS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_TESTS.parent))
sys.path.append(str(_TESTS))
pytest_plugins = ["fake_llm_server"]

# Files kept on one worker, one after the other: each Ray file starts a local multi-node cluster (a head and two
# nodes: a dozen processes with their object stores), and two at once on a small machine compete for the same
# cores the clusters' timeouts are sized for.
_GROUPS = {
    "ray": ("tests/api/test_ray_jobs.py", "tests/api/test_serve_ray.py", "tests/sandbox/test_ray_backend.py"),
}
_GROUP_OF = {path: group for group, paths in _GROUPS.items() for path in paths}


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per available core, at most 4. Each worker collects the whole suite (seconds of
    CPU each), so more workers than cores cost more than the waits they overlap: on 2 busy cores the fast
    suite took 162 s of CPU with 2 workers and 225 s with 4, and longer."""
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadfile`, with the files of one of `_GROUPS` as one unit. Grouping by scheduler, not by xdist's
    `xdist_group` mark: that mark works by renaming each test's node id, which pytest 9.2 no longer lets a
    plugin do (xdist 3.8 still tries: pytest-dev/pytest-xdist#1386), so every file was silently spread over the
    workers, and each worker built the file's module-scoped servers, design runs and clusters again."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return _GROUP_OF.get(path, path)

    return FileGroups(config, log)


SANDBOX_IMAGE = os.environ.get("CELLFORGE_TEST_IMAGE", "cellforge-sandbox:cpu")


def _docker_ok() -> str | None:
    if shutil.which("docker") is None:
        return "docker client not installed"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "Docker engine not answering"
    if subprocess.run(["docker", "image", "inspect", SANDBOX_IMAGE], capture_output=True).returncode != 0:
        return f"sandbox image {SANDBOX_IMAGE} missing (run ./scripts/setup.sh)"
    return None


@pytest.fixture(scope="session")
def docker_image() -> str:
    """The sandbox image tag, with a live engine; skip (or fail under CI) otherwise."""
    problem = _docker_ok()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"Docker required under CI: {problem}")
        pytest.skip(problem)
    return SANDBOX_IMAGE
