"""Docker backend: one hardened container per sandbox, its kernel reached over ZMQ ipc sockets.

The host writes a connection file into a per-sandbox folder (`/tmp/cf/<id>`, short because unix
socket paths are capped at 107 bytes) that is bind-mounted at /run/kernel; the kernel binds its
sockets there and the host connects to the same files. No network is needed, so the container has
none.

Why not a `jupyter_client` KernelProvisioner + KernelManager: their restart is "kill the kernel's
process and launch a new one", which for a container means a new container — and the tmpfs
workspace (uploaded code, outputs) would go with it; their start/shutdown paths also wait in fixed
polling sleeps, which a fast cold start cannot afford. Instead the container's main process is
`supervisor.py` (under tini, `init=True`), which replaces the kernel in place on SIGUSR1 and exits
with the kernel's status when it dies on its own, so the engine reports the cause. Interrupts go
over the control channel (ipykernel SIGINTs its own process group), so the semantics match.

Two identities in each container. The supervisor runs as the container's root with only SETUID,
SETGID, KILL and SETPCAP; it owns the socket folder, creates the sockets itself and starts each kernel
as the sandbox uid with no capability at all (see supervisor.py). So the folder — which reaches the
host's disk through the bind mount — is read-only to sandboxed code in every state (restarts, a
restart that fails, a supervisor that died), with no chmod to forget, and sandboxed code cannot
signal, trace or stop its supervisor. The sandbox uid is no one on the host (see host_ids.py);
`userns-remap` makes both identities unprivileged host uids. Host side, the runtime root is 0700:
no other host account can read a connection key or reach a socket (sockets are 0600 besides).

Every Docker call that creates something runs to its end before a failure or a cancellation is
handled, and the container is named after the sandbox, so a half-made sandbox is always removed.
Every Docker SDK call runs in the backend's own thread pool (the default one has only cpus + 4
threads) with an HTTP timeout, so many sandboxes share one event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from .backend import BackendHealth, BackendKind, KernelHost, ReapReport, SandboxBackend, describe_exit
from .errors import SandboxError, SandboxStartError, UsageError
from .host_ids import choose_sandbox_uid, container_root_on_host, engine_remaps_users
from .messaging import connection_info
from .reaper import owner_labels, reap_orphans
from .runtimes import task_limits, unregistered
from .spec import SandboxSpec

log = logging.getLogger(__name__)

SUPERVISOR_SOURCE = Path(__file__).with_name("supervisor.py").read_text()
RUNTIME_ROOT = Path("/tmp/cf")
KERNEL_DIR = "/run/kernel"
WORKSPACE = "/workspace"
# What the supervisor keeps: start the kernel as the sandbox uid, kill what it leaves, empty the
# bounding set before that. The kernel gets none of them.
SUPERVISOR_CAPS = ("SETUID", "SETGID", "KILL", "SETPCAP")
SANDBOX_UID_ENV = "CELLFORGE_SANDBOX_UID"
TENANT_LABEL = "cellforge.tenant"
SANDBOX_LABEL = "cellforge.sandbox"
_MAX_ROOT_LEN = 70
_API_TIMEOUT_S = 60.0
_REMOVAL_WAIT_S = 180.0  # after a removal request timed out
_API_THREADS = 32


@dataclass(frozen=True)
class EngineIds:
    """Who is who in this engine's sandboxes."""

    sandbox_uid: int  # uid and gid of sandboxed code, inside the container
    root_on_host: tuple[int, int]  # host uid and gid of the container's root (the supervisor)
    remapped: bool  # the engine runs containers in a user namespace


