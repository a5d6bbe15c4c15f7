"""The README against the code: every `cellforge` command its bash blocks name exists with the options
they show, the metric glossary covers the report's metrics with their directions, and every environment
variable the code reads is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from service.api.datasets import UploadChecks
from service.cli import app
from service.data.h5safety import H5Limits
from service.llm.config import LLMConfig
from service.pipeline.report import GLOSSARY, lower_is_better

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _bash_commands() -> list[str]:
    """Each `cellforge ...` invocation in the ```bash blocks (commands run as written) and the ```text
    blocks (usage synopses), continuation lines joined, cut at a pipe, a comment, `&`, `>` or `)` (what
    follows belongs to another program)."""
    found = []
    for block in re.findall(r"```(?:bash|text)\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"(?:^|[\s(/])cellforge\s+(.*)", line):
                found.append(re.split(r"\s(?:\||#|&|>)\s?|\)|&$", match.group(1))[0].strip())
    return found


COMMANDS = _bash_commands()


def test_the_readme_shows_cellforge_commands() -> None:
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize("line", COMMANDS)
def test_each_readme_command_and_option_exists(line: str) -> None:
    command = typer.main.get_command(app)
    words = line.split()
    path = ["cellforge"]
    while words and hasattr(command, "commands") and words[0] in command.commands:  # walk the groups
        command = command.commands[words.pop(0)]
        path.append(command.name or "")
    assert not hasattr(command, "commands"), f"{line!r}: {' '.join(path)} needs a subcommand the README names"
    known = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    shown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line))
    assert shown <= known, f"{' '.join(path)} has no {sorted(shown - known)} (README: {line!r})"


def test_glossary_names_every_report_metric_with_its_direction() -> None:
    rows = dict(re.findall(r"^\| `([^`]+)` \| (higher|lower) \|", README, flags=re.M))
    for metric in GLOSSARY:
        assert metric in rows, f"README's metric glossary lacks {metric}"
        assert rows[metric] == ("lower" if lower_is_better(metric) else "higher"), metric


def test_every_environment_variable_is_documented() -> None:
    section = README.split("**Environment variables**", 1)[1].split("\n## ", 1)[0]
    fixed = ["CELLFORGE_DB", "CELLFORGE_DATA_DIR", "CELLFORGE_URL", "CELLFORGE_API_KEY", "CELLFORGE_SANDBOX_UID"]
    for name in fixed:
        assert f"`{name}`" in section, name
    for field in H5Limits.model_fields:
        assert f"`{field.upper()}`" in section, f"CELLFORGE_DATA_{field.upper()}"
    for field in set(UploadChecks.model_fields) - {"limits"}:
        assert f"`{field.upper()}`" in section, f"CELLFORGE_UPLOAD_{field.upper()}"
    for field in LLMConfig.model_fields:
        assert f"`_{field.upper()}`" in section or f"`CELLFORGE_LLM_{field.upper()}`" in section, field


def _block_with(text: str) -> str:
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S) if text in b]
    assert len(blocks) == 1, text
    return blocks[0]


@pytest.mark.docker
@pytest.mark.slow
def test_the_curl_walkthrough_runs_as_written(docker_image: str, tmp_path: Path) -> None:
    # The README's service block, verbatim, in an empty folder with the venv's `cellforge` on PATH.
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000, which the README uses, is taken")
    # If a line fails, the block's background server goes too.
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + _block_with("curl -s http://127.0.0.1:8000/")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "CELLFORGE_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert '"stdout"' in out and "42" in out and '"done"' in out, out[-2000:]  # the execute stream
    assert '"name":"screen.h5ad"' in out.replace(" ", ""), out[-2000:]  # the upload's answer


@pytest.mark.slow
def test_the_data_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """The README's data example, verbatim, in an empty folder: simulate, profile, split, baselines, score."""
    import json
    import os
    import subprocess
    import sys

    script = "set -euo pipefail\n" + _block_with("cellforge data simulate --kind knockout --seed 0 --cells 3000")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((tmp_path / "profile.json").read_text())["n_cells"] == 3000
    assert (tmp_path / "split" / "test_truth.h5ad").is_file()
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["n_conditions"] > 0 and "pearson_delta_pert" in scores["summary"]
