"""The hostile-probe suite: each attack a review made from inside a sandbox, made again.

Every test first does what the attacker did (real Docker, real kernels, real files), then checks
that the defence held. Sizes are small but decisive: a 64 MiB quota against a 200 MiB attempt, a
512 MiB sandbox flooding hundreds of MiB at the host. The runtime comes from the `sandbox_runtime`
fixture (CELLFORGE_TEST_RUNTIME=runsc runs the suite under gVisor), so nothing here reads host
processes of a container directly; what is seen from inside goes through the kernel or `docker exec`.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import docker
import psutil
import pytest
import zmq
import zmq.asyncio

from sandbox import DockerBackend, FileTransferError, Outcome, SandboxError, SandboxStartError
from sandbox.docker_backend import TENANT_LABEL
from sandbox.host_ids import host_owner_of

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

SOCKETS = {f"k-{n}" for n in range(1, 6)}
MiB = 1 << 20


async def run_ok(sb, code: str, timeout: float = 30) -> str:
    res = await sb.execute(code, timeout=timeout)
    assert res.outcome is Outcome.OK, (res.outcome, res.ename, res.evalue, res.traceback, res.stderr)
    return res.stdout


def assert_socket_folder_sealed(backend: DockerBackend, sb) -> None:
    """The bind-mounted folder holds the connection file and the five sockets, nothing else; it is
    the supervisor's and nobody else may write it."""
    folder = backend.runtime_root / sb.id
    ids = backend._ids
    assert {p.name for p in folder.iterdir()} == {"kernel.json", *SOCKETS}
    st = folder.stat()
    assert st.st_uid == ids.root_on_host[0] and stat.S_IMODE(st.st_mode) == 0o755
    for name in SOCKETS:
        sock = (folder / name).lstat()
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(backend.runtime_root.stat().st_mode) == 0o700


# --- 5. the supervisor out of reach; the socket folder never writable -------------------------

FOLDER_ATTACK = """
import os, signal, subprocess, sys
supervisor = os.getppid()
uids = {pid: open(f"/proc/{pid}/status").read().split("Uid:")[1].split()[0] for pid in (1, supervisor, os.getpid())}
print("uids", uids[1], uids[supervisor], uids[os.getpid()])
for pid in (supervisor, 1):
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            print("SIGNALLED", pid, sig)
        except PermissionError:
            print("denied")
for attempt in (lambda: os.chmod("/run/kernel", 0o777), lambda: open("/run/kernel/fill", "wb").write(b"x" * (1 << 20))):
    try:
        attempt()
        print("WROTE")
    except PermissionError:
        print("denied")
# A writer that outlives this kernel, retrying through the restart.
writer = "import os, time\\nfor i in range(400):\\n    try:\\n        open(f'/run/kernel/fill-{i}', 'wb').write(b'x' * (1 << 20))\\n    except OSError:\\n        pass\\n    time.sleep(0.005)"
subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
"""


async def test_sandboxed_code_cannot_stop_its_supervisor_nor_write_the_socket_folder(backend, small_spec):
    sb = await backend.create(small_spec())
    try:
        out = await run_ok(sb, FOLDER_ATTACK)
        sandbox_uid = (await backend.engine_ids()).sandbox_uid
        assert out.splitlines()[0] == f"uids 0 0 {sandbox_uid}"
        assert "SIGNALLED" not in out and "WROTE" not in out and out.count("denied") == 6
        await sb.restart()  # the supervisor was neither stopped nor killed
        assert (await sb.execute("1 + 1")).result == "2"
        assert_socket_folder_sealed(backend, sb)
    finally:
        await sb.close()


