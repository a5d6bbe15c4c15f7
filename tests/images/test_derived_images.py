"""`cellforge images build --requirements`: a sandbox image plus a requirements file's packages, built
offline from a host-side wheelhouse, cached by content, with clear errors for unusable files."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandbox.derived_images import RequirementsError, build_derived_image, read_requirements
from sandbox.images import IMAGES_DIR, WheelhouseError
from service.cli import app


@pytest.fixture
def images_copy(tmp_path: Path) -> Path:
    """images/derived in a private folder, so the test's wheelhouse lands in tmp_path."""
    shutil.copytree(IMAGES_DIR / "derived", tmp_path / "images" / "derived")
    return tmp_path / "images"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "lists no packages"),
        ("# only a comment\n\n", "lists no packages"),
        ("tabulate==0.9.0\n--index-url http://example.invalid/simple\n", r":2: .*pip options"),
        ("tabulate==0.9.0\n-r other.txt\n", r":2: .*pip options"),
        ("tabulate ==> 0.9\n", r":1: 'tabulate ==> 0.9' is not a package requirement"),
        ("tabulate @ https://example.invalid/tabulate.whl\n", r":1: .*direct URL requirements are not supported"),
    ],
)
def test_unusable_requirements_are_named_with_their_line(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text(text)
    with pytest.raises(RequirementsError, match=problem):
        read_requirements(path)


def test_requirements_are_normalized_so_comments_and_spacing_do_not_matter(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text("# tables\nTabulate >= 0.9 ,<1  # pretty\n\nsix==1.17.0\n")
    assert read_requirements(path) == ["Tabulate<1,>=0.9", "six==1.17.0"]


def test_cli_bad_requirements_file_is_one_json_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    result = CliRunner().invoke(app, ["images", "build", "--requirements", str(missing), "--json"])
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["ok"] is False and document["error"] == "RequirementsError"
    assert f"{missing} does not exist" in document["message"]


def _run(image: str, code: str) -> str:
    proc = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", image, "python", "-c", code],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.docker
@pytest.mark.slow
def test_derived_image_adds_the_package_offline_and_is_cached(docker_image: str, images_copy: Path) -> None:
    requirements = images_copy / "requirements.txt"
    requirements.write_text("tabulate==0.9.0\n")
    first = build_derived_image(requirements, "cpu", images_dir=images_copy, force=True)
    assert first.built and first.added == ["tabulate==0.9.0"]
    assert first.tag == f"cellforge-sandbox:cpu-req-{first.content_hash}" and first.base == docker_image

    probe = (
        "import importlib.util, json, os, numpy, tabulate\n"
        "print(json.dumps([tabulate.tabulate([[1, 2]], tablefmt='plain'), os.getuid(), numpy.__version__,\n"
        "    os.path.exists(importlib.util.cache_from_source(tabulate.__file__)), os.path.exists('/build')]))"
    )
    table, uid, numpy_version, compiled, wheels_left = json.loads(_run(first.tag, probe))
    assert (table, uid, compiled, wheels_left) == ("1  2", 1000, True, False)
    assert numpy_version == _run(docker_image, "import numpy; print(numpy.__version__)"), "the base's numpy stays"

    # The same packages written differently are the same content: a cache hit, nothing rebuilt.
    requirements.write_text("# tables\n  tabulate == 0.9.0   # pinned\n")
    again = build_derived_image(requirements, "cpu", images_dir=images_copy)
    assert not again.built and again.tag == first.tag and again.added == first.added
    assert again.seconds < 5

    result = CliRunner().invoke(app, ["images", "build", "-r", str(requirements), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["built"] is False and document["tag"] == first.tag


@pytest.mark.docker
@pytest.mark.slow
def test_requirement_that_would_change_the_base_or_does_not_exist_is_named(
    docker_image: str, images_copy: Path
) -> None:
    requirements = images_copy / "requirements.txt"
    requirements.write_text("numpy<2\n")
    with pytest.raises(WheelhouseError, match=r"numpy") as info:
        build_derived_image(requirements, "cpu", images_dir=images_copy)
    assert "stay at their versions" in str(info.value)

    requirements.write_text("cellforge-no-such-package==0.0.1\n")
    with pytest.raises(WheelhouseError, match="cellforge-no-such-package"):
        build_derived_image(requirements, "cpu", images_dir=images_copy)