class DockerBackend(SandboxBackend):
    """Creates sandboxes as hardened containers on a local Docker engine.

    `sandbox_uid` (default: $CELLFORGE_SANDBOX_UID, else chosen) is refused when it is an account,
    group or subordinate id on this host and the engine does not remap users.
    """

    kind = BackendKind.DOCKER
    isolated = True

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        runtime_root: str | Path = RUNTIME_ROOT,
        api_timeout: float = _API_TIMEOUT_S,
        sandbox_uid: int | None = None,
    ) -> None:
        self.runtime_root = Path(runtime_root)
        if len(str(self.runtime_root)) > _MAX_ROOT_LEN:
            raise UsageError(f"runtime_root {runtime_root} is too long for unix sockets (max {_MAX_ROOT_LEN} chars)")
        try:
            self.client = client or docker.from_env(timeout=int(api_timeout), max_pool_size=64)
        except docker.errors.DockerException as exc:
            raise SandboxError(f"Docker engine not reachable: {exc}") from None
        self.api_timeout = api_timeout
        configured = os.environ.get(SANDBOX_UID_ENV)
        if sandbox_uid is None and configured:
            try:
                sandbox_uid = int(configured)
            except ValueError:
                raise SandboxError(f"{SANDBOX_UID_ENV}: expected a number, got {configured!r}") from None
        self._requested_uid = sandbox_uid
        self._ids: EngineIds | None = None
        self._threads = ThreadPoolExecutor(max_workers=_API_THREADS, thread_name_prefix="cellforge-docker")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking Docker SDK call in the backend's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, partial(fn, *args, **kwargs))

    async def engine_ids(self) -> EngineIds:
        """The sandbox uid and the containers' root on the host, asked of the engine once."""
        if self._ids is None:
            try:
                info = await self.call(self.client.info)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise SandboxError(f"Docker engine not reachable: {exc}") from None
            remapped = engine_remaps_users(info)
            root = container_root_on_host(info)
            if os.geteuid() not in (0, root[0]):
                raise SandboxError(
                    f"this process (uid {os.geteuid()}) cannot give sandbox socket folders to the containers' root "
                    f"(host uid {root[0]}): run it as root, or use rootless Docker as this user (see SECURITY.md)"
                )
            self._ids = EngineIds(choose_sandbox_uid(self._requested_uid, remapped), root, remapped)
        return self._ids

    async def provision(self, spec: SandboxSpec) -> DockerKernelHost:
        """A started container (its supervisor starting the kernel); removed again on any failure."""
        ids = await self.engine_ids()
        sandbox_id = secrets.token_hex(6)
        key = secrets.token_hex(32)
        host = DockerKernelHost(self, sandbox_id, self.runtime_root / sandbox_id, key)
        try:
            self._make_kernel_dir(host.host_dir, key, ids)
            host.container_id = await host.settled(self._create_container, spec, sandbox_id, host.host_dir)
            await host.settled(self.client.api.start, host.container_id)
            return host
        except BaseException as exc:
            # Shielded: a second cancellation must not leave the container half-removed.
            await asyncio.shield(host.destroy())
            if isinstance(exc, docker.errors.ImageNotFound):
                raise SandboxStartError(
                    f"sandbox image {spec.image!r} not found; build it with `cellforge images build`"
                ) from None
            if isinstance(exc, docker.errors.APIError) and spec.runtime and "unknown runtime" in str(exc).lower():
                raise unregistered(spec.runtime) from None
            if isinstance(exc, docker.errors.APIError):
                raise SandboxStartError(f"Docker refused sandbox {sandbox_id}: {exc.explanation or exc}") from None
            raise

    async def health(self) -> BackendHealth:
        try:
            info = await self.call(self.client.info)
            await self.engine_ids()
        except (SandboxError, docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            return BackendHealth(ok=False, detail=f"Docker engine not usable: {exc}")
        runtimes = ", ".join(sorted(info.get("Runtimes") or {})) or "none listed"
        return BackendHealth(ok=True, detail=f"Docker engine {info.get('ServerVersion', '?')} (runtimes: {runtimes})")

    async def reap(self) -> ReapReport:
        """Remove the containers (and socket folders) of this host's processes that are gone."""
        return await self.call(reap_orphans, self.client)

    async def create_container(self, spec: SandboxSpec) -> str:
        """Create (do not start) a sandbox container and return its id; the caller removes it."""
        ids = await self.engine_ids()
        sandbox_id = secrets.token_hex(6)
        host_dir = self.runtime_root / sandbox_id
        self._make_kernel_dir(host_dir, secrets.token_hex(32), ids)
        return await self.call(self._create_container, spec, sandbox_id, host_dir)

    async def close(self) -> None:
        # The threads stay: sandboxes of this backend may still be closed after it.
        await self.call(self.client.close)

    def _make_kernel_dir(self, host_dir: Path, key: str, ids: EngineIds) -> None:
        """The socket folder: the supervisor's (the container's root), readable by the kernel, and
        under a runtime root that no other host account can enter."""
        root = self.runtime_root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise SandboxError(f"runtime root {root} is not a folder owned by this user (uid {os.geteuid()})")
        if stat.S_IMODE(st.st_mode) != 0o700:
            root.chmod(0o700)
        host_dir.mkdir(mode=0o700)
        connection_file = host_dir / "kernel.json"
        fd = os.open(connection_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(connection_info(f"{KERNEL_DIR}/k", key)))
        if os.geteuid() != ids.root_on_host[0]:
            os.chown(connection_file, *ids.root_on_host)
            os.chown(host_dir, *ids.root_on_host)
        connection_file.chmod(0o644)
        host_dir.chmod(0o755)

    def container_options(self, spec: SandboxSpec, sandbox_id: str, host_dir: Path) -> dict[str, Any]:
        """Arguments of `APIClient.create_container` for this spec: every hardening default."""
        if self._ids is None:
            raise SandboxError("container_options: call `await backend.engine_ids()` first")
        uid = self._ids.sandbox_uid
        mounts = [DockerMount(target=KERNEL_DIR, source=str(host_dir), type="bind", read_only=False)]
        mounts += [DockerMount(target=m.target, source=m.source, type="bind", read_only=True) for m in spec.mounts]
        device_requests = []
        if isinstance(spec.gpus, list):
            device_requests = [DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])]
        elif spec.gpus:
            device_requests = [DeviceRequest(count=spec.gpus, capabilities=[["gpu"]])]
        host_pids, guest_nproc = task_limits(spec.runtime, spec.pids_limit)
        host_config = self.client.api.create_host_config(
            network_mode="none",
            cap_drop=["ALL"],
            cap_add=list(SUPERVISOR_CAPS),
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={
                "/tmp": f"rw,nosuid,nodev,size={spec.tmpfs_bytes},mode=1777",
                WORKSPACE: f"rw,nosuid,nodev,size={spec.workspace_bytes},uid={uid},gid={uid},mode=0755",
            },
            mounts=mounts,
            pids_limit=host_pids,
            ulimits=[Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile)]
            + ([Ulimit(name="nproc", soft=guest_nproc, hard=guest_nproc)] if guest_nproc else []),
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=int(spec.cpus * 1e9),
            init=True,
            device_requests=device_requests or None,
            runtime=spec.runtime,
            log_config=LogConfig(type="json-file", config={"max-size": "1m", "max-file": "1"}),
        )
        labels = {f"cellforge.{k}": v for k, v in spec.labels.items()}
        labels.update(owner_labels())
        labels[TENANT_LABEL] = spec.tenant
        labels[SANDBOX_LABEL] = sandbox_id
        environment = {
            **spec.env,
            "HOME": "/tmp",
            "IPYTHONDIR": "/tmp/.ipython",
            "MPLCONFIGDIR": "/tmp/.matplotlib",
            "PYTHONDONTWRITEBYTECODE": "1",
            # The sandbox uid has no passwd entry in the image; getpass.getuser() reads these first.
            "USER": "sandbox",
            "LOGNAME": "sandbox",
        }
        return dict(
            image=spec.image,
            command=[
                "python", "-c", SUPERVISOR_SOURCE, f"{KERNEL_DIR}/kernel.json", "--contained", "--user", f"{uid}:{uid}",
            ],
            user="0:0",
            working_dir=WORKSPACE,
            environment=environment,
            labels=labels,
            hostname="sandbox",
            name=container_name(sandbox_id),
            host_config=host_config,
        )

    def _create_container(self, spec: SandboxSpec, sandbox_id: str, host_dir: Path) -> str:
        # The low-level API: the high-level `containers.run` adds an inspect round trip per start.
        return self.client.api.create_container(**self.container_options(spec, sandbox_id, host_dir))["Id"]