async def test_a_restart_that_fails_marks_the_sandbox_dead_and_the_folder_stays_sealed(backend, small_spec):
    sb = await backend.create(small_spec())
    # Short for the restart only: a first start can take longer than that on a loaded machine.
    sb.spec = sb.spec.model_copy(update={"start_timeout": 3.0})
    try:
        # A stopped supervisor (done here with root's `docker exec`, as sandboxed code no longer can):
        # the restart cannot happen.
        supervisor = int(await run_ok(sb, "import os; print(os.getppid())"))
        engine = docker.from_env()
        try:
            container = engine.containers.get(f"cellforge-{sb.id}")
            assert container.exec_run(["sh", "-c", f"kill -STOP {supervisor}"], user="0").exit_code == 0
            with pytest.raises(SandboxStartError, match="did not come back after a restart"):
                await sb.restart()
            assert sb.dead and "did not come back" in sb.dead
            assert_socket_folder_sealed(backend, sb)
            # Killed instead: the container stops, the folder is still sealed. (Reviving a dead
            # sandbox: test_a_kernel_that_dies_at_boot_fails_the_restart_at_once_with_its_cause.)
            # Detached: under gVisor an exec whose container goes away with it never closes its stream.
            container.exec_run(["sh", "-c", f"kill -KILL {supervisor}"], user="0", detach=True)
            container.wait(timeout=10)
            assert_socket_folder_sealed(backend, sb)
        finally:
            engine.close()
    finally:
        await sb.close()


@pytest.mark.slow
async def test_a_kernel_that_dies_at_boot_fails_the_restart_at_once_with_its_cause(backend, small_spec):
    sb = await backend.create(small_spec(start_timeout=30.0))
    try:
        await run_ok(
            sb,
            "import os; d = '/tmp/.ipython/profile_default/startup'; os.makedirs(d, exist_ok=True)\n"
            "open(d + '/00-die.py', 'w').write('import os; os._exit(7)')",
        )
        started = time.perf_counter()
        with pytest.raises(SandboxStartError, match=r"it stopped \(exit code 7\)"):
            await sb.restart()
        assert time.perf_counter() - started < 10  # not the 30 s start timeout
        assert "exit code 7" in sb.dead
        await sb.restart()  # fresh container: /tmp (and the planted file) are gone
        assert (await sb.execute("1 + 1")).result == "2"
    finally:
        await sb.close()


# --- 14. the sandbox uid is nobody on the host; keys and sockets are the host's only ----------

PEEK = """
import json, os, socket, sys
folder = sys.argv[1]
found = {}
for what, attempt in [
    ("list", lambda: os.listdir(folder)),
    ("read", lambda: open(folder + "/kernel.json").read()),
    ("connect", lambda: socket.socket(socket.AF_UNIX).connect(folder + "/k-1")),
]:
    try:
        attempt()
        found[what] = "ALLOWED"
    except OSError as exc:
        found[what] = exc.errno
print(json.dumps(found))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="probing as other host users needs root")
async def test_other_host_accounts_cannot_read_keys_or_reach_kernels(backend, shared_sandbox):
    ids = await backend.engine_ids()
    if not ids.remapped:
        assert host_owner_of(ids.sandbox_uid) is None
        with pytest.raises(KeyError):
            pwd.getpwuid(ids.sandbox_uid)
    folder = str(backend.runtime_root / shared_sandbox.id)
    # A real account of this host (uid 1000 when there is one) and the sandbox's own uid.
    accounts = [p.pw_uid for p in pwd.getpwall() if 0 < p.pw_uid < 65534][:1] + [ids.sandbox_uid]
    python = next(p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK))
    for uid in accounts:
        probe = subprocess.run(
            [python, "-c", PEEK, folder], user=uid, group=uid, extra_groups=[], capture_output=True, text=True
        )
        assert json.loads(probe.stdout) == {"list": errno.EACCES, "read": errno.EACCES, "connect": errno.EACCES}, uid


async def test_a_sandbox_uid_that_is_a_host_account_is_refused(backend):
    if (await backend.engine_ids()).remapped:
        pytest.skip("the engine remaps users: any uid inside is nobody on the host")
    account = next(p for p in pwd.getpwall() if p.pw_uid > 0)
    refusing = DockerBackend(sandbox_uid=account.pw_uid)
    try:
        with pytest.raises(SandboxError, match=f"is the account {account.pw_name!r}"):
            await refusing.engine_ids()
    finally:
        await refusing.close()


# --- 6. an iopub flood cannot grow the host process -------------------------------------------

# Signed messages sharing one packed content (so the sandbox itself spends little memory on them).
FLOOD = """
kernel = get_ipython().kernel
content = kernel.session.pack({{"name": "stdout", "text": "x" * {size}}})
parent = kernel.get_parent()
for _ in range({count}):
    frames = kernel.session.serialize(kernel.session.msg("stream", {{}}, parent=parent))
    frames[-1] = content
    frames[1] = kernel.session.sign(frames[2:6])
    kernel.iopub_socket.send_multipart(frames, copy=False)
