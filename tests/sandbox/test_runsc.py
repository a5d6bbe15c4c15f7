"""Sandboxes under gVisor (`runtime="runsc"`): the core behaviours, shown in real runsc containers.

On a developer machine without runsc registered these skip; under CI (`CI=true`) setup registers it
(`scripts/setup-runsc.sh`), and a missing runsc is a failure, so CI cannot go green by skipping. The
whole sandbox suite also runs under runsc with `CELLFORGE_TEST_RUNTIME=runsc`. Slow: gVisor on ptrace
(no KVM) starts and traps slowly, ~25 s for the module; the fast loop keeps the same behaviours under runc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import pytest_asyncio

from sandbox import RUNSC, Outcome, SandboxStartError, require_runtime
from sandbox.runtimes import unregistered

pytestmark = [pytest.mark.docker, pytest.mark.slow]
on_module_loop = pytest.mark.asyncio(loop_scope="module")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runsc(docker_image) -> str:
    try:
        require_runtime(RUNSC)
    except SandboxStartError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"runsc is required under CI (scripts/setup.sh registers it): {exc}")
        pytest.skip(str(exc))
    return RUNSC


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gvisor_sandbox(backend, small_spec, runsc):
    sb = await backend.create(with_runtime(small_spec(), runsc))
    yield sb
    await sb.close()


def with_runtime(spec, runtime: str):
    """The test spec under `runtime`, whatever CELLFORGE_TEST_RUNTIME gave the rest of the suite."""
    return spec.model_copy(update={"runtime": runtime})


async def run_ok(sb, code: str) -> str:
    res = await sb.execute(code, timeout=30)
    assert res.outcome is Outcome.OK, (res.ename, res.evalue, res.traceback, res.stderr)
    return res.stdout


@on_module_loop
async def test_the_container_runs_on_gvisor_not_the_host_kernel(gvisor_sandbox):
    engine = docker.from_env()
    try:
        attrs = engine.api.inspect_container(f"cellforge-{gvisor_sandbox.id}")
    finally:
        engine.close()
    assert attrs["HostConfig"]["Runtime"] == "runsc"
    # System calls are answered by gVisor's kernel, which reports its own release, not the host's.
    release = (await run_ok(gvisor_sandbox, "import os; print(os.uname().release)")).strip()
    assert release and release != os.uname().release


@on_module_loop
async def test_execute_timeout_keeps_state_and_restart_drops_it(gvisor_sandbox):
    await run_ok(gvisor_sandbox, "kept = 41")
    await gvisor_sandbox.files.put("notes/survives.txt", b"workspace is kept")
    res = await gvisor_sandbox.execute("import time\ntime.sleep(30)", timeout=1.0)
    assert res.outcome is Outcome.TIMEOUT and not res.state_lost
    assert (await gvisor_sandbox.execute("kept + 1")).result == "42"

    await gvisor_sandbox.restart()
    gone = await gvisor_sandbox.execute("kept")
    assert gone.outcome is Outcome.ERROR and gone.ename == "NameError"
    assert await gvisor_sandbox.files.get("notes/survives.txt") == b"workspace is kept"


@on_module_loop
async def test_ignored_interrupt_is_killed_and_the_kernel_comes_back(gvisor_sandbox):
    await run_ok(gvisor_sandbox, "doomed = 1")
    res = await gvisor_sandbox.execute(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)",
        timeout=0.5,
    )
    assert res.outcome is Outcome.KILLED and res.state_lost
    assert (await gvisor_sandbox.execute("'doomed' in globals(), 6 * 7")).result == "(False, 42)"


@on_module_loop
async def test_no_network_and_a_read_only_root(gvisor_sandbox):
    out = await run_ok(
        gvisor_sandbox,
        """
import errno, os, socket
for target in [("1.1.1.1", 53), ("172.17.0.1", 2375)]:
    try:
        socket.create_connection(target, timeout=2)
        print("CONNECTED", target)
    except OSError as exc:
        print("refused", errno.errorcode.get(exc.errno, exc.errno))
