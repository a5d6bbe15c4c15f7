"""Derived sandbox images: a built `cellforge-sandbox:<flavor>` plus the packages of a requirements file.

`build_derived_image(requirements)` works like the flavor build, offline inside the build:

1. the requirements file is checked line by line (package requirements only: no pip options, no URLs);
2. the packages the base image already holds are read from it and become pip constraints, so a
   requirement can add packages but never change the sandbox's own (numpy, torch...);
3. the wheels are downloaded on the host (`pip download`, Linux/CPython 3.11 wheels only) into
   `images/.wheelhouse/req-<hash>`;
4. `images/derived/Dockerfile` installs them with `--no-index --find-links` and network disabled, and
   copies only the files the install added onto the base (the wheels never become a layer).

The tag is `cellforge-sandbox:<flavor>-req-<12 hex>`, a hash of the base image id, the normalized
requirements and the derived Dockerfile: the same file on the same base is a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker.errors
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .gpu_lock import WHEEL_PLATFORMS
from .images import (
    FLAVORS,
    IMAGES_DIR,
    WHEEL_PYTHON,
    BaseImageError,
    ImageBuildError,
    LogFn,
    WheelhouseError,
    _client,
    _docker_build,
    _image_id,
)
from .spec import IMAGE_REPOSITORY as REPOSITORY


class RequirementsError(ImageBuildError):
    """The requirements file cannot be used; the message names the file, the line and why."""


@dataclass(frozen=True)
class DerivedImage:
    tag: str  # cellforge-sandbox:<flavor>-req-<hash>
    base: str
    content_hash: str
    built: bool  # False when the tag already existed
    seconds: float
    requirements: list[str] = field(default_factory=list)  # normalized, as hashed
    added: list[str] = field(default_factory=list)  # name==version of each package the build installed


def read_requirements(path: Path) -> list[str]:
    """The file's requirements, normalized (`packaging`'s form), in file order; RequirementsError if unusable."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RequirementsError(f"requirements file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RequirementsError(f"requirements file {path} cannot be read: {exc}") from None
    found: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        where = f"{path}:{number}: {line!r}"
        if line.startswith("-"):
            raise RequirementsError(
                f"{where}: pip options (-r, -e, --index-url...) are not supported; list one package per "
                "line, like 'tabulate==0.9.0' (the wheels come from the host's configured index)"
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            raise RequirementsError(f"{where} is not a package requirement: {exc}") from None
        if requirement.url:
            raise RequirementsError(f"{where}: direct URL requirements are not supported; name a version instead")
        found.append(str(requirement))
    if not found:
        raise RequirementsError(f"requirements file {path} lists no packages")
    return found


def derived_tag(flavor: str, content_hash: str) -> str:
    return f"{REPOSITORY}:{flavor}-req-{content_hash}"


def build_derived_image(
    requirements: Path,
    flavor: str = "cpu",
    base: str | None = None,
    force: bool = False,
    on_log: LogFn | None = None,
    images_dir: Path | None = None,
) -> DerivedImage:
    """Build (or find) `base` (default `cellforge-sandbox:<flavor>`) plus the packages of `requirements`."""
    started = time.monotonic()
    log = on_log or (lambda _line: None)
    if flavor not in FLAVORS:
        raise ImageBuildError(f"unknown image flavor {flavor!r}; expected one of {', '.join(FLAVORS)}")
    wanted = read_requirements(requirements)  # before Docker: a bad file is named even with no engine
    root = images_dir or IMAGES_DIR
    dockerfile = root / "derived" / "Dockerfile"
    if not dockerfile.is_file():
        raise ImageBuildError(f"{dockerfile} is missing; derived images cannot be built")
    client = _client()
    base_ref = base or f"{REPOSITORY}:{flavor}"
    base_id = _image_id(client, base_ref)
    if base_id is None:
        raise BaseImageError(
            f"base image {base_ref} is not in the local engine; build it first with "
            f"`cellforge images build --flavor {flavor}`"
        )
    digest = hashlib.sha256()
    for part in (f"base={base_id}", dockerfile.read_text(), *WHEEL_PLATFORMS, *wanted):
        digest.update(part.encode() + b"\0")
    content_hash = digest.hexdigest()[:12]
    tag = derived_tag(flavor, content_hash)

    if not force and _image_id(client, tag):
        log(f"{tag} is up to date")
        labels = client.inspect_image(tag)["Config"].get("Labels") or {}
        added = [item for item in labels.get("org.cellforge.added", "").split(";") if item]
        return DerivedImage(tag, base_ref, content_hash, False, time.monotonic() - started, wanted, added)

    installed = _installed_packages(client, base_ref)
    wheelhouse = root / ".wheelhouse" / f"req-{content_hash}"
    with tempfile.TemporaryDirectory(prefix="cellforge-derived-") as tmp:
        ctx = Path(tmp)
        (ctx / "requirements.txt").write_text("\n".join(wanted) + "\n")
        (ctx / "constraints.txt").write_text("".join(f"{name}=={version}\n" for name, version in installed.items()))
        _download(ctx, wheelhouse, root / ".wheelhouse" / flavor, requirements, base_ref, log)
        added = sorted(
            f"{name}=={version}" for name, version in (_wheel_name(w) for w in wheelhouse.glob("*.whl"))
            if name not in installed
        )
        (ctx / "Dockerfile").write_text(dockerfile.read_text())
        (ctx / "wheels").mkdir()
        for wheel in wheelhouse.glob("*.whl"):
            if _wheel_name(wheel)[0] not in installed:  # the base's own packages are already there
                (ctx / "wheels" / wheel.name).write_bytes(wheel.read_bytes())
        log(f"building {tag} from {base_ref}: adds {', '.join(added) or 'nothing'}")
        _docker_build(client, ctx, tag, base_ref, content_hash, flavor, log, labels={
            "org.cellforge.derived-from": base_ref, "org.cellforge.requirements": ";".join(wanted),
            "org.cellforge.added": ";".join(added)})
    _remove_install_stages(client, log)
    return DerivedImage(tag, base_ref, content_hash, True, time.monotonic() - started, wanted, added)


def _installed_packages(client: docker.APIClient, image: str) -> dict[str, str]:
    """{canonical name: version} of every distribution in the image's /opt/venv, read from a throwaway container."""
    probe = (
        "import importlib.metadata as m, json\n"
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image, "-c", probe],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise BaseImageError(f"cannot list the packages of {image}: {proc.stderr.strip()[-500:]}")
    listed = json.loads(proc.stdout.strip().splitlines()[-1])
    return {canonicalize_name(name): version for name, version in sorted(listed.items())}


def _download(ctx: Path, wheelhouse: Path, flavor_wheels: Path, source: Path, base_ref: str, log: LogFn) -> None:
    wheelhouse.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
        "--implementation", "cp", "--dest", str(wheelhouse), "--progress-bar", "off",
        "--requirement", str(ctx / "requirements.txt"), "--constraint", str(ctx / "constraints.txt"),
    ]
    if flavor_wheels.is_dir():  # the flavor's own wheels are local: no second download of numpy & co
        cmd += ["--find-links", str(flavor_wheels)]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    log(f"downloading wheels for {source} into {wheelhouse}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("ERROR:") and "Ignored the following" not in line]
        conflict = [line.strip() for line in lines if line.strip().startswith("The user requested")]
        tail = "\n".join((errors or lines)[-3:] + conflict[-4:])
        raise WheelhouseError(
            f"could not get wheels for {source} (pip download exited {proc.returncode}):\n{tail}\n"
            f"only Linux x86-64 wheels for CPython {WHEEL_PYTHON} are used (the image has no compiler), and "
            f"the packages {base_ref} already holds stay at their versions (pinned as constraints)"
        )


def _wheel_name(wheel: Path) -> tuple[str, str]:
    name, version = wheel.name.split("-")[:2]
    return canonicalize_name(name), version


def _remove_install_stages(client: docker.APIClient, log: LogFn) -> None:
    """The install stage holds the wheels; once the image exists it is only disk."""
    for image in client.images(filters={"dangling": True, "label": "org.cellforge.stage=derived-install"}):
        try:
            client.remove_image(image["Id"])
        except docker.errors.APIError as exc:
            log(f"kept install stage {image['Id'][:19]}: {exc.explanation or exc}")
