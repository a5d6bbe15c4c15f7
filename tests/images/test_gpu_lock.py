"""The GPU image's torch lock: chosen from what an index serves, checked before any download.

The checked-in lock is verified against PyPI itself (metadata only: file listings and `.metadata`
files or a few range requests, seconds). The choice between torch builds is shown on a small index
served on loopback, whose wheels are real zip files with real METADATA.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sandbox.gpu_lock import LOCK_NAME, LockError, PackageIndex, choose_torch, read_pins, verify_lock, write_lock
from sandbox.images import IMAGES_DIR, WheelhouseError, fill_wheelhouse


@pytest.fixture(scope="module")
def pypi() -> Iterator[PackageIndex]:
    index = PackageIndex()
    yield index
    index.close()


class _Unclosed:
    """An index the caller may close: the module's shared index stays open for the tests after."""

    def __init__(self, index: PackageIndex) -> None:
        self._index = index

    def __getattr__(self, name: str):
        return getattr(self._index, name)

    def close(self) -> None:
        pass


@pytest.fixture
def gpu_copy(tmp_path: Path) -> Path:
    """A private copy of images/gpu, so a test can edit its lock."""
    shutil.copytree(IMAGES_DIR / "gpu", tmp_path / "images" / "gpu")
    return tmp_path / "images" / "gpu"


def test_checked_in_lock_is_served_by_pypi_and_whole(pypi):
    pins = verify_lock(pypi, IMAGES_DIR / "gpu")
    names = {p.name for p in pins}
    assert "torch" in names and any(n.startswith("nvidia-cudnn") for n in names) and "triton" in names
    locked = read_pins(IMAGES_DIR / "gpu" / LOCK_NAME)
    assert {p.name: str(p.version) for p in pins} == {n: str(v) for n, v in locked.items()}
    # The GPU requirements take torch from the lock, and the shared closure pins no CUDA wheel itself.
    requirements = (IMAGES_DIR / "gpu" / "requirements.txt").read_text()
    assert f"-r {LOCK_NAME}" in requirements.splitlines()
    assert not set(read_pins(IMAGES_DIR / "gpu" / "requirements.txt")) & set(locked)


def test_a_pin_pypi_does_not_serve_is_named(pypi, gpu_copy):
    lock = gpu_copy / LOCK_NAME
    lock.write_text(re.sub(r"^nvidia-cudnn-cu13===\S+", "nvidia-cudnn-cu13===0.0.0.1", lock.read_text(), flags=re.M))
    with pytest.raises(LockError, match=r"serves no wheel .* of nvidia-cudnn-cu13==0\.0\.0\.1 .*images lock --flavor gpu"):
        verify_lock(pypi, gpu_copy)


def test_a_lock_missing_a_wheel_torch_needs_is_not_whole(pypi, gpu_copy):
    lock = gpu_copy / LOCK_NAME
    lock.write_text(re.sub(r"^triton===.*\n", "", lock.read_text(), flags=re.M))
    with pytest.raises(LockError, match=r"not whole for torch .*: it lacks triton"):
        verify_lock(pypi, gpu_copy)


def test_the_wheelhouse_checks_the_lock_before_downloading(gpu_copy):
    lock = gpu_copy / LOCK_NAME
    lock.write_text(re.sub(r"^nvidia-nccl-cu13===\S+", "nvidia-nccl-cu13===0.0.0.1", lock.read_text(), flags=re.M))
    with pytest.raises(WheelhouseError, match=r"nvidia-nccl-cu13==0\.0\.0\.1"):
        fill_wheelhouse("gpu", images_dir=gpu_copy.parent)
    assert not list((gpu_copy.parent / ".wheelhouse" / "gpu").glob("*.whl")), "nothing may be downloaded"


# ------------------------------------------------------------------ a small index served on loopback


def _wheel(name: str, version: str, tag: str, requires: list[str]) -> tuple[str, bytes]:
    dist = name.replace("-", "_")
    filename = f"{dist}-{version}-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{dist}/__init__.py", "# " + "x" * 5000)
        archive.writestr(f"{dist}-{version}.dist-info/METADATA", metadata)
    return filename, buffer.getvalue()


