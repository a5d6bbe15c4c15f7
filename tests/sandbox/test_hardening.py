"""Each hardening default shown by code inside a real sandbox that tries to break it."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading

import docker
import docker.errors
import pytest
import requests.exceptions

from sandbox import Outcome
from sandbox.docker_backend import SANDBOX_LABEL, SUPERVISOR_CAPS, TENANT_LABEL
from sandbox.reaper import MANAGED_LABEL, OWNER_LABEL, current_owner
from sandbox.runtimes import is_gvisor, task_limits

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]


async def run_ok(sb, code: str) -> str:
    res = await sb.execute(code, timeout=20)
    assert res.outcome is Outcome.OK, (res.ename, res.evalue, res.traceback, res.stderr)
    return res.stdout


async def test_no_network_at_all(shared_sandbox):
    out = await run_ok(
        shared_sandbox,
        """
import os, socket
for target in [("1.1.1.1", 53), ("8.8.8.8", 443), ("172.17.0.1", 2375)]:
    try:
        socket.create_connection(target, timeout=2)
        print("CONNECTED", target)
    except OSError as exc:
        print("refused", exc.errno)
try:
    socket.getaddrinfo("pypi.org", 443)
    print("RESOLVED")
except OSError:
    print("no dns")
print(sorted(os.listdir("/sys/class/net")))
""",
    )
    assert "CONNECTED" not in out and "RESOLVED" not in out
    assert out.count("refused") == 3 and "no dns" in out
    assert "['lo']" in out


async def test_root_filesystem_and_socket_folder_are_read_only(shared_sandbox):
    out = await run_ok(
        shared_sandbox,
        """
import errno
for path in ["/usr/lib/evil.so", "/etc/passwd", "/opt/venv/bin/python", "/run/kernel/fill", "/evil"]:
    try:
        with open(path, "a") as f:
            f.write("x")
        print("WROTE", path)
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
root = [line.split() for line in open("/proc/mounts") if line.split()[1] == "/"][0]
print("root options", root[3])
""",
    )
    assert "WROTE" not in out
    # gVisor checks a file's permissions before the read-only mount (EACCES for root's files); the
    # mount options show the root read-only under both, and test_runsc shows EROFS on a path we own.
    refused = "EACCES" if is_gvisor(shared_sandbox.spec.runtime) else "EROFS"
    assert f"/usr/lib/evil.so {refused}" in out and f"/evil {refused}" in out
    assert "root options ro," in out
    # The bind-mounted kernel folder reaches the host's disk: the kernel may not add files there.
    assert "/run/kernel/fill EACCES" in out


async def test_no_privileges_can_be_gained(backend, shared_sandbox):
    out = await run_ok(
        shared_sandbox,
        """
import ctypes, os
print("uid", os.getuid(), os.geteuid(), os.getgid())
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
for key in ["CapEff", "CapPrm", "CapBnd", "CapAmb"]:
    print(key, status[key].strip() if key in status else "absent")
print("NoNewPrivs", ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))  # PR_GET_NO_NEW_PRIVS (gVisor's /proc lacks it)
for attempt in ["os.setuid(0)", "os.setgid(0)", "os.chown('/workspace', 0, 0)", "os.chroot('/tmp')"]:
    try:
        eval(attempt)
        print("GAINED", attempt)
    except PermissionError:
        print("denied", attempt)
""",
    )
    uid = (await backend.engine_ids()).sandbox_uid
    assert f"uid {uid} {uid} {uid}" in out
    for cap in ["CapEff", "CapPrm", "CapBnd"]:
        assert f"{cap} 0000000000000000" in out
    # gVisor has no ambient capabilities at all, so its /proc shows no CapAmb line.
    assert "CapAmb 0000000000000000" in out or (is_gvisor(shared_sandbox.spec.runtime) and "CapAmb absent" in out)
    assert "NoNewPrivs 1" in out
    assert "GAINED" not in out and out.count("denied") == 4
    # setuid binaries do not help either (no-new-privileges ignores the setuid bit).
    res = await shared_sandbox.commands.run(["sh", "-c", "su -c id root </dev/null"])
    assert res.outcome is Outcome.ERROR and res.exit_code != 0
    assert "uid=0" not in res.stdout


async def test_fork_bomb_hits_the_pids_limit_and_the_sandbox_survives(shared_sandbox):
    out = await run_ok(
        shared_sandbox,
        """
import os, time
children, failure = [], None
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as exc:
        failure = type(exc).__name__
        break
    if pid == 0:
        time.sleep(1.0)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
print("forked", len(children), "then", failure)
""",
    )
    forked = int(out.split()[1])
    assert "then BlockingIOError" in out and forked < shared_sandbox.spec.pids_limit
    assert (await shared_sandbox.execute("6 * 7")).result == "42"


async def test_allocating_past_the_memory_limit_dies_out_of_memory(backend, small_spec):
    sb = await backend.create(small_spec(memory="256m"))
    try:
        await run_ok(sb, "kept = 1")
        res = await sb.execute("hog = b'x' * (1 << 30)", timeout=30)
        assert res.outcome is Outcome.DIED
        assert res.died_cause == "out of memory"
        assert res.state_lost
        await sb.restart()
        res = await sb.execute("'kept' in globals(), 1 + 1")
        assert res.result == "(False, 2)"
    finally:
        await sb.close()


async def test_other_sandboxes_and_host_secrets_are_out_of_reach(backend, small_spec, shared_sandbox, monkeypatch):
    await shared_sandbox.files.put("secret.txt", b"tenant-a-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-host-secret")
    other = await backend.create(small_spec(env={"TASK_NAME": "demo"}, labels={"tenant": "b"}))
    try:
        out = await run_ok(
            other,
            """
