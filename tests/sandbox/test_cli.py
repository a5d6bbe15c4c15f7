"""`cellforge sandbox run` as a user runs it: a subprocess, the real engine, real kernels."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

CLI = [str(Path(sys.executable).with_name("cellforge"))]
REPO = Path(__file__).resolve().parents[2]


def cellforge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def script(tmp_path: Path, code: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(code)
    return str(path)


@pytest.mark.slow
@pytest.mark.docker
def test_run_streams_output_live_and_reports_ok(docker_image, tmp_path):
    path = script(tmp_path, "import time\nprint('first', flush=True)\ntime.sleep(2)\nprint('second', end='')\n")
    proc = subprocess.Popen(
        [*CLI, "sandbox", "run", path, "--image", docker_image, "--memory", "512m", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    first = proc.stdout.readline()
    first_at = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    # 'first' reached the terminal while the script still slept, not at the end.
    assert first == "first\n"
    assert time.monotonic() - first_at > 1.0
    lines = rest.splitlines()
    assert lines[0] == "second"
    summary = json.loads(lines[-1])
    assert summary["outcome"] == "ok" and summary["ename"] is None and summary["died_cause"] is None
    assert summary["stdout_bytes"] == len("first\nsecond")
    assert summary["duration_ms"] >= 2000 and summary["isolated"] is True


@pytest.mark.slow
@pytest.mark.docker
def test_run_exit_codes_follow_the_outcome(docker_image, tmp_path):
    failing = cellforge("sandbox", "run", script(tmp_path, "1 / 0\n"), "--image", docker_image, "--json")
    assert failing.returncode == 1
    summary = last_json(failing.stdout)
    assert summary["outcome"] == "error" and summary["ename"] == "ZeroDivisionError"
    assert "division by zero" in summary["evalue"]
    assert "ZeroDivisionError" in failing.stderr  # the traceback is shown live

    slow = cellforge(
        "sandbox", "run", script(tmp_path, "import time\ntime.sleep(60)\n"), "--image", docker_image,
        "--timeout", "1", "--json",
    )
    assert slow.returncode == 124
    assert last_json(slow.stdout)["outcome"] == "timeout"

    hungry = cellforge(
        "sandbox", "run", script(tmp_path, "x = b'x' * (600 << 20)\n"), "--image", docker_image,
        "--memory", "256m", "--json",
    )
    assert hungry.returncode == 137
    summary = last_json(hungry.stdout)
    assert summary["outcome"] == "died" and "out of memory" in summary["died_cause"]


def test_run_on_the_local_backend(tmp_path):
    res = cellforge("sandbox", "run", script(tmp_path, "print(6 * 7)\n"), "--backend", "local", "--json")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "42"
    summary = json.loads(lines[-1])
    assert summary["outcome"] == "ok" and summary["backend"] == "local" and summary["isolated"] is False


def test_run_rejects_bad_input_with_a_clear_message(tmp_path):
    # In-process (same parsing and error paths, without paying the CLI's start-up twice).
    runner = CliRunner()
    missing = runner.invoke(app, ["sandbox", "run", str(tmp_path / "nope.py"), "--backend", "local"])
    assert missing.exit_code == 2
    assert "nope.py" in missing.stderr and "No such file" in missing.stderr
    bad_memory = runner.invoke(app, ["sandbox", "run", script(tmp_path, "1\n"), "--backend", "local", "--memory", "lots"])
    assert bad_memory.exit_code == 2
    assert "memory" in bad_memory.stderr and "'lots'" in bad_memory.stderr
    assert missing.exception is None or isinstance(missing.exception, SystemExit)
    assert bad_memory.exception is None or isinstance(bad_memory.exception, SystemExit)


@pytest.mark.docker
@pytest.mark.slow  # runs the whole benchmark (the slowest test of the fast loop)
def test_bench_json_has_every_figure(docker_image):
    res = cellforge(
        "sandbox", "bench", "--json", "--n", "1", "--roundtrips", "20", "--max-live", "2", "--image", docker_image,
        "--preload", "import numpy",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    figures = last_json(res.stdout)
    for key in ("cold_start_ms_p50", "bare_docker_run_ms_p50", "warm_acquire_ms_p50",
                "exec_roundtrip_ms_p50", "exec_roundtrip_ms_p95"):
        assert figures[key] > 0, key
    assert figures["exec_roundtrip_ms_p50"] <= figures["exec_roundtrip_ms_p95"]
    assert figures["max_live_sandboxes"] == 2
    assert set(figures["targets_met"]) == {
        "warm_acquire_ms_p50", "cold_start_vs_bare", "exec_roundtrip_ms_p50", "max_live_sandboxes"
    }
