"""Finding and removing sandbox containers left behind by a process that died without cleaning up.

Every managed container carries `cellforge.managed=true` and `cellforge.owner=<host>:<pid>:<start>`,
the process that created it. A container is an orphan when its owner ran on this host and that
process is gone: the pid is dead, or the pid now belongs to a different process (its start time no
longer matches — pids get reused). Containers owned by another host are never touched, since we
cannot tell whether their owner is alive.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from dataclasses import dataclass

import docker
import docker.errors
import psutil

from .backend import ReapReport
from .errors import SandboxError

log = logging.getLogger(__name__)

MANAGED_LABEL = "cellforge.managed"
OWNER_LABEL = "cellforge.owner"

# psutil derives start times from clock ticks since boot; two reads of the same process agree to
# well under a second, while a reused pid starts at a visibly different time.
_START_TIME_TOLERANCE_S = 1.0


@dataclass(frozen=True)
class Owner:
    """The process that owns a container: host name, pid and the process start time (epoch s)."""

    host: str
    pid: int
    started: float

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @classmethod
    def parse(cls, label: str) -> Owner | None:
        """Read an owner label; None when it is not in the `host:pid:start` form."""
        host, sep, rest = label.rpartition(":")
        host, sep2, pid = host.rpartition(":")
        if not (sep and sep2 and host):
            return None
        try:
            return cls(host=host, pid=int(pid), started=float(rest))
        except ValueError:
            return None

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether the owning process still runs (meaningful only for an owner on this host)."""
        try:
            started = psutil.Process(self.pid).create_time()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return False
        except psutil.AccessDenied:
            return True  # it exists; we just may not inspect it
        return abs(started - self.started) <= _START_TIME_TOLERANCE_S


def current_owner() -> Owner:
    """This process as a container owner."""
    return Owner(host=socket.gethostname(), pid=os.getpid(), started=psutil.Process().create_time())


def owner_labels() -> dict[str, str]:
    """The labels every managed container must carry so that it can be reaped after a crash."""
    return {MANAGED_LABEL: "true", OWNER_LABEL: current_owner().label}


def classify(labels: dict[str, str]) -> tuple[bool, str]:
    """Whether a managed container with these labels is an orphan, and why (or why it is kept)."""
    raw = labels.get(OWNER_LABEL)
    owner = Owner.parse(raw) if raw else None
    if owner is None:
        return False, f"no readable {OWNER_LABEL} label ({raw!r})"
    if not owner.is_local():
        return False, f"owned by another host ({owner.host})"
    if owner.is_alive():
        return False, f"owner {owner.label} is alive"
    return True, f"owner {owner.label} is no longer running"


def reap_orphans(client: docker.DockerClient | None = None) -> ReapReport:
    """Remove (force, with volumes) every managed container whose owner on this host is gone."""
    if client is None:
        try:
            client = docker.from_env()
        except docker.errors.DockerException as exc:
            raise SandboxError(f"cannot reap orphan sandboxes: Docker engine not reachable ({exc})") from None
    report = ReapReport()
    # Sparse: a full listing inspects each container after listing it, and one removed in between
    # (by its owner, or another process reaping) would fail the whole reap with NotFound.
    for container in client.containers.list(all=True, sparse=True, filters={"label": f"{MANAGED_LABEL}=true"}):
        orphan, reason = classify(_labels(container))
        if not orphan:
            report.kept[container.id] = reason
            continue
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass  # removed concurrently (e.g. another process reaping at start-up): same outcome
        except docker.errors.APIError as exc:
            # 409: another process's removal of it is in progress (processes starting together reap the same
            # engine): the same outcome. Any other refusal keeps it, with the engine's reason, for a later
            # reap: one stuck container must not fail the reap, and with it a server's start-up.
            if exc.status_code != 409:
                report.kept[container.id] = f"orphan ({reason}), but the engine refused to remove it: {exc}"
                log.warning("could not remove orphan sandbox container %s: %s", container.short_id, exc)
                continue
        _remove_kernel_dir(container)
        log.info("reaped orphan sandbox container %s: %s", container.short_id, reason)
        report.removed.append(container.id)
    return report


def _labels(container: docker.models.containers.Container) -> dict[str, str]:
    """Labels of a sparse (listed, not inspected) container."""
    return container.attrs.get("Labels") or {}


def _remove_kernel_dir(container: docker.models.containers.Container) -> None:
    """The host folder holding the dead sandbox's kernel sockets, bind-mounted into its container
    (and the one of its relay, beside it).

    Only a bind source whose folder is named after the container's sandbox id is removed, so a
    crafted label can never point the reaper at another host folder.
    """
    from .docker_backend import SANDBOX_LABEL  # the backend imports this module at load time
    from .relay import relay_folder

    sandbox_id = _labels(container).get(SANDBOX_LABEL)
    for mount in container.attrs.get("Mounts") or []:
        source = mount.get("Source") or ""
        if sandbox_id and mount.get("Type") == "bind" and os.path.basename(source) == sandbox_id:
            shutil.rmtree(source, ignore_errors=True)
            shutil.rmtree(relay_folder(source), ignore_errors=True)
