"""Which CUDA build of torch the GPU image gets: chosen from what the package index serves, pinned.

PyPI's Linux torch wheels carry the CUDA runtime as separate wheels (`nvidia-*`, `cuda-*`, `triton`)
that torch pins exactly. A torch release whose dependency set is not complete on the index cannot be
installed, and finding that out with `pip download` costs gigabytes first. So the choice is made from
metadata only: the index's file listings (PEP 691 JSON, else PEP 503 HTML) and each wheel's
`.metadata` file (PEP 658), walked from torch through every requirement that applies to CPython 3.11
on x86-64 Linux, extras included. The newest torch whose whole set has a wheel for the sandbox's
platform wins, and the result is written to `images/gpu/torch-cuda.txt` (checked in), which the GPU
requirements include. Requirements already pinned by the shared closure (`filelock`, `sympy`...) are
only checked against their pin.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.parser import HeaderParser
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from .errors import SandboxError

DEFAULT_INDEX = "https://pypi.org/simple"
LOCK_NAME = "torch-cuda.txt"
# Bookworm's glibc is 2.36: every manylinux tag up to it (NVIDIA ships e.g. manylinux_2_27 wheels).
GLIBC_MINOR_MAX = 36
WHEEL_PLATFORMS = (
    "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
    *(f"manylinux_2_{minor}_x86_64" for minor in range(5, GLIBC_MINOR_MAX + 1)),
)
PYTHON = (3, 11)
PYTHON_FULL = "3.11.2"  # bookworm's python3
# The marker environment of the sandbox's interpreter.
MARKER_ENV = {
    "implementation_name": "cpython", "implementation_version": PYTHON_FULL, "os_name": "posix",
    "platform_machine": "x86_64", "platform_python_implementation": "CPython", "platform_release": "",
    "platform_system": "Linux", "platform_version": "", "python_full_version": PYTHON_FULL,
    "python_version": "3.11", "sys_platform": "linux",
}
_TIMEOUT_S = 30.0
# Each candidate costs a few metadata reads; older torch builds than these are not worth a lock.
_MAX_CANDIDATES = 8

LogFn = Callable[[str], None]


class LockError(SandboxError):
    """No torch build could be locked, or the lock no longer matches the index; says which wheel."""


def sandbox_tags() -> frozenset[Tag]:
    """Wheel tags the sandbox's CPython 3.11 on x86-64 Linux (glibc 2.36) can install."""
    platforms = list(WHEEL_PLATFORMS)
    return frozenset([
        *cpython_tags(PYTHON, abis=["cp311"], platforms=platforms),
        *compatible_tags(PYTHON, interpreter="cp311", platforms=platforms),
    ])


@dataclass(frozen=True)
class WheelFile:
    name: str
    version: Version
    filename: str
    url: str


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    filename: str
    required_by: str

    def line(self) -> str:
        # `===`: a local build (2.14.1+cpu from a find-links folder) must never satisfy the pin.
        return f"{self.name}==={self.version}"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            attributes = dict(attrs)
            if attributes.get("href"):
                self.links.append((attributes["href"] or "", attributes))