import glob, os, subprocess
print("env", sorted(os.environ))
print("workspace", os.listdir("/workspace"))
places = ["/workspace", "/tmp", "/run", "/data", "/home"]
found = subprocess.run(["grep", "-rls", "tenant-a-secret", *places], capture_output=True, text=True).stdout
print("found", repr(found))
print("kernel dir", sorted(os.listdir("/run/kernel")))
environs = b"".join(open(p, "rb").read() for p in glob.glob("/proc/[0-9]*/environ") if os.access(p, os.R_OK))
print("proc environ has key:", b"sk-test" in environs)
print("pids", len(glob.glob("/proc/[0-9]*")))
""",
        )
        assert "OPENAI_API_KEY" not in out and "sk-test" not in out
        assert "proc environ has key: False" in out
        assert "TASK_NAME" in out
        assert "workspace []" in out and "found ''" in out
        assert "secret.txt" not in out
        kernel_files = out.split("kernel dir ")[1].splitlines()[0]
        assert kernel_files.count("'k-") == 5 and "kernel.json" in kernel_files
        assert int(out.split("pids ")[1].split()[0]) < 20  # its own processes only
    finally:
        await other.close()


async def test_container_carries_every_hardening_default_and_labels(backend, shared_sandbox):
    engine = docker.from_env()
    try:
        (container,) = engine.containers.list(filters={"label": f"{SANDBOX_LABEL}={shared_sandbox.id}"})
        host = container.attrs["HostConfig"]
        spec = shared_sandbox.spec
        assert host["NetworkMode"] == "none"
        # The supervisor's (container root) only; the kernel it starts has none (see above).
        assert host["CapDrop"] == ["ALL"] and sorted(host["CapAdd"]) == sorted(SUPERVISOR_CAPS)
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["ReadonlyRootfs"] is True and host["Privileged"] is False
        assert host["Init"] is True
        host_pids, guest_nproc = task_limits(spec.runtime, spec.pids_limit)
        assert host["PidsLimit"] == host_pids
        nproc = [{"Name": "nproc", "Soft": guest_nproc, "Hard": guest_nproc}] if guest_nproc else []
        assert host["Ulimits"] == [{"Name": "nofile", "Soft": spec.nofile, "Hard": spec.nofile}, *nproc]
        assert host["Memory"] == host["MemorySwap"] == spec.memory_bytes
        assert host["NanoCpus"] == int(spec.cpus * 1e9)
        assert f"size={spec.workspace_bytes}" in host["Tmpfs"]["/workspace"]
        assert f"size={spec.tmpfs_bytes}" in host["Tmpfs"]["/tmp"]
        uid = (await backend.engine_ids()).sandbox_uid
        assert container.attrs["Config"]["User"] == "0:0"
        assert container.attrs["Config"]["Cmd"][-2:] == ["--user", f"{uid}:{uid}"]
        assert f"uid={uid},gid={uid}" in host["Tmpfs"]["/workspace"]
        labels = container.labels
        assert labels[MANAGED_LABEL] == "true" and labels[TENANT_LABEL] == "tests"
        assert labels[OWNER_LABEL] == current_owner().label
    finally:
        engine.close()


@pytest.mark.parametrize("gpus, expected", [(["0", "1"], {"DeviceIDs": ["0", "1"]}), (2, {"Count": 2})])
async def test_gpu_device_requests_are_set_per_device(backend, small_spec, gpus, expected):
    container_id = await backend.create_container(small_spec(gpus=gpus))
    engine = docker.from_env()
    try:
        attrs = engine.api.inspect_container(container_id)
        (request,) = attrs["HostConfig"]["DeviceRequests"]
        assert request["Capabilities"] == [["gpu"]]
        for key, value in expected.items():
            assert request[key] == value
    finally:
        sandbox_id = attrs["Config"]["Labels"][SANDBOX_LABEL]
        engine.api.remove_container(container_id, force=True)
        shutil.rmtree(backend.runtime_root / sandbox_id, ignore_errors=True)
        engine.close()


def assert_removed(backend, sandbox_id: str) -> None:
    """Neither the sandbox's container nor its kernel folder is left."""
    engine = docker.from_env()
    try:
        assert engine.containers.list(all=True, sparse=True, filters={"label": f"{SANDBOX_LABEL}={sandbox_id}"}) == []
    finally:
        engine.close()
    assert not os.path.exists(backend.runtime_root / sandbox_id)


async def test_close_removes_container_and_kernel_folder(backend, small_spec):
    sb = await backend.create(small_spec())
    assert (backend.runtime_root / sb.id).is_dir()
    await sb.close()
    assert_removed(backend, sb.id)
    await sb.close()  # idempotent


async def test_close_waits_out_an_engine_that_answers_the_removal_late(backend, small_spec, monkeypatch):
    """A busy engine (gVisor teardown under load) answers after the client's timeout: the close must
    not fail on it, and the container must still be gone when it returns."""
    sb = await backend.create(small_spec())
    api = backend.client.api
    real_remove = api.remove_container
    late: list[threading.Thread] = []

    def engine_side(container, **kwargs):
        with contextlib.suppress(docker.errors.APIError):  # 409/404: the close's own retry got there first
            real_remove(container, **kwargs)

    def remove_answered_late(container, **kwargs):
        if not late:  # the engine gets the first request and carries it out; its answer never arrives
            late.append(threading.Thread(target=engine_side, args=(container,), kwargs=kwargs))
            late[0].start()
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=60)")
        return real_remove(container, **kwargs)

    monkeypatch.setattr(api, "remove_container", remove_answered_late)
    await sb.close()
    late[0].join(timeout=60)
    assert_removed(backend, sb.id)