print("interfaces", [name for _, name in socket.if_nameindex()])
# gVisor checks permissions before the mount's read-only flag, and the sandbox uid owns no file of
# the image (it is chosen per host), so the read-only root shows in the mount's own options.
root = [line.split() for line in open("/proc/mounts") if line.split()[1] == "/"][0]
print("root read-only", "ro" in root[3].split(","))
for path in ["/out/evil", "/usr/lib/evil.so"]:
    try:
        open(path, "a").close()
        print("WROTE", path)
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
""",
    )
    assert "CONNECTED" not in out and out.count("refused") == 2
    assert "interfaces ['lo']" in out
    assert "root read-only True" in out
    assert "/out/evil EACCES" in out and "/usr/lib/evil.so EACCES" in out
    assert "WROTE" not in out


@on_module_loop
async def test_a_fork_bomb_meets_the_task_limit_and_the_sandbox_survives(gvisor_sandbox):
    # The guest's limit is RLIMIT_NPROC, counted by gVisor; the host pids limit only bounds gVisor.
    engine = docker.from_env()
    try:
        host = engine.api.inspect_container(f"cellforge-{gvisor_sandbox.id}")["HostConfig"]
    finally:
        engine.close()
    limit = gvisor_sandbox.spec.pids_limit
    assert {"Name": "nproc", "Soft": limit, "Hard": limit} in host["Ulimits"] and host["PidsLimit"] > limit
    bomb = await gvisor_sandbox.commands.run(["sh", "-c", f"for i in $(seq {4 * limit}); do sleep 2 & done; wait"])
    assert bomb.outcome is Outcome.ERROR and "Cannot fork" in bomb.stderr
    assert (await gvisor_sandbox.execute("6 * 7")).result == "42"


@on_module_loop
async def test_files_round_trip(gvisor_sandbox):
    payload = os.urandom(3 << 20)
    await gvisor_sandbox.files.put("data/blob.bin", payload)
    assert await gvisor_sandbox.files.get("data/blob.bin") == payload
    res = await gvisor_sandbox.commands.run(["python", "-c", "import os; print(os.path.getsize('data/blob.bin'))"])
    assert res.outcome is Outcome.OK and res.stdout.strip() == str(len(payload))


@on_module_loop
async def test_out_of_memory_dies_with_its_cause_and_restarts(backend, small_spec, runsc):
    sb = await backend.create(with_runtime(small_spec(memory="256m"), runsc))
    try:
        await run_ok(sb, "kept = 1")
        res = await sb.execute("hog = b'x' * (1 << 30)", timeout=60)
        # Under gVisor the host's OOM killer kills the Sentry itself, so the container's cgroup goes with it,
        # and on cgroup v1 the engine sometimes misses the OOM event (seen 1 in 25 on a loaded machine; its
        # flag was still unset a second later): the cause is then the bare SIGKILL, which the debugging agent
        # reads as out of memory too (tests/pipeline/test_debugger.py).
        assert res.outcome is Outcome.DIED and res.died_cause in ("out of memory", "signal 9") and res.state_lost
        await sb.restart()
        assert (await sb.execute("'kept' in globals(), 1 + 1")).result == "(False, 2)"
    finally:
        await sb.close()


@on_module_loop
async def test_an_unregistered_runtime_is_named_with_the_fix(backend, small_spec):
    with pytest.raises(SandboxStartError, match="runtime 'cellforge-no-such-runtime' is not registered with the Docker"):
        await backend.create(with_runtime(small_spec(), "cellforge-no-such-runtime"))
    with pytest.raises(SandboxStartError, match=r"it knows: .*runc"):
        require_runtime("cellforge-no-such-runtime")
    # The command the runsc hint names is the one in this repository.
    message = str(unregistered(RUNSC))
    assert "scripts/setup-runsc.sh" in message and (REPO / "scripts" / "setup-runsc.sh").is_file()


def test_cli_runs_a_script_under_runsc(runsc, docker_image, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("import os\nprint('release', os.uname().release)\n")
    cli = str(Path(sys.executable).with_name("cellforge"))
    proc = subprocess.run(
        [cli, "sandbox", "run", str(job), "--image", docker_image, "--memory", "512m", "--runtime", runsc, "--json"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("release ") and lines[0].removeprefix("release ") != os.uname().release
    assert json.loads(lines[-1])["outcome"] == "ok"

    # In-process: the same error path, without paying the CLI's start-up a second time.
    from typer.testing import CliRunner

    from service.cli import app

    missing = CliRunner().invoke(app, ["sandbox", "run", str(job), "--image", docker_image,
                                       "--runtime", "cellforge-no-such-runtime"])
    assert missing.exit_code == 3
    assert "runtime 'cellforge-no-such-runtime' is not registered" in missing.stderr


def test_design_refuses_an_unregistered_runtime_before_it_starts(docker_image, tmp_path):
    from typer.testing import CliRunner

    from service.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["design", "--data", str(tmp_path / "d.h5ad"), "--task", "predict",
                                      "--out", str(out), "--runtime", "cellforge-no-such-runtime", "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False and "runtime 'cellforge-no-such-runtime' is not registered" in summary["message"]
    assert not out.exists(), "nothing may run before the runtime is known to be there"
