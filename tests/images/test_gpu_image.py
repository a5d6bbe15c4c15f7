"""The GPU sandbox without a GPU: what the image carries, and that a GPU request reaches the container.

A run on a real GPU is `benchmarks/gpu_check.py` (CUDA available in the sandbox, a matmul on the GPU).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import docker
import pytest

from sandbox import DEFAULT_GPU_IMAGE, DockerBackend
from sandbox.docker_backend import SANDBOX_LABEL
from sandbox.gpu_lock import LOCK_NAME, read_pins
from sandbox.images import IMAGES_DIR, BaseImageError, image_tag
from service.pipeline import DesignSettings

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def gpu_image(docker_image) -> str:
    """The GPU image of this checkout, if it was built here (several GB: never built by the tests)."""
    try:
        tag = image_tag("gpu")
    except BaseImageError as exc:
        pytest.skip(str(exc))
    engine = docker.from_env()
    try:
        engine.images.get(tag)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{tag} is not built here; `cellforge images build --flavor gpu` builds it")
    finally:
        engine.close()
    return tag


@pytest.mark.slow
def test_gpu_image_carries_the_locked_cuda_build_of_torch(gpu_image):
    probe = (
        "import json, torch\n"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'cudnn': torch.backends.cudnn.version(), 'available': torch.cuda.is_available()}))"
    )
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL", "--tmpfs", "/tmp",
         "--tmpfs", "/workspace:uid=1000,gid=1000", gpu_image, "python", "-c", probe],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    locked = read_pins(IMAGES_DIR / "gpu" / LOCK_NAME)
    assert facts["torch"].split("+")[0] == str(locked["torch"])
    assert facts["cuda"] and facts["cudnn"], "the image must carry a CUDA build of torch with cuDNN"
    assert facts["available"] is False  # no GPU was given: CUDA loads, finds no device, and says so


async def test_a_design_runs_gpus_and_runtime_reach_the_container(docker_image, tmp_path: Path):
    settings = DesignSettings(data=tmp_path / "d.h5ad", task="t", out=tmp_path / "run", gpus=1, runtime="runc")
    spec = settings.sandbox_settings().spec(tmp_path, timeout=60)
    assert spec.image == DEFAULT_GPU_IMAGE and spec.gpus == 1 and spec.runtime == "runc"
    # Created, never started: this machine has no GPU, the request must still be in the container.
    backend = DockerBackend()
    engine = docker.from_env()
    container_id = await backend.create_container(spec.model_copy(update={"image": docker_image}))
    attrs = engine.api.inspect_container(container_id)
    try:
        (request,) = attrs["HostConfig"]["DeviceRequests"]
        assert request["Count"] == 1 and request["Capabilities"] == [["gpu"]]
        assert attrs["HostConfig"]["Runtime"] == "runc"
    finally:
        engine.api.remove_container(container_id, force=True)
        shutil.rmtree(backend.runtime_root / attrs["Config"]["Labels"][SANDBOX_LABEL], ignore_errors=True)
        engine.close()
        await backend.close()
