"""Offline build of the sandbox images (`cellforge-sandbox:<flavor>`).

The build never needs a registry and never lets the network into the image build:

1. the wheels pinned in `images/<flavor>/requirements.txt` are downloaded on the host
   (`pip download`, cached in `images/.wheelhouse/<flavor>`);
2. the base is `--base`, else `python:3.11-slim` when present locally or pullable, else a Debian
   bookworm root filesystem made with `debootstrap` and `docker import`ed once (cached by recipe);
3. `images/<flavor>/Dockerfile` is built with the network disabled and tagged
   `cellforge-sandbox:<flavor>-<content hash>` plus the alias `cellforge-sandbox:<flavor>`.

The content hash covers the flavor's directory (Dockerfile, requirements) and the base image id, so
an unchanged content tag means there is nothing to rebuild.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from .errors import SandboxError
from .gpu_lock import WHEEL_PLATFORMS, LockError, PackageIndex, verify_lock
from .spec import IMAGE_REPOSITORY as REPOSITORY

FLAVORS = ("cpu", "gpu")
REGISTRY_BASE = "python:3.11-slim"
IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"

# The Debian base made without a registry. Its tag carries a hash of this recipe, so a changed
# recipe bootstraps again and an unchanged one is reused.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "python3-venv", "passwd")
# Left out of the imported root filesystem: package caches and docs nobody reads in a sandbox.
ROOTFS_EXCLUDES = (
    "./dev/*", "./proc/*", "./sys/*", "./var/cache/apt/archives/*.deb", "./var/lib/apt/lists/*",
    "./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*", "./usr/share/locale/*",
)

WHEEL_PYTHON = "3.11"
_WHEELHOUSE_STAMP = ".complete"

LogFn = Callable[[str], None]


class ImageBuildError(SandboxError):
    """The sandbox image could not be built; the message says which step failed and why."""


class DockerUnavailable(ImageBuildError):
    """No Docker engine answers."""


class BaseImageError(ImageBuildError):
    """No base image could be found, pulled or bootstrapped."""


class WheelhouseError(ImageBuildError):
    """The host-side wheelhouse could not be filled from the pinned requirements."""


@dataclass(frozen=True)
class BuiltImage:
    tag: str  # the content tag, cellforge-sandbox:<flavor>-<hash>
    alias: str  # cellforge-sandbox:<flavor>
    content_hash: str
    built: bool  # False when the content tag already existed
    seconds: float
    base: str = ""


def build_image(
    flavor: str = "cpu",
    base: str | None = None,
    force: bool = False,
    on_log: LogFn | None = None,
    images_dir: Path | None = None,
) -> BuiltImage:
    """Build (or find up to date) the sandbox image of `flavor`; see the module docstring."""
    started = time.monotonic()
    log = on_log or (lambda _line: None)
    flavor_dir = _flavor_dir(flavor, images_dir)
    client = _client()

    base_ref = _ensure_base(client, base, log)
    content_hash = _content_hash(client, flavor_dir, base_ref)
    tag, alias = f"{REPOSITORY}:{flavor}-{content_hash}", f"{REPOSITORY}:{flavor}"

    if not force and _image_id(client, tag):
        _tag_alias(client, tag, alias)
        log(f"{tag} is up to date")
        return BuiltImage(tag, alias, content_hash, False, time.monotonic() - started, base_ref)

    wheelhouse = fill_wheelhouse(flavor, log=log, images_dir=images_dir)
    with tempfile.TemporaryDirectory(prefix=f"cellforge-image-{flavor}-") as ctx:
        _assemble_context(flavor_dir, wheelhouse, Path(ctx))
        log(f"building {tag} from {base_ref}")
        _docker_build(client, Path(ctx), tag, base_ref, content_hash, flavor, log)
    _tag_alias(client, tag, alias)
    _remove_superseded(client, flavor, tag, log)
    return BuiltImage(tag, alias, content_hash, True, time.monotonic() - started, base_ref)


def image_tag(flavor: str = "cpu", base: str | None = None, images_dir: Path | None = None) -> str:
    """The content tag `build_image` would produce now, computed without building anything.

    Needs the base image locally (it is part of the hash); raises BaseImageError when it is missing.
    """
    flavor_dir = _flavor_dir(flavor, images_dir)
    client = _client()
    base_ref = base or _local_base(client)
    if base_ref is None or not _image_id(client, base_ref):
        raise BaseImageError(
            f"base image {base_ref or REGISTRY_BASE + ' / ' + debian_base_tag()} is not in the local "
            "engine; run `cellforge images build` first"
        )
    return f"{REPOSITORY}:{flavor}-{_content_hash(client, flavor_dir, base_ref)}"


def debian_base_tag() -> str:
    """Tag of the debootstrapped base, named by a hash of its recipe."""
    recipe = "|".join((DEBIAN_SUITE, DEBIAN_MIRROR, "minbase", *DEBIAN_PACKAGES, *ROOTFS_EXCLUDES))
    return f"cellforge-base:{DEBIAN_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def fill_wheelhouse(flavor: str, log: LogFn | None = None, images_dir: Path | None = None) -> Path:
    """Download the flavor's pinned wheels for Linux/CPython 3.11 into its wheelhouse (cached)."""
    log = log or (lambda _line: None)
    flavor_dir = _flavor_dir(flavor, images_dir)
    requirements = flavor_dir / "requirements.txt"
    wheelhouse = flavor_dir.parent / ".wheelhouse" / flavor
    stamp = wheelhouse / _WHEELHOUSE_STAMP
    # Every requirements file of the flavor counts (the GPU one includes its torch lock).
    pinned = b"".join(path.read_bytes() for path in sorted(flavor_dir.glob("*.txt")))
    want = hashlib.sha256(pinned + "|".join(WHEEL_PLATFORMS).encode()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == want:
        return wheelhouse

    if flavor == "gpu":
        # Metadata only: a lock the index cannot serve fails here, not after gigabytes of downloads.
        log("checking that the index serves every wheel of the CUDA torch lock")
        index = PackageIndex()
        try:
            verify_lock(index, flavor_dir)
        except LockError as exc:
            raise WheelhouseError(str(exc)) from None
        finally:
            index.close()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version",
        WHEEL_PYTHON, "--implementation", "cp", "--dest", str(wheelhouse), "--requirement",
        str(requirements), "--progress-bar", "off",
    ]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    log(f"downloading wheels for {flavor} into {wheelhouse}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        # pip's warnings about unreadable mirror locations bury the one line that says what failed.
        errors = [line for line in lines if line.startswith("ERROR:") and "Ignored the following" not in line]
        tail = "\n".join((errors or lines)[-3:])
        hint = ""
        if flavor == "cpu" and "torch" in tail:
            hint = (
                "\nthe CPU build of torch is not on PyPI: put its wheel in PIP_FIND_LINKS or set "
                "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
            )
        raise WheelhouseError(
            f"could not fill the wheelhouse {wheelhouse} from {requirements} "
            f"(pip download exited {proc.returncode}):\n{tail}{hint}"
        )
    stamp.write_text(want + "\n")
    return wheelhouse


# ---------------------------------------------------------------------------------------- internals


def _flavor_dir(flavor: str, images_dir: Path | None) -> Path:
    if flavor not in FLAVORS:
        raise ImageBuildError(f"unknown image flavor {flavor!r}; expected one of {', '.join(FLAVORS)}")
    flavor_dir = (images_dir or IMAGES_DIR) / flavor
    for name in ("Dockerfile", "requirements.txt"):
        if not (flavor_dir / name).is_file():
            raise ImageBuildError(f"{flavor_dir / name} is missing; the {flavor} image cannot be built")
    return flavor_dir


def _client() -> docker.APIClient:
    try:
        # from_env honours DOCKER_HOST and the TLS variables, like the docker CLI does.
        client = docker.from_env(timeout=600).api
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerUnavailable(
            f"no Docker engine answers ({exc}); install and start it (./scripts/setup.sh does both)"
        ) from exc
    return client


def _image_id(client: docker.APIClient, ref: str) -> str | None:
    try:
        return client.inspect_image(ref)["Id"]
    except docker.errors.ImageNotFound:
        return None


def _content_hash(client: docker.APIClient, flavor_dir: Path, base_ref: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in flavor_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(flavor_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(f"base={_image_id(client, base_ref)}".encode())
    return digest.hexdigest()[:12]


def _local_base(client: docker.APIClient) -> str | None:
    for ref in (REGISTRY_BASE, debian_base_tag()):
        if _image_id(client, ref):
            return ref
    return None


def _ensure_base(client: docker.APIClient, base: str | None, log: LogFn) -> str:
    if base:
        if _image_id(client, base) or _try_pull(client, base, log):
            return base
        raise BaseImageError(f"base image {base!r} is neither in the local engine nor pullable")
    local = _local_base(client)
    if local:
        return local
    if _try_pull(client, REGISTRY_BASE, log):
        return REGISTRY_BASE
    log(f"no registry reachable; bootstrapping Debian {DEBIAN_SUITE} as {debian_base_tag()}")
    return bootstrap_debian_base(client, log)


def _try_pull(client: docker.APIClient, ref: str, log: LogFn) -> bool:
    repository, _, tag = ref.partition(":")
    try:
        client.pull(repository, tag=tag or "latest")
    except docker.errors.APIError as exc:
        log(f"cannot pull {ref}: {exc.explanation or exc}")
        return False
    return True


def bootstrap_debian_base(client: docker.APIClient, log: LogFn) -> str:
    """debootstrap a minimal Debian with python3, `docker import` it, and return its tag."""
    tag = debian_base_tag()
    if shutil.which("debootstrap") is None:
        raise BaseImageError(
            f"neither {REGISTRY_BASE} nor {tag} is available and debootstrap is not installed; "
            "install it (apt-get install debootstrap) or pass --base IMAGE"
        )
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    with tempfile.TemporaryDirectory(prefix="cellforge-rootfs-") as tmp:
        rootfs, tarball = Path(tmp) / "rootfs", Path(tmp) / "rootfs.tar"
        _run_step(
            [*sudo, "debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
             DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
            "debootstrap", log,
        )
        excludes = [f"--exclude={pattern}" for pattern in ROOTFS_EXCLUDES]
        _run_step([*sudo, "tar", "-C", str(rootfs), *excludes, "-cf", str(tarball), "."], "tar", log)
        repository, _, version = tag.partition(":")
        log(f"importing the root filesystem as {tag}")
        try:
            client.import_image_from_file(str(tarball), repository=repository, tag=version)
        except docker.errors.APIError as exc:
            raise BaseImageError(f"docker import of the bootstrapped root filesystem failed: {exc}") from exc
        if sudo:
            _run_step([*sudo, "rm", "-rf", str(rootfs)], "cleanup", log)
    return tag


def _run_step(cmd: list[str], what: str, log: LogFn) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        log(line.rstrip())
    if proc.wait() != 0:
        tail = "\n".join(lines[-10:])
        raise BaseImageError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def _assemble_context(flavor_dir: Path, wheelhouse: Path, ctx: Path) -> None:
    shutil.copytree(flavor_dir, ctx, dirs_exist_ok=True)
    wheels = ctx / "wheels"
    wheels.mkdir()
    for wheel in wheelhouse.glob("*.whl"):
        try:
            os.link(wheel, wheels / wheel.name)  # same filesystem: no copy of a multi-GB wheelhouse
        except OSError:
            shutil.copy2(wheel, wheels / wheel.name)


def _docker_build(
    client: docker.APIClient, ctx: Path, tag: str, base_ref: str, content_hash: str, flavor: str, log: LogFn,
    labels: dict[str, str] | None = None,
) -> None:
    tail: list[str] = []
    stream = client.build(
        path=str(ctx), tag=tag, buildargs={"BASE": base_ref}, network_mode="none", pull=False,
        rm=True, forcerm=True, decode=True,
        labels={"org.cellforge.flavor": flavor, "org.cellforge.content-hash": content_hash, **(labels or {})},
    )
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            raise ImageBuildError(f"docker build of {tag} failed: {detail.strip()}\n" + "\n".join(tail[-10:]))
        for line in _ANSI.sub("", str(chunk.get("stream", ""))).splitlines():
            if line.strip():
                tail.append(line)
                log(line)
    if not _image_id(client, tag):
        raise ImageBuildError(f"docker build of {tag} ended without an image:\n" + "\n".join(tail[-10:]))


# The legacy builder colours a step's stderr; a log file or an error message wants the text.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _remove_superseded(client: docker.APIClient, flavor: str, keep: str, log: LogFn) -> None:
    """Drop older content tags of this flavor and the leftover wheel-holding build stages.

    An image a container still uses is kept: the engine refuses, and that refusal is fine. Derived
    images (`<flavor>-req-<hash>`, sandbox.derived_images) are the user's and stay.
    """
    content_tag = re.compile(rf"{re.escape(REPOSITORY)}:{re.escape(flavor)}-[0-9a-f]{{12}}")
    stale = [
        ref
        for image in client.images(name=REPOSITORY)
        for ref in image.get("RepoTags") or []
        if content_tag.fullmatch(ref) and ref != keep
    ]
    stale += [image["Id"] for image in client.images(filters={"dangling": True, "label": "org.cellforge.stage=venv"})]
    for ref in stale:
        try:
            client.remove_image(ref)
            log(f"removed superseded image {ref}")
        except docker.errors.APIError as exc:
            log(f"kept {ref}: {exc.explanation or exc}")


def _tag_alias(client: docker.APIClient, tag: str, alias: str) -> None:
    repository, _, version = alias.partition(":")
    client.tag(tag, repository, tag=version, force=True)