class _Index(BaseHTTPRequestHandler):
    """PEP 503 pages and wheels, with Range support; `.metadata` files only for some wheels."""

    files: dict[str, bytes] = {}
    pages: dict[str, str] = {}

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("#")[0]
        if path in self.pages:
            body, status, headers = self.pages[path].encode(), 200, {"Content-Type": "text/html"}
        elif path in self.files:
            body, status, headers = self.files[path], 200, {}
            ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
            if ranged:
                size = len(body)
                start, end = ranged.groups()
                first = size - int(end) if not start else int(start)
                last = size - 1 if not start or not end else min(int(end), size - 1)
                body, status = body[max(first, 0):last + 1], 206
                headers["Content-Range"] = f"bytes {max(first, 0)}-{last}/{size}"
        else:
            body, status, headers = b"", 404, {}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def small_index() -> Iterator[str]:
    """torch 2.1 needs nvidia-x==1 (not served for Linux x86-64); torch 2.0 needs nvidia-y[extra]==1,
    whose extra pulls nvidia-z; torch 1.9 is a CPU-only build."""
    linux = "py3-none-manylinux_2_27_x86_64"
    wheels = [
        _wheel("torch", "2.1.0", "cp311-cp311-manylinux_2_28_x86_64", ["nvidia-x==1; platform_system == 'Linux'",
                                                                       "filelock"]),
        _wheel("torch", "2.0.0", "cp311-cp311-manylinux_2_28_x86_64", ["nvidia-y[extra]==1; sys_platform == 'linux'",
                                                                       "windows-only; sys_platform == 'win32'"]),
        _wheel("torch", "1.9.0", "cp311-cp311-manylinux_2_28_x86_64", []),
        _wheel("nvidia-x", "1", "py3-none-manylinux_2_27_aarch64", []),
        _wheel("nvidia-y", "1", linux, ["nvidia-z>=2; extra == 'extra'"]),
        _wheel("nvidia-z", "2", linux, []),
        _wheel("nvidia-z", "3", linux, []),
        _wheel("nvidia-z", "4", "py3-none-win_amd64", []),
    ]
    files: dict[str, bytes] = {}
    links: dict[str, list[str]] = {}
    for number, (filename, data) in enumerate(wheels):
        files[f"/files/{filename}"] = data
        if number % 2 == 0:  # half of them without a .metadata file: read by range requests instead
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                member = next(n for n in archive.namelist() if n.endswith("METADATA"))
                files[f"/files/{filename}.metadata"] = archive.read(member)
        project = filename.split("-")[0].replace("_", "-")
        links.setdefault(project, []).append(f'<a href="/files/{filename}">{filename}</a>')
    _Index.files = files
    _Index.pages = {f"/simple/{p}/": "<html><body>" + "".join(a) + "</body></html>" for p, a in links.items()}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Index)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


def test_the_newest_torch_whose_whole_set_is_served_wins(small_index, tmp_path):
    (tmp_path / "requirements.txt").write_text("filelock==3.0\n-r torch-cuda.txt\n")
    tried: list[str] = []
    index = PackageIndex(small_index)
    try:
        pins = write_lock(tmp_path, torch_spec="", index=index, log=tried.append)
        assert [(p.name, p.version) for p in pins] == [("torch", "2.0.0"), ("nvidia-y", "1"), ("nvidia-z", "3")]
        assert tried == [f"torch 2.1.0: torch==2.1.0 requires nvidia-x==1; platform_system == \"Linux\", and "
                         f"{small_index}/ serves no wheel of it for CPython 3.11 on x86-64 Linux"]
        lock = (tmp_path / LOCK_NAME).read_text()
        assert "torch===2.0.0" in lock and "nvidia-z===3" in lock and "for nvidia-y==1" in lock
        assert [p.name for p in verify_lock(index, tmp_path)] == ["torch", "nvidia-y", "nvidia-z"]

        with pytest.raises(LockError, match=r"(?s)none of the 1 newest torch builds .*torch 1\.9\.0: not a CUDA build"):
            choose_torch(index, {}, "<2")
    finally:
        index.close()


def test_cli_checks_the_lock_and_prints_its_pins(pypi, monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app, images_cmd

    # The CLI reads the same index through the module's client, whose listings the first test already
    # fetched (reading PyPI's metadata again is seconds of network); the CLI's close() leaves it open.
    monkeypatch.setattr(images_cmd, "PackageIndex", lambda: _Unclosed(pypi))
    result = CliRunner().invoke(app, ["images", "lock", "--flavor", "gpu", "--check", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["lock"].endswith("images/gpu/torch-cuda.txt")
    assert summary["pins"] == {n: str(v) for n, v in read_pins(IMAGES_DIR / "gpu" / LOCK_NAME).items()}
