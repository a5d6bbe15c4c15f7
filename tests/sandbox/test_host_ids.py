"""Choosing the sandbox uid and reading the engine's user remapping (hostile probe 14's rules)."""

from __future__ import annotations

import os
import pwd

import pytest

from sandbox import SandboxError
from sandbox.host_ids import (
    FREE_ID_BASE,
    REMAPPED_SANDBOX_UID,
    choose_sandbox_uid,
    container_root_on_host,
    engine_remaps_users,
    host_owner_of,
)

PLAIN = {"SecurityOptions": ["name=seccomp,profile=default"], "DockerRootDir": "/var/lib/docker"}
REMAPPED = {"SecurityOptions": ["name=seccomp,profile=default", "name=userns"], "DockerRootDir": "/var/lib/docker/100000.100000"}
ROOTLESS = {"SecurityOptions": ["name=seccomp,profile=default", "name=rootless"], "DockerRootDir": "/home/u/.local/share/docker"}


def test_the_engines_user_mapping_is_read_from_docker_info():
    assert not engine_remaps_users(PLAIN) and container_root_on_host(PLAIN) == (0, 0)
    assert engine_remaps_users(REMAPPED) and container_root_on_host(REMAPPED) == (100000, 100000)
    assert engine_remaps_users(ROOTLESS) and container_root_on_host(ROOTLESS) == (os.getuid(), os.getgid())
    with pytest.raises(SandboxError, match="does not say to which host uid"):
        container_root_on_host({**REMAPPED, "DockerRootDir": "/srv/docker"})


def test_without_remapping_the_sandbox_uid_is_nobody_on_the_host():
    chosen = choose_sandbox_uid(None, remapped=False)
    assert chosen >= FREE_ID_BASE and host_owner_of(chosen) is None
    account = next(p for p in pwd.getpwall() if p.pw_uid > 0)
    assert host_owner_of(account.pw_uid) == f"the account {account.pw_name!r}"
    with pytest.raises(SandboxError, match="does not remap users"):
        choose_sandbox_uid(account.pw_uid, remapped=False)
    with pytest.raises(SandboxError, match="expected an id"):
        choose_sandbox_uid(0, remapped=False)


def test_with_remapping_the_images_own_uid_is_kept():
    assert choose_sandbox_uid(None, remapped=True) == REMAPPED_SANDBOX_UID
    account = next(p for p in pwd.getpwall() if p.pw_uid > 0)
    assert choose_sandbox_uid(account.pw_uid, remapped=True) == account.pw_uid