print("sent")
"""


class PeakRss:
    """The host process's resident set size, sampled every few milliseconds in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / MiB


@pytest.mark.parametrize("size_mib", [16, 4], ids=["16MiB-messages", "4MiB-messages"])
async def test_an_iopub_flood_keeps_host_memory_bounded(backend, small_spec, size_mib):
    # 64 signed messages from a 512 MiB sandbox: 1 GiB of 16 MiB ones (over the frame limit: each
    # drops the connection), or 256 MiB of 4 MiB ones (under it: received, never decoded). Before
    # the limits the host grew by ~430 MiB during the first.
    count = 64
    sb = await backend.create(small_spec(memory="512m"))
    try:
        await sb.execute("1")
        with PeakRss() as rss:
            res = await sb.execute(FLOOD.format(count=count, size=size_mib * MiB), timeout=60)
        assert res.outcome is Outcome.OK, (res.outcome, res.ename, res.evalue, res.died_cause)
        assert res.truncated and len(res.stdout) < sb.spec.output_limit + 1024
        assert rss.growth_mib < 64, f"host RSS grew by {rss.growth_mib:.0f} MiB during a {size_mib * count} MiB flood"
        assert (await sb.execute("6 * 7")).result == "42"
    finally:
        await sb.close()


# Raw ZMTP on the kernel's iopub connection: one message of 64 frames of 4 MiB (each under the
# frame limit), never finished. libzmq alone would buffer all of it (256 MiB, measured).
RAW_MULTIPART = """
import os, socket, stat
frame = bytes([0x03]) + (4 << 20).to_bytes(8, "big") + b"x" * (4 << 20)  # MORE | LONG
sent = 0
for name in os.listdir("/proc/self/fd"):
    fd = int(name)
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            continue
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        continue
    try:
        listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if s.family == socket.AF_UNIX and not listening and str(s.getsockname()).endswith("k-2"):
            s.setblocking(True)
            for _ in range(64):
                s.sendall(frame)
                sent += 1
    except OSError:
        pass
    finally:
        s.close()
print("frames", sent)
"""


async def test_a_raw_multipart_flood_keeps_host_memory_bounded(backend, small_spec):
    sb = await backend.create(small_spec(memory="512m"))
    try:
        await sb.execute("1")
        with PeakRss() as rss:
            res = await sb.execute(RAW_MULTIPART, timeout=60)
        assert res.outcome is Outcome.OK, (res.outcome, res.ename, res.evalue, res.died_cause)
        frames = int(res.stdout.split("frames ")[1].split()[0]) if "frames " in res.stdout else 0
        assert frames < 64  # the relay cut the connection long before the end
        assert rss.growth_mib < 64, f"host RSS grew by {rss.growth_mib:.0f} MiB during a raw multipart flood"
        assert (await sb.execute("6 * 7")).result == "42"
    finally:
        await sb.close()


# --- 7. file transfers count bytes on the host -------------------------------------------------

LIAR = """
import comm
manager = comm.get_comm_manager()

def liar(msg):
    data, channel = msg["content"]["data"], manager.comms[msg["content"]["comm_id"]]
    if data["op"] == "list":
        channel.send({"ok": True, "files": [f"f{i}.bin" for i in range(50)], "skipped": []})
    elif data["path"] == "small.txt":  # claims 1 byte, sends 4 MiB whatever was asked
        channel.send({"ok": True, "size": 1}, buffers=[b"x" * (4 << 20)])
    elif data["path"] == "endless.bin":  # exactly what was asked, for ever, no size
        channel.send({"ok": True}, buffers=[b"x" * data["size"]])
    else:  # 50 honest-looking files of 4 MiB: 200 MiB through a 64 MiB quota
        left = max(0, (4 << 20) - data["offset"])
        channel.send({"ok": True, "size": 4 << 20}, buffers=[b"x" * min(left, data["size"])])

for channel in list(manager.comms.values()):
    channel.on_msg(liar)
"""