class PackageIndex:
    """Reads file listings and wheel metadata from one simple index, caching both."""

    def __init__(self, url: str | None = None, client: httpx.Client | None = None) -> None:
        self.url = (url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/") + "/"
        self.client = client or httpx.Client(timeout=_TIMEOUT_S, follow_redirects=True)
        self.tags = sandbox_tags()
        self._files: dict[str, list[WheelFile]] = {}
        self._metadata: dict[str, list[str]] = {}

    def close(self) -> None:
        self.client.close()

    def _get(self, url: str, **headers: str) -> httpx.Response:
        try:
            response = self.client.get(url, headers=headers)
        except httpx.HTTPError as exc:
            raise LockError(f"package index {self.url} did not answer for {url}: {exc}") from None
        return response

    def wheels(self, name: str) -> list[WheelFile]:
        """Wheels of `name` installable in the sandbox, newest version first."""
        key = canonicalize_name(name)
        if key in self._files:
            return self._files[key]
        page = urljoin(self.url, f"{key}/")
        response = self._get(page, Accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1")
        if response.status_code == 404:
            self._files[key] = []
            return []
        if response.status_code != 200:
            raise LockError(f"package index {self.url} answered {response.status_code} for {page}")
        if "json" in response.headers.get("content-type", ""):
            entries = [
                (urljoin(page, f["url"]), f["filename"], f.get("requires-python") or "", bool(f.get("yanked")))
                for f in response.json()["files"]
            ]
        else:
            parser = _Links()
            parser.feed(response.text)
            entries = []
            for href, attrs in parser.links:
                url = urljoin(page, href).partition("#")[0]
                entries.append((url, Path(urlsplit(url).path).name, attrs.get("data-requires-python") or "",
                                "data-yanked" in attrs))
        found = []
        for url, filename, requires_python, yanked in entries:
            if yanked or not filename.endswith(".whl"):
                continue
            try:
                _, version, _, tags = parse_wheel_filename(filename)
            except (InvalidWheelFilename, InvalidVersion):
                continue
            if tags.isdisjoint(self.tags):
                continue
            if requires_python and Version(PYTHON_FULL) not in SpecifierSet(requires_python):
                continue
            found.append(WheelFile(key, version, filename, url))
        found.sort(key=lambda w: w.version, reverse=True)
        self._files[key] = found
        return found

    def requirements(self, wheel: WheelFile) -> list[str]:
        """`Requires-Dist` of a wheel: its PEP 658 `.metadata` file, else its METADATA member read with
        HTTP range requests (the zip's central directory and one small entry, never the whole wheel)."""
        if wheel.url not in self._metadata:
            parts = urlsplit(wheel.url)
            response = self._get(urlunsplit(parts._replace(path=parts.path + ".metadata", fragment="")))
            text = response.text if response.status_code == 200 else self._metadata_by_range(wheel)
            self._metadata[wheel.url] = HeaderParser().parsestr(text).get_all("Requires-Dist") or []
        return self._metadata[wheel.url]

    def _metadata_by_range(self, wheel: WheelFile) -> str:
        try:
            with zipfile.ZipFile(_RemoteFile(self.client, wheel.url)) as archive:
                member = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
                return archive.read(member).decode("utf-8")
        except (httpx.HTTPError, zipfile.BadZipFile, StopIteration, OSError) as exc:
            raise LockError(f"could not read the metadata of {wheel.filename} from {wheel.url}: {exc!r}") from None


class _RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP range requests, in cached blocks."""

    BLOCK = 1 << 20

    def __init__(self, client: httpx.Client, url: str) -> None:
        self.client, self.url, self.pos = client, url, 0
        self.blocks: dict[int, bytes] = {}
        response = client.get(url, headers={"Range": f"bytes=-{self.BLOCK}"})
        total = response.headers.get("content-range", "").rpartition("/")[2]
        if response.status_code != 206 or not total.isdigit():
            raise OSError(f"the server does not answer range requests for {url} ({response.status_code})")
        self.size = int(total)
        tail_start = self.size - len(response.content)
        self._tail = (tail_start, response.content)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self.blocks:
            start = index * self.BLOCK
            end = min(start + self.BLOCK, self.size) - 1
            tail_start, tail = self._tail
            if start >= tail_start:
                self.blocks[index] = tail[start - tail_start:end + 1 - tail_start]
            else:
                response = self.client.get(self.url, headers={"Range": f"bytes={start}-{end}"})
                response.raise_for_status()
                self.blocks[index] = response.content
        return self.blocks[index]

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self.size - self.pos)
        got = 0
        while got < want:
            index, offset = divmod(self.pos + got, self.BLOCK)
            chunk = self._block(index)[offset:offset + want - got]
            if not chunk:
                break
            buffer[got:got + len(chunk)] = chunk
            got += len(chunk)
        self.pos += got
        return got


def _applies(requirement: Requirement, extras: Iterable[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**MARKER_ENV, "extra": extra}) for extra in (*extras, ""))


def read_pins(path: Path) -> dict[str, Version]:
    """Exact pins (`name==v` / `name===v`) of a requirements file, by canonical name."""
    pins: dict[str, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9._-]+)\s*===?\s*([^\s;]+)$", line)
        if match:
            pins[canonicalize_name(match.group(1))] = Version(match.group(2))
    return pins


def closure(
    index: PackageIndex, torch: WheelFile, shared: dict[str, Version], locked: dict[str, Version] | None = None
) -> list[Pin]:
    """Every wheel `torch` needs beyond the shared pins: the `locked` version where one is given
    (checking it), else the newest one its first requirer allows.

    Raises LockError naming the first requirement the index cannot serve or the pins cannot meet.
    """
    pins: dict[str, Pin] = {"torch": Pin("torch", str(torch.version), torch.filename, "")}
    chosen: dict[str, WheelFile] = {"torch": torch}
    queue: list[tuple[WheelFile, tuple[str, ...]]] = [(torch, ())]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while queue:
        wheel, extras = queue.pop(0)
        if (wheel.name, extras) in seen:
            continue
        seen.add((wheel.name, extras))
        who = f"{wheel.name}=={wheel.version}"
        for text in index.requirements(wheel):
            requirement = Requirement(text)
            if not _applies(requirement, extras):
                continue
            name = canonicalize_name(requirement.name)
            if name in shared:
                if shared[name] not in requirement.specifier:
                    raise LockError(f"{who} requires {requirement}, but the shared closure pins {name}=={shared[name]}")
                continue
            if name not in chosen:
                served = [w for w in index.wheels(name) if w.version in requirement.specifier]
                if locked is not None and name in locked:
                    served = [w for w in served if w.version == locked[name]]
                if not served:
                    pinned = f" (locked at {locked[name]})" if locked and name in locked else ""
                    raise LockError(
                        f"{who} requires {requirement}{pinned}, and {index.url} serves no wheel of it for "
                        "CPython 3.11 on x86-64 Linux"
                    )
                chosen[name] = served[0]
                pins[name] = Pin(name, str(served[0].version), served[0].filename, who)
            elif chosen[name].version not in requirement.specifier:
                raise LockError(f"{who} requires {requirement}, which conflicts with {name}=={chosen[name].version}")
            queue.append((chosen[name], tuple(sorted(requirement.extras))))
    return sorted(pins.values(), key=lambda p: (p.name != "torch", p.name))


def choose_torch(
    index: PackageIndex, shared: dict[str, Version], torch_spec: str = "", log: LogFn = lambda _line: None
) -> list[Pin]:
    """The closure of the newest torch (within `torch_spec`) whose whole CUDA dependency set is served."""
    specifier = SpecifierSet(torch_spec)
    candidates = [w for w in index.wheels("torch") if w.version in specifier and not w.version.local]
    if not candidates:
        raise LockError(f"{index.url} serves no torch wheel {torch_spec} for CPython 3.11 on x86-64 Linux")
    problems = []
    for torch in candidates[:_MAX_CANDIDATES]:
        try:
            pins = closure(index, torch, shared)
        except LockError as exc:
            problems.append(f"torch {torch.version}: {exc}")
            log(problems[-1])
            continue
        if any(p.name.startswith(("nvidia-", "cuda-")) for p in pins):
            return pins
        problems.append(f"torch {torch.version}: not a CUDA build (it requires no nvidia-*/cuda-* wheel)")
    raise LockError(
        f"none of the {min(len(candidates), _MAX_CANDIDATES)} newest torch builds has its whole CUDA dependency "
        "set on the index:\n" + "\n".join(problems)
    )


def render_lock(pins: list[Pin], index_url: str, torch_spec: str = "") -> str:
    within = f" within torch{torch_spec}" if torch_spec else ""
    lines = [
        "# The CUDA build of torch and every wheel it pulls in, for CPython 3.11 on x86-64 Linux.",
        "# Generated by `cellforge images lock --flavor gpu` from the index's metadata only",
        f"# ({index_url}): the newest torch{within} whose whole dependency set is served.",
        "# Do not edit by hand; the build checks it against the index before downloading.",
        "",
    ]
    for pin in pins:
        why = f"  # {pin.filename}" + (f"; for {pin.required_by}" if pin.required_by else "")
        lines.append(pin.line() + why)
    return "\n".join(lines) + "\n"


def lock_path(flavor_dir: Path) -> Path:
    return flavor_dir / LOCK_NAME


def verify_lock(index: PackageIndex, flavor_dir: Path) -> list[Pin]:
    """Check that the checked-in lock is served and whole: every locked wheel exists for the sandbox's
    platform, meets what its requirers ask, and nothing is missing or left over. LockError otherwise,
    naming the wheel."""
    path = lock_path(flavor_dir)
    if not path.is_file():
        raise LockError(f"{path} is missing; create it with `cellforge images lock --flavor gpu`")
    locked = read_pins(path)
    if "torch" not in locked:
        raise LockError(f"{path} pins no torch; regenerate it with `cellforge images lock --flavor gpu`")
    missing = [f"{name}=={v}" for name, v in locked.items() if not any(w.version == v for w in index.wheels(name))]
    if missing:
        raise LockError(
            f"{index.url} serves no wheel for CPython 3.11 on x86-64 Linux of {', '.join(missing)} "
            f"(pinned in {path}); run `cellforge images lock --flavor gpu` to choose a torch build whose "
            "whole set is served"
        )
    torch = next(w for w in index.wheels("torch") if w.version == locked["torch"])
    try:
        pins = closure(index, torch, read_pins(flavor_dir / "requirements.txt"), locked)
    except LockError as exc:
        raise LockError(f"{path} is not whole: {exc}; run `cellforge images lock --flavor gpu`") from None
    needed = {p.name for p in pins}
    if needed != set(locked):
        lacks, extra = sorted(needed - set(locked)), sorted(set(locked) - needed)
        raise LockError(
            f"{path} is not whole for torch {locked['torch']}: "
            + "; ".join([*(["it lacks " + ", ".join(lacks)] if lacks else []),
                         *(["it pins unneeded " + ", ".join(extra)] if extra else [])])
            + "; run `cellforge images lock --flavor gpu`"
        )
    return pins


def pip_constraint(name: str) -> str:
    """The specifier pip's configured constraint files (PIP_CONSTRAINT, pip.conf) put on `name`.

    The wheelhouse is filled by pip, so a torch those constraints exclude could never be downloaded.
    """
    files = os.environ.get("PIP_CONSTRAINT", "").split()
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith(".constraint"):
            files += value.strip("'\"").split()
    specifiers = []
    for file in files:
        try:
            lines = Path(file.removeprefix("file://")).read_text().splitlines()
        except OSError:
            continue
        for raw in lines:
            try:
                requirement = Requirement(raw.split("#", 1)[0].strip())
            except InvalidRequirement:
                continue
            if canonicalize_name(requirement.name) == canonicalize_name(name) and _applies(requirement, ()):
                specifiers.append(str(requirement.specifier))
    return ",".join(s for s in specifiers if s)


def write_lock(
    flavor_dir: Path, torch_spec: str | None = None, index: PackageIndex | None = None, log: LogFn = lambda _l: None
) -> list[Pin]:
    """Choose the torch build (see `choose_torch`; within pip's own constraints on torch unless
    `torch_spec` is given) and write the flavor's lock file."""
    if torch_spec is None:
        torch_spec = pip_constraint("torch")
        if torch_spec:
            log(f"pip's configured constraints limit torch to {torch_spec}")
    owned = index is None
    index = index or PackageIndex()
    try:
        pins = choose_torch(index, read_pins(flavor_dir / "requirements.txt"), torch_spec, log)
        lock_path(flavor_dir).write_text(render_lock(pins, index.url.rstrip("/"), torch_spec))
        return pins
    finally:
        if owned:
            index.close()
