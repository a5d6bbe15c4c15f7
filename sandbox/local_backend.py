"""Local backend: the kernel is a plain process on this host. NOT ISOLATED.

Same API as the Docker backend, for development and for machines without Docker. The kernel runs
as the current user with a cleaned environment (nothing inherited from the host process), in a
temporary workspace; every sandbox says so (`isolated == False`) and each creation logs a warning.
Code in it can read and write anything this user can. Memory, CPU and pids limits, the quota and
the network ban are not enforced; timeouts, interrupts, restarts and the output cap are.
Data mounts become symlinks under the sandbox's own `data` folder (`sandbox.data_root`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
from pathlib import Path

from .backend import BackendHealth, BackendKind, KernelHost, SandboxBackend, describe_exit
from .errors import SandboxStartError, UsageError
from .messaging import ConnectionInfo, connection_info
from .spec import DATA_ROOT, SandboxSpec

log = logging.getLogger(__name__)

SUPERVISOR = Path(__file__).with_name("supervisor.py")
DEFAULT_ROOT = Path("/tmp/cf")
# Unix socket paths are limited to 107 bytes; keep room for "/<sandbox id>/k-5".
_MAX_ROOT_LEN = 70
_STOP_TIMEOUT_S = 5.0


class LocalBackend(SandboxBackend):
    """Creates non-isolated sandboxes: an ipykernel subprocess per sandbox, on this host."""

    kind = BackendKind.LOCAL
    isolated = False

    def __init__(self, root: str | Path | None = None, python: str | None = None) -> None:
        self.root = Path(root or DEFAULT_ROOT)
        if len(str(self.root)) > _MAX_ROOT_LEN:
            raise UsageError(f"LocalBackend root {self.root} is too long for unix sockets (max {_MAX_ROOT_LEN} chars)")
        self.python = python or sys.executable

    async def provision(self, spec: SandboxSpec) -> LocalKernelHost:
        sandbox_id = f"local-{secrets.token_hex(5)}"
        base = self.root / sandbox_id
        self.root.mkdir(parents=True, exist_ok=True)
        base.mkdir(mode=0o700)
        workspace, home, data_root = base / "workspace", base / "home", base / "data"
        info = connection_info(str(base / "k"), secrets.token_hex(32))
        env = {
            "PATH": f"{Path(self.python).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "IPYTHONDIR": str(home / ".ipython"),
            "MPLCONFIGDIR": str(home / ".mpl"),
            "PYTHONNOUSERSITE": "1",
            **spec.env,
        }
        host = LocalKernelHost(sandbox_id, info, [self.python, str(SUPERVISOR), str(base / "kernel.json")], env, base)
        log.warning(
            "LocalBackend sandbox %s is NOT ISOLATED: code runs as this host user with no limits, "
            "no network ban and full access to this machine's files",
            sandbox_id,
        )
        try:
            workspace.mkdir()
            home.mkdir()
            _link_mounts(spec, data_root)
            connection_file = base / "kernel.json"
            connection_file.write_text(json.dumps(info))
            connection_file.chmod(0o600)
            await host.launch()
        except BaseException as exc:
            await asyncio.shield(host.destroy())
            if isinstance(exc, OSError):
                raise SandboxStartError(f"sandbox {sandbox_id}: cannot start {self.python}: {exc}") from None
            raise
        return host

    async def health(self) -> BackendHealth:
        if not os.access(self.python, os.X_OK):
            return BackendHealth(ok=False, detail=f"{self.python} is not an executable")
        return BackendHealth(ok=True, detail=f"local kernels ({self.python}), NOT ISOLATED")

    async def close(self) -> None:
        """Nothing shared to release (each sandbox owns its process)."""


def _link_mounts(spec: SandboxSpec, data_root: Path) -> None:
    for mount in spec.mounts:
        if not Path(mount.source).exists():
            raise SandboxStartError(f"mount source {mount.source} does not exist")
        relative = os.path.relpath(mount.target, DATA_ROOT)
        link = data_root if relative == "." else data_root / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(mount.source)


class LocalKernelHost(KernelHost):
    """The supervisor process (and its kernel) of one local sandbox, in its folder `base`."""

    def __init__(self, sandbox_id: str, info: ConnectionInfo, argv: list[str], env: dict[str, str], base: Path) -> None:
        super().__init__(sandbox_id, info, workspace=str(base / "workspace"), data_root=str(base / "data"))
        self._argv = argv
        self._cwd = base / "workspace"
        self._env = env
        self._base = base
        self._log_path = base / "kernel.log"
        self._proc: asyncio.subprocess.Process | None = None

    async def launch(self) -> None:
        with open(self._log_path, "ab") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv,
                cwd=self._cwd,
                env=self._env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                # Its own session: a Ctrl-C at the host's terminal must not reach sandboxed code.
                start_new_session=True,
            )

    async def restart_kernel(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGUSR1)

    async def exit_cause(self, timeout: float) -> str | None:
        if self._proc is None:
            return "never started"
        if self._proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._proc.wait()
        return None if self._proc.returncode is None else describe_exit(self._proc.returncode)

    async def revive(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await self._stop()
        shutil.rmtree(self._cwd, ignore_errors=True)
        self._cwd.mkdir()
        await self.launch()

    async def _stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await proc.wait()

    async def destroy(self) -> None:
        await self._stop()
        shutil.rmtree(self._base, ignore_errors=True)

    async def logs(self) -> str:
        try:
            return self._log_path.read_bytes()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""
