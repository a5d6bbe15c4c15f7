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

While a kernel runs, its socket folder is made read-only to it (owner root, group write removed),
so sandboxed code cannot fill the host's disk through the bind mount; it is opened only while a
kernel (re)binds its sockets. This needs the host process to be root; otherwise the container runs
as the host user's uid (still unprivileged, no capabilities) and the folder stays writable.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from .errors import SandboxError, SandboxStartError
from .kernel import Sandbox, connection_info, describe_exit
from .reaper import owner_labels
from .runtimes import task_limits, unregistered
from .spec import SandboxSpec

log = logging.getLogger(__name__)

SUPERVISOR_SOURCE = Path(__file__).with_name("supervisor.py").read_text()
RUNTIME_ROOT = Path("/tmp/cf")
KERNEL_DIR = "/run/kernel"
WORKSPACE = "/workspace"
SANDBOX_UID = 1000
TENANT_LABEL = "cellforge.tenant"
SANDBOX_LABEL = "cellforge.sandbox"
_MAX_ROOT_LEN = 70
_API_TIMEOUT_S = 60.0
_API_THREADS = 32


class DockerBackend:
    """Creates sandboxes as hardened containers on a local Docker engine."""

    isolated = True

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        runtime_root: str | Path = RUNTIME_ROOT,
        api_timeout: float = _API_TIMEOUT_S,
    ) -> None:
        self.runtime_root = Path(runtime_root)
        if len(str(self.runtime_root)) > _MAX_ROOT_LEN:
            raise ValueError(f"runtime_root {runtime_root} is too long for unix sockets (max {_MAX_ROOT_LEN} chars)")
        try:
            self.client = client or docker.from_env(timeout=int(api_timeout), max_pool_size=64)
        except docker.errors.DockerException as exc:
            raise SandboxError(f"Docker engine not reachable: {exc}") from None
        self.api_timeout = api_timeout
        self._root_host = os.geteuid() == 0
        self._threads = ThreadPoolExecutor(max_workers=_API_THREADS, thread_name_prefix="cellforge-docker")

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking Docker SDK call in the backend's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, partial(fn, *args, **kwargs))

    @property
    def container_user(self) -> tuple[int, int]:
        return (SANDBOX_UID, SANDBOX_UID) if self._root_host else (os.getuid(), os.getgid())

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """A started container whose kernel answers; SandboxStartError (container removed) otherwise."""
        sandbox_id = secrets.token_hex(6)
        host_dir = self.runtime_root / sandbox_id
        key = secrets.token_hex(32)
        self._make_kernel_dir(host_dir, key)
        host = DockerKernelHost(self, sandbox_id, host_dir)
        try:
            host.container_id = await self.call(self._create_container, spec, sandbox_id, host_dir)
            await self.call(self.client.api.start, host.container_id)
        except BaseException as exc:
            await host.destroy()
            if isinstance(exc, docker.errors.ImageNotFound):
                raise SandboxStartError(
                    f"sandbox image {spec.image!r} not found; build it with `cellforge images build`"
                ) from None
            if isinstance(exc, docker.errors.APIError) and spec.runtime and "unknown runtime" in str(exc).lower():
                raise unregistered(spec.runtime) from None
            if isinstance(exc, docker.errors.APIError):
                raise SandboxStartError(f"Docker refused sandbox {sandbox_id}: {exc.explanation or exc}") from None
            raise
        sandbox = Sandbox(
            sandbox_id, spec, host, connection_info(str(host_dir / "k"), key), workspace=WORKSPACE, isolated=True
        )
        await sandbox.start()
        return sandbox

    async def create_container(self, spec: SandboxSpec) -> str:
        """Create (do not start) a sandbox container and return its id; the caller removes it."""
        sandbox_id = secrets.token_hex(6)
        host_dir = self.runtime_root / sandbox_id
        self._make_kernel_dir(host_dir, secrets.token_hex(32))
        return await self.call(self._create_container, spec, sandbox_id, host_dir)

    async def close(self) -> None:
        # The threads stay: sandboxes of this backend may still be closed after it.
        await self.call(self.client.close)

    def _make_kernel_dir(self, host_dir: Path, key: str) -> None:
        self.runtime_root.mkdir(mode=0o711, parents=True, exist_ok=True)
        host_dir.mkdir(mode=0o700)
        connection_file = host_dir / "kernel.json"
        connection_file.write_text(json.dumps(connection_info(f"{KERNEL_DIR}/k", key)))
        if self._root_host:
            os.chown(host_dir, 0, SANDBOX_UID)
            os.chown(connection_file, 0, SANDBOX_UID)
            connection_file.chmod(0o640)
        else:
            connection_file.chmod(0o600)
        self.set_kernel_dir_writable(host_dir, True)

    def set_kernel_dir_writable(self, host_dir: Path, writable: bool) -> None:
        """Let the kernel (group) create its sockets, or forbid any new file once they exist."""
        if self._root_host:
            host_dir.chmod(0o770 if writable else 0o750)

    def container_options(self, spec: SandboxSpec, sandbox_id: str, host_dir: Path) -> dict[str, Any]:
        """Arguments of `APIClient.create_container` for this spec: every hardening default."""
        uid, gid = self.container_user
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
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={
                "/tmp": f"rw,nosuid,nodev,size={spec.tmpfs_bytes},mode=1777",
                WORKSPACE: f"rw,nosuid,nodev,size={spec.workspace_bytes},uid={uid},gid={gid},mode=0755",
            },
            mounts=mounts,
            pids_limit=host_pids,
            ulimits=[Ulimit(name="nproc", soft=guest_nproc, hard=guest_nproc)] if guest_nproc else None,
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
        }
        return dict(
            image=spec.image,
            command=["python", "-c", SUPERVISOR_SOURCE, f"{KERNEL_DIR}/kernel.json", "--contained"],
            user=f"{uid}:{gid}",
            working_dir=WORKSPACE,
            environment=environment,
            labels=labels,
            hostname="sandbox",
            name=f"cellforge-{sandbox_id}",
            host_config=host_config,
        )

    def _create_container(self, spec: SandboxSpec, sandbox_id: str, host_dir: Path) -> str:
        # The low-level API: the high-level `containers.run` adds an inspect round trip per start.
        return self.client.api.create_container(**self.container_options(spec, sandbox_id, host_dir))["Id"]


