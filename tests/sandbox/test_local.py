"""The local (non-isolated) backend with real kernels, and spec validation (no engine needed)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import pytest_asyncio

from sandbox import LocalBackend, Mount, Outcome, SandboxSpec, WorkspacePathError

in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local(tmp_path_factory):
    split = tmp_path_factory.mktemp("split")
    (split / "train.txt").write_text("cells")
    os.environ["OPENAI_API_KEY"] = "sk-local-host-secret"
    try:
        sb = await LocalBackend().create(
            SandboxSpec(
                timeout=20, interrupt_grace=1.0, env={"TASK_NAME": "demo"}, mounts=[Mount(source=str(split))]
            )
        )
    finally:
        del os.environ["OPENAI_API_KEY"]
    yield sb
    await sb.close()


@in_module_loop
async def test_says_loudly_that_it_is_not_isolated(caplog):
    with caplog.at_level(logging.WARNING, logger="sandbox.local_backend"):
        sb = await LocalBackend().create(SandboxSpec())
    try:
        assert sb.isolated is False and "NOT ISOLATED" in repr(sb)
        assert any("NOT ISOLATED" in r.getMessage() for r in caplog.records)
    finally:
        await sb.close()


@in_module_loop
async def test_runs_in_its_own_workspace_with_a_clean_environment(local):
    res = await local.execute("import os; print(os.getcwd()); print(sorted(os.environ))")
    assert res.outcome is Outcome.OK
    cwd, env = res.stdout.splitlines()
    assert cwd == local.workspace
    assert "OPENAI_API_KEY" not in env and "TASK_NAME" in env
    assert "sk-local" not in res.stdout


@in_module_loop
async def test_data_mounts_are_reachable_under_data_root(local):
    res = await local.execute(f"open({os.path.join(local.data_root, 'train.txt')!r}).read()")
    assert res.result == "'cells'"


@in_module_loop
async def test_outcomes_and_commands_work_as_in_docker(local):
    await local.execute("kept = 5")
    timed_out = await local.execute("while True:\n    pass", timeout=0.5)
    assert timed_out.outcome is Outcome.TIMEOUT and (await local.execute("kept")).result == "5"
    killed = await local.execute(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)",
        timeout=0.5,
    )
    assert killed.outcome is Outcome.KILLED and killed.state_lost
    assert (await local.execute("kept")).ename == "NameError"
    cmd = await local.commands.run(["sh", "-c", "echo hi; exit 4"])
    assert cmd.outcome is Outcome.ERROR and cmd.exit_code == 4 and cmd.stdout == "hi\n"


@in_module_loop
async def test_files_stay_inside_the_local_workspace(local, tmp_path):
    await local.files.put("code/model.py", b"X = 1\n")
    assert (Path(local.workspace) / "code" / "model.py").read_bytes() == b"X = 1\n"
    assert await local.files.get("code/model.py") == b"X = 1\n"
    outside = tmp_path / "host_file.txt"
    outside.write_text("host")
    await local.execute(f"import os; os.symlink({str(tmp_path)!r}, 'escape')")
    with pytest.raises(WorkspacePathError, match="outside the workspace"):
        await local.files.put("escape/host_file.txt", b"overwritten")
    assert outside.read_text() == "host"
    with pytest.raises(WorkspacePathError):
        await local.files.put("../../escape.txt", b"x")


@pytest.fixture
def short_root():
    """A root short enough for the kernel's unix sockets (a worker's tmp_path under xdist is longer)."""
    root = tempfile.mkdtemp(prefix="cf-local-")
    yield Path(root)
    shutil.rmtree(root, ignore_errors=True)


@in_module_loop
async def test_death_revive_and_close_clean_up(short_root):
    sb = await LocalBackend(root=short_root).create(SandboxSpec())
    base = Path(sb.workspace).parent
    died = await sb.execute("import os; os._exit(7)")
    assert died.outcome is Outcome.DIED and died.died_cause == "exit code 7"
    await sb.restart()
    assert (await sb.execute("2 + 2")).result == "4"
    await sb.close()
    assert not base.exists()


def test_spec_rejects_unsafe_values():
    bad = [
        {"env": {"LD_PRELOAD": "/tmp/x.so"}},
        {"env": {"PYTHONSTARTUP": "/tmp/x.py"}},
        {"mounts": [{"source": "relative/dir", "target": "/data"}]},
        {"mounts": [{"source": "/srv/split", "target": "/etc"}]},
        {"mounts": [{"source": "/srv/split", "target": "/data", "read_only": False}]},
        {"mounts": [{"source": "/srv/../etc", "target": "/data"}]},
        {"memory": "lots"},
        {"memory": "10m"},
        {"gpus": ["0", "0"]},
        {"gpus": ["all; rm -rf /"]},
        {"runtime": "runsc --debug"},
        {"pids_limit": 0},
    ]
    for values in bad:
        with pytest.raises(ValueError):
            SandboxSpec.parse(values)
    spec = SandboxSpec.parse({"memory": "2g", "gpus": ["0"], "mounts": [{"source": "/srv/split"}]})
    assert spec.memory_bytes == 2 << 30 and spec.mounts[0].target == "/data"
