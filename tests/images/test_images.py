"""The sandbox image build: content tags, caching, and what the built image promises at run time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import docker
import pytest
from typer.testing import CliRunner

from sandbox.images import (
    IMAGES_DIR,
    BaseImageError,
    DockerUnavailable,
    ImageBuildError,
    WheelhouseError,
    bootstrap_debian_base,
    build_image,
    fill_wheelhouse,
    image_tag,
)
from service.cli import app

pytestmark = pytest.mark.docker

REQUIRED_MODULES = [
    "ipykernel", "numpy", "scipy", "pandas", "anndata", "h5py", "sklearn", "torch", "pytest", "scanpy", "matplotlib",
]


@pytest.fixture
def images_copy(tmp_path: Path) -> Path:
    """A private copy of images/cpu, so a test can edit it without touching the real one."""
    shutil.copytree(IMAGES_DIR / "cpu", tmp_path / "images" / "cpu")
    return tmp_path / "images"


def _image_id(ref: str) -> str:
    return docker.APIClient().inspect_image(ref)["Id"]


def _run_read_only(image: str, code: str, *flags: str, timeout: float = 120) -> str:
    """`python -c code` in a container as a sandbox gets it (no network, the root read-only, only /tmp and
    /workspace, owned by uid 1000, writable on tmpfs), `flags` added; asserts it succeeded, returns stdout."""
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", *flags, "--tmpfs", "/tmp",
         "--tmpfs", "/workspace:uid=1000,gid=1000", image, "python", "-c", code],
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_content_tag_tracks_dockerfile_and_requirements_only(docker_image: str, images_copy: Path) -> None:
    dockerfile, requirements = images_copy / "cpu" / "Dockerfile", images_copy / "cpu" / "requirements.txt"
    original = image_tag("cpu", images_dir=images_copy)
    assert original == image_tag("cpu"), "an identical copy of images/cpu must give the same tag"
    assert original.startswith("cellforge-sandbox:cpu-") and len(original.rsplit("-", 1)[1]) == 12

    os.utime(dockerfile, (0, 0))  # a touched but unchanged file is not a change
    assert image_tag("cpu", images_dir=images_copy) == original

    dockerfile.write_text(dockerfile.read_text() + "\nLABEL extra=1\n")
    edited_dockerfile = image_tag("cpu", images_dir=images_copy)
    assert edited_dockerfile != original

    shutil.copy2(IMAGES_DIR / "cpu" / "Dockerfile", dockerfile)
    assert image_tag("cpu", images_dir=images_copy) == original, "reverting the edit restores the tag"

    requirements.write_text(requirements.read_text().replace("pytest==", "pytest<=", 1))
    edited_requirements = image_tag("cpu", images_dir=images_copy)
    assert edited_requirements not in (original, edited_dockerfile)


def test_content_tag_tracks_the_base_image(docker_image: str) -> None:
    assert image_tag("cpu", base=docker_image) != image_tag("cpu")


def test_unchanged_image_is_not_rebuilt(docker_image: str) -> None:
    first = build_image("cpu")  # builds only if the checkout changed since the engine's image
    id_before = _image_id(first.tag)
    again = build_image("cpu")
    assert not again.built
    assert again.seconds < 5
    assert (again.tag, again.content_hash) == (first.tag, first.content_hash)
    assert again.tag == image_tag("cpu")
    assert _image_id(again.tag) == _image_id(again.alias) == id_before


def test_cli_build_json_reports_up_to_date(docker_image: str) -> None:
    build_image("cpu")
    result = CliRunner().invoke(app, ["images", "build", "--flavor", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["built"] is False
    assert summary["alias"] == "cellforge-sandbox:cpu" and summary["tag"] == image_tag("cpu")


@pytest.mark.slow
def test_image_runs_offline_read_only_as_uid_1000(docker_image: str) -> None:
    probe = f"""