class DockerKernelHost:
    """The container of one sandbox, seen from the `Sandbox`."""

    def __init__(self, backend: DockerBackend, sandbox_id: str, host_dir: Path) -> None:
        self.backend = backend
        self.sandbox_id = sandbox_id
        self.host_dir = host_dir
        self.container_id: str | None = None

    @property
    def _api(self) -> docker.APIClient:
        return self.backend.client.api

    async def kernel_ready(self) -> None:
        self.backend.set_kernel_dir_writable(self.host_dir, False)

    async def restart_kernel(self) -> None:
        self.backend.set_kernel_dir_writable(self.host_dir, True)
        self._remove_sockets()
        await self.backend.call(self._api.kill, self.container_id, "SIGUSR1")

    def _remove_sockets(self) -> None:
        # The next kernel binds the same socket paths. Under gVisor (runsc) a socket file on the bind
        # mount cannot be unlinked from inside (EPERM), so the host removes the old ones first.
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
        if await self.exit_cause(timeout=0) is None:
            # Still running (only the kernel's connection was lost): replacing the kernel is enough.
            await self.restart_kernel()
            return
        self.backend.set_kernel_dir_writable(self.host_dir, True)
        self._remove_sockets()
        await self.backend.call(self._api.start, self.container_id)

    async def destroy(self) -> None:
        if self.container_id is not None:
            try:
                await self.backend.call(self._api.remove_container, self.container_id, force=True, v=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                log.error(
                    "could not remove container %s of sandbox %s: %s", self.container_id[:12], self.sandbox_id, exc
                )
        await self.backend.call(shutil.rmtree, self.host_dir, True)

    async def logs(self) -> str:
        if self.container_id is None:
            return ""
        try:
            raw = await self.backend.call(self._api.logs, self.container_id, tail=60)
        except docker.errors.APIError:
            return ""
        return raw.decode("utf-8", "replace")