async def test_file_transfers_never_trust_sizes_from_the_sandbox(backend, small_spec, tmp_path):
    sb = await backend.create(small_spec(workspace_quota="64m"))
    quota = sb.spec.workspace_bytes
    try:
        # Honest kernel, sparse file: 200 MiB apparent size in a 64 MiB quota costs no space.
        await run_ok(sb, "with open('sparse.bin', 'wb') as f:\n    f.truncate(200 << 20)")
        with pytest.raises(FileTransferError, match=f"more than the {quota} allowed"):
            await sb.files.get("sparse.bin")
        # Lying kernel (it replaced the file channel's handler).
        await run_ok(sb, LIAR)
        with pytest.raises(FileTransferError, match="sent more than it was asked for"):
            await sb.files.get("small.txt", max_bytes=MiB)
        started = time.perf_counter()
        with pytest.raises(FileTransferError, match=f"more than the {quota} allowed"):
            await sb.files.get("endless.bin")
        assert time.perf_counter() - started < 20
        target = tmp_path / "out"
        with pytest.raises(FileTransferError, match=f"at most {quota} bytes in all"):
            await sb.files.get_dir("out", target)
        # Nothing of the refused copy stays on the host.
        assert sum(p.stat().st_size for p in target.rglob("*") if p.is_file()) == 0
    finally:
        await sb.close()


# --- 13. open files are capped per process -----------------------------------------------------

async def test_open_files_are_capped_in_every_sandbox_process(backend, small_spec):
    sb = await backend.create(small_spec(nofile=256))
    try:
        out = await run_ok(
            sb,
            """
import errno, resource, subprocess, sys
print("limit", *resource.getrlimit(resource.RLIMIT_NOFILE))
child = "import errno\\nfiles = []\\ntry:\\n    while len(files) < 20000:\\n        files.append(open('/dev/null'))\\nexcept OSError as exc:\\n    print(len(files), errno.errorcode[exc.errno])"
print("child", subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout.strip())
""",
        )
        assert "limit 256 256" in out
        opened, error = out.split("child ")[1].split()
        assert error == "EMFILE" and int(opened) < 256
        # The kernel cannot raise its own hard limit either.
        res = await sb.execute("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))")
        assert res.outcome is Outcome.ERROR and res.ename == "ValueError"
    finally:
        await sb.close()


# --- 12. a failure while connecting leaves no container ----------------------------------------

def containers_of(tenant: str) -> list:
    engine = docker.from_env()
    try:
        return engine.containers.list(all=True, sparse=True, filters={"label": f"{TENANT_LABEL}={tenant}"})
    finally:
        engine.close()


@pytest.fixture
def private_backend():
    """A backend with a runtime root of its own, so leftover socket folders can be counted."""
    root = tempfile.mkdtemp(prefix="cf-t-")
    backend = DockerBackend(runtime_root=root)
    yield backend
    shutil.rmtree(root, ignore_errors=True)


async def test_a_connect_failure_leaves_no_container(private_backend, small_spec, monkeypatch):
    tenant = f"leak-{secrets.token_hex(4)}"

    def no_more_files(self, addr):
        raise zmq.ZMQError(errno.EMFILE, "Too many open files")

    with monkeypatch.context() as patch:
        patch.setattr(zmq.asyncio.Socket, "connect", no_more_files)
        with pytest.raises(SandboxStartError, match="connecting to it failed"):
            await private_backend.create(small_spec(labels={"tenant": tenant}))
    assert containers_of(tenant) == []
    assert os.listdir(private_backend.runtime_root) == []  # its socket folder is gone too


@pytest.mark.parametrize("after_s", [0.05, 0.4, 1.2])
async def test_a_create_cancelled_midway_leaves_no_container(private_backend, small_spec, after_s):
    tenant = f"leak-{secrets.token_hex(4)}"
    try:
        sb = await asyncio.wait_for(private_backend.create(small_spec(labels={"tenant": tenant})), after_s)
    except TimeoutError:
        pass
    else:
        await sb.close()  # started faster than the cancellation: nothing to show here
    assert containers_of(tenant) == []
    assert os.listdir(private_backend.runtime_root) == []
