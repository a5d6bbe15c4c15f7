"""Usage errors (exit 2) as a script sees them: with --json, stdout is one JSON error document and the human
message stays on stderr; without --json, stdout stays empty."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("cellforge"))


def cellforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["images", "build", "--no-such-option"], "No such option: --no-such-option"),
    (["images", "build", "--flavor", "tpu"], "Invalid value for '--flavor'"),
    (["data", "profile"], "Missing argument 'file'."),
    (["no-such-command"], "No such command 'no-such-command'."),
])
def test_usage_error_with_json_is_one_document(args: list[str], message: str) -> None:
    proc = cellforge(*args, "--json")
    assert proc.returncode == 2
    document = json.loads(proc.stdout)  # the whole of stdout: anything else there fails the parse
    assert document["ok"] is False and document["error"] == "UsageError" and document["exit_code"] == 2
    assert message in document["message"]
    assert message in proc.stderr and "Usage: cellforge" in proc.stderr


def test_usage_error_without_json_leaves_stdout_empty() -> None:
    proc = cellforge("images", "build", "--no-such-option")
    assert proc.returncode == 2 and proc.stdout == "" and "No such option" in proc.stderr