def container_name(sandbox_id: str) -> str:
    return f"cellforge-{sandbox_id}"


class DockerKernelHost(KernelHost):
    """The container of one sandbox, seen from the `Sandbox`. Known by name before it exists."""

    def __init__(self, backend: DockerBackend, sandbox_id: str, host_dir: Path, key: str) -> None:
        super().__init__(sandbox_id, connection_info(str(host_dir / "k"), key), workspace=WORKSPACE)
        self.backend = backend
        self.name = container_name(sandbox_id)
        self.host_dir = host_dir
        self.container_id: str | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._destroying: asyncio.Future[None] | None = None

    @property
    def _api(self) -> docker.APIClient:
        return self.backend.client.api

    async def settled(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A Docker call that creates or starts something: destroy() waits for it to end, and a
        cancellation does not abandon it midway (what it made would be unknown)."""
        task = asyncio.ensure_future(self.backend.call(fn, *args))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    async def restart_kernel(self) -> None:
        await self.backend.call(self._api.kill, self.container_id, "SIGUSR1")

    def _remove_sockets(self) -> None:
        # A fresh container run's supervisor binds the same socket paths. Under gVisor (runsc) a socket
        # file on the bind mount cannot be unlinked from inside (EPERM), so the host removes the old ones.
        for leftover in self.host_dir.glob("k-*"):
            leftover.unlink(missing_ok=True)

    def _state(self, wait_s: float) -> dict[str, Any]:
        if wait_s > 0:
            try:
                self._api.wait(self.container_id, timeout=wait_s)
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                pass
        return self._api.inspect_container(self.container_id)["State"]

    async def exit_cause(self, timeout: float) -> str | None:
        if self.container_id is None:
            return "container never created"
        try:
            state = await self.backend.call(self._state, timeout)
        except docker.errors.NotFound:
            return "container removed"
        if state.get("Running"):
            return None
        return describe_exit(int(state.get("ExitCode", 0)), bool(state.get("OOMKilled")))

    async def revive(self) -> None:
        # Stopped, or running with a kernel that no longer answers (its supervisor wedged): either
        # way a fresh container run, whose supervisor binds the sockets anew.
        self._remove_sockets()
        await self.backend.call(self._api.restart, self.container_id, timeout=0)

    async def destroy(self) -> None:
        # One removal however many callers: a caller cancelled while waiting does not stop it.
        if self._destroying is None:
            self._destroying = asyncio.ensure_future(self._remove())
        await asyncio.shield(self._destroying)

    async def _remove(self) -> None:
        if self._pending:
            await asyncio.wait(self._pending)
        target = self.container_id or self.name
        try:
            await self.backend.call(self._api.remove_container, target, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            log.error("could not remove container %s of sandbox %s: %s", self.name, self.sandbox_id, exc)
        except requests.exceptions.RequestException as exc:
            # A busy engine (a gVisor container's teardown under load) can answer after the client's
            # timeout; the removal goes on in the engine, so wait for it rather than fail the close.
            if not await self.backend.call(self._gone, target, _REMOVAL_WAIT_S):
                log.error("container %s of sandbox %s still there %.0f s after removal was asked (%s); "
                          "the reaper removes it once this process ends", self.name, self.sandbox_id,
                          _REMOVAL_WAIT_S, exc)
        await self.backend.call(shutil.rmtree, self.host_dir, True)

    def _gone(self, target: str, wait_s: float) -> bool:
        """Whether the container is gone within `wait_s`, asking for its removal again while it stays."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                self._api.remove_container(target, force=True, v=True)
                return True
            except docker.errors.NotFound:
                return True
            except (docker.errors.APIError, requests.exceptions.RequestException):
                time.sleep(1.0)  # 409: its removal is already in progress
        return False

    async def logs(self) -> str:
        if self.container_id is None:
            return ""
        try:
            raw = await self.backend.call(self._api.logs, self.container_id, tail=60)
        except docker.errors.APIError:
            return ""
        return raw.decode("utf-8", "replace")
