"""Container runtimes a sandbox may ask for (`SandboxSpec.runtime`), and the check that one is there.

`runc` is the engine's default. `runsc` is gVisor: the sandboxed code's system calls are served by a
user-space kernel (the Sentry) instead of the host's, so a kernel exploit needs a gVisor escape first.
`scripts/setup-runsc.sh` installs it and registers it in /etc/docker/daemon.json; a spec naming a
runtime the engine does not know fails before any container is made, with that command in the error.
"""

from __future__ import annotations

from typing import Any

import docker
import docker.errors

from .errors import SandboxStartError

RUNC = "runc"
RUNSC = "runsc"
# Under gVisor the host's pids cgroup counts the Sentry's and gofer's threads and the platform's stub
# processes, not the sandboxed code's tasks: about 70 with an idle kernel, and 5-6 more per guest
# process on the ptrace platform (measured: 127 guest processes took 741 host tasks; with the kernel
# under its own uid beside a root supervisor, a fork bomb against RLIMIT_NPROC=128 needed more than
# 8 host tasks per guest task and ran with 16, so 32 leaves a margin). A pids limit
# sized for the guest would make the Sentry itself fail to start a thread and the whole sandbox die.
# So under runsc the guest's limit is RLIMIT_NPROC, which gVisor counts inside the sandbox (fork
# fails with EAGAIN, as a pids limit does under runc), and the host limit only bounds gVisor.
RUNSC_HOST_TASKS_BASE = 128
RUNSC_HOST_TASKS_PER_GUEST_TASK = 32
SETUP_HINT = {
    RUNSC: "run `sudo scripts/setup-runsc.sh` (installs gVisor's runsc and registers it in "
    "/etc/docker/daemon.json, then reloads dockerd with SIGHUP)",
}


def is_gvisor(runtime: str | None) -> bool:
    """Whether `runtime` names gVisor (`runsc`, or a variant registered as `runsc-<something>`)."""
    return runtime is not None and (runtime == RUNSC or runtime.startswith(RUNSC + "-"))


def task_limits(runtime: str | None, pids_limit: int) -> tuple[int, int | None]:
    """(host pids cgroup limit, RLIMIT_NPROC or None) that give the guest `pids_limit` tasks."""
    if is_gvisor(runtime):
        return RUNSC_HOST_TASKS_BASE + RUNSC_HOST_TASKS_PER_GUEST_TASK * pids_limit, pids_limit
    # Under runc RLIMIT_NPROC would count the uid's processes across the whole host: never set it.
    return pids_limit, None


def engine_runtimes(client: Any) -> dict[str, dict]:
    """The runtimes the Docker engine knows, by name, with their path and runtimeArgs."""
    api = getattr(client, "api", client)
    try:
        return dict(api.info().get("Runtimes") or {})
    except docker.errors.DockerException as exc:
        raise SandboxStartError(f"Docker engine not reachable: {exc}") from None


def unregistered(runtime: str, known: list[str] | None = None) -> SandboxStartError:
    """The error for a runtime the engine does not know, saying how to register it."""
    hint = SETUP_HINT.get(runtime, f"register it under \"runtimes\" in /etc/docker/daemon.json")
    knows = f" (it knows: {', '.join(sorted(known))})" if known else ""
    return SandboxStartError(f"runtime {runtime!r} is not registered with the Docker engine{knows}; {hint}")


def require_runtime(runtime: str | None, client: Any = None) -> None:
    """SandboxStartError unless the engine knows `runtime` (None: the engine's default, always there)."""
    if runtime is None:
        return
    if client is None:
        try:
            client = docker.from_env(timeout=30)
        except docker.errors.DockerException as exc:
            raise SandboxStartError(f"Docker engine not reachable: {exc}") from None
    known = engine_runtimes(client)
    if runtime not in known:
        raise unregistered(runtime, list(known))