import importlib, importlib.util, json, os, sys
mods = {{m: importlib.import_module(m) for m in {REQUIRED_MODULES!r}}}
print(json.dumps({{
    "uid": os.getuid(), "gid": os.getgid(), "version": list(sys.version_info[:2]),
    "prefix": sys.prefix, "cwd": os.getcwd(),
    "env": {{k: os.environ.get(k) for k in ("HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED",
                                         "IPYTHONDIR", "MPLCONFIGDIR", "NUMBA_CACHE_DIR")}},
    "pyc": all(os.path.exists(importlib.util.cache_from_source(m.__file__)) for m in mods.values()),
    "torch_cuda_build": mods["torch"].version.cuda,
    "wheels_left": os.path.exists("/build"),
}}))
"""
    facts = _last_json(_run_read_only(docker_image, probe, "--cap-drop", "ALL", "--security-opt", "no-new-privileges"))
    assert (facts["uid"], facts["gid"]) == (1000, 1000)
    assert facts["version"] == [3, 11]
    assert facts["prefix"] == "/opt/venv" and facts["cwd"] == "/workspace"
    assert facts["env"] == {
        "HOME": "/workspace", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1",
        "IPYTHONDIR": "/tmp/.ipython", "MPLCONFIGDIR": "/tmp/.mpl", "NUMBA_CACHE_DIR": "/tmp/.numba",
    }
    assert facts["pyc"], "the venv's bytecode must be compiled at build time"
    assert facts["torch_cuda_build"] is None, "the CPU image must carry the CPU build of torch"
    assert not facts["wheels_left"], "the wheelhouse must not end up in the final image"


@pytest.mark.slow
def test_scanpy_and_matplotlib_work_offline_read_only(docker_image: str) -> None:
    # The scverse basics a user's notebook starts with: preprocess a small AnnData with scanpy and save
    # a scanpy plot through matplotlib, on the read-only root with only the tmpfs mounts writable.
    script = (
        "import json, os, numpy as np, anndata, scanpy as sc, matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "counts = np.random.default_rng(0).poisson(2.0, (200, 40)).astype('float32')\n"
        "adata = anndata.AnnData(counts)\n"
        "sc.pp.normalize_total(adata); sc.pp.log1p(adata); sc.pp.pca(adata, n_comps=5)\n"
        "sc.pl.pca(adata, show=False); plt.savefig('/workspace/pca.png')\n"
        "with open('/workspace/pca.png', 'rb') as f: magic = f.read(8)\n"
        "print(json.dumps({'pca': list(adata.obsm['X_pca'].shape), 'png': magic == b'\\x89PNG\\r\\n\\x1a\\n',\n"
        "    'backend': matplotlib.get_backend().lower()}))\n"
    )
    facts = _last_json(_run_read_only(docker_image, script, timeout=300))
    assert facts == {"pca": [200, 5], "png": True, "backend": "agg"}


def test_kernel_runs_code_in_image_read_only(docker_image: str) -> None:
    # A real kernel, started by jupyter_client inside the container: the read-only root must leave
    # it everything it writes (connection file, IPython profile) on the tmpfs mounts.
    driver = (
        "from jupyter_client.manager import start_new_kernel\n"
        "km, kc = start_new_kernel(startup_timeout=60)\n"
        "out = []\n"
        "kc.execute_interactive('import numpy; print(int(numpy.arange(7).sum()) * 2)', timeout=60,\n"
        "    output_hook=lambda m: out.append(m['content'].get('text', '')))\n"
        "kc.stop_channels(); km.shutdown_kernel(now=True)\n"
        "print('KERNEL SAID', ''.join(out).strip())\n"
    )
    assert "KERNEL SAID 42" in _run_read_only(docker_image, driver)


def test_unknown_flavor_and_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="unknown image flavor 'tpu'.*cpu, gpu"):
        image_tag("tpu")
    (tmp_path / "cpu").mkdir()
    with pytest.raises(ImageBuildError, match=r"cpu/Dockerfile is missing"):
        build_image("cpu", images_dir=tmp_path)


def test_missing_engine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(DockerUnavailable, match="no Docker engine answers"):
        build_image("cpu")


def test_unpullable_base_is_a_clear_error(docker_image: str) -> None:
    with pytest.raises(BaseImageError, match="'cellforge-test/no-such-base:0' is neither in the local engine"):
        build_image("cpu", base="cellforge-test/no-such-base:0")


def test_missing_debootstrap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, docker_image: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BaseImageError, match="debootstrap is not installed"):
        bootstrap_debian_base(docker.APIClient(), print)


def test_unfillable_wheelhouse_names_the_requirement(images_copy: Path) -> None:
    (images_copy / "cpu" / "requirements.txt").write_text("cellforge-no-such-package==0.0.1\n")
    with pytest.raises(WheelhouseError, match="cellforge-no-such-package") as info:
        fill_wheelhouse("cpu", images_dir=images_copy)
    assert "requirements.txt" in str(info.value)
