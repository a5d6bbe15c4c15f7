"""Which uid runs sandboxed code, and which host uid a container's root is.

Without a user namespace a container's uids are the host's: a kernel running as uid 1000 on a host
where 1000 is a person's account can be signalled and traced by that person, and that person's
processes are the sandbox's as far as the kernel is concerned. So unless the engine remaps users
(`userns-remap`, rootless Docker), the sandbox uid must be nobody on this host: no account, no group,
no subordinate range handed out in /etc/subuid or /etc/subgid.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from pathlib import Path
from typing import Any

from .errors import SandboxError

# Inside a remapped container: the image's own `sandbox` user, which is no one on the host.
REMAPPED_SANDBOX_UID = 1000
# Without remapping: the first free id from here. Above the id ranges sssd and LDAP hand out by
# default (up to 2,000,200,000), below 2**31 where some tools stop treating ids as numbers.
FREE_ID_BASE = 2_100_000_000
_FREE_ID_TRIES = 1000
_SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
_REMAPPED_ROOT_DIR = re.compile(r"^(\d+)\.(\d+)$")


def engine_remaps_users(info: dict[str, Any]) -> bool:
    """Whether the engine runs containers in a user namespace (from `docker info`)."""
    options = info.get("SecurityOptions") or []
    return any(opt in ("name=userns", "name=rootless") for opt in options)


def container_root_on_host(info: dict[str, Any]) -> tuple[int, int]:
    """The host uid and gid of uid 0 inside the engine's containers.

    userns-remap keeps its data under `<data root>/<uid>.<gid>`, named after the remapped root; a
    rootless engine runs as the user who talks to it.
    """
    options = info.get("SecurityOptions") or []
    if "name=rootless" in options:
        return os.getuid(), os.getgid()
    if "name=userns" in options:
        match = _REMAPPED_ROOT_DIR.match(os.path.basename(str(info.get("DockerRootDir", "")).rstrip("/")))
        if not match:
            raise SandboxError(
                f"the Docker engine remaps users, but its data root {info.get('DockerRootDir')!r} does not "
                "say to which host uid (expected '<root>/<uid>.<gid>')"
            )
        return int(match.group(1)), int(match.group(2))
    return 0, 0


def host_owner_of(uid: int) -> str | None:
    """What on this host already uses `uid` (as a uid or a gid), or None if nothing does."""
    try:
        return f"the account {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        pass
    try:
        return f"the group {grp.getgrgid(uid).gr_name!r}"
    except KeyError:
        pass
    for path in _SUBID_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, count = int(parts[1]), int(parts[2])
                if start <= uid < start + count:
                    return f"in the subordinate ids of {parts[0]!r} ({path})"
    return None


def choose_sandbox_uid(requested: int | None, remapped: bool) -> int:
    """The uid (and gid) sandboxed code runs as; SandboxError when `requested` is someone's on this host."""
    if requested is not None and not 0 < requested < 2**32 - 1:
        raise SandboxError(f"sandbox uid: expected an id between 1 and {2**32 - 2}, got {requested}")
    if remapped:
        return requested or REMAPPED_SANDBOX_UID
    if requested is not None:
        owner = host_owner_of(requested)
        if owner:
            raise SandboxError(
                f"sandbox uid {requested} is {owner} on this host, and the Docker engine does not remap users: "
                "sandboxed code would share that identity. Choose an unused uid (CELLFORGE_SANDBOX_UID) or enable "
                "userns-remap (see SECURITY.md)"
            )
        return requested
    for uid in range(FREE_ID_BASE, FREE_ID_BASE + _FREE_ID_TRIES):
        if host_owner_of(uid) is None:
            return uid
    raise SandboxError(f"no free uid from {FREE_ID_BASE} on: set CELLFORGE_SANDBOX_UID to an unused one")
