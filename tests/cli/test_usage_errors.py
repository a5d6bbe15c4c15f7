"""Usage errors (exit 2) as a script sees them: with --json, stdout is one JSON error document and the human
message stays on stderr; without --json, stdout stays empty.

Each case runs the command line in-process (typer's runner keeps stdout and stderr apart); one case runs
the installed `cellforge` executable, so the streams of a real process are checked too (each start of it
imports the whole CLI: seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app

CLI = str(Path(sys.executable).with_name("cellforge"))


def in_process(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), prog_name="cellforge")
    return result.exit_code, result.stdout, result.stderr


def as_a_process(*args: str) -> tuple[int, str, str]:
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_json_document(run, args: list[str], message: str) -> None:
    code, stdout, stderr = run(*args, "--json")
    assert code == 2
    document = json.loads(stdout)  # the whole of stdout: anything else there fails the parse
    assert document["ok"] is False and document["error"] == "UsageError" and document["exit_code"] == 2
    assert message in document["message"]
    assert message in stderr and "Usage: cellforge" in stderr


@pytest.mark.parametrize("args, message", [
    (["images", "build", "--no-such-option"], "No such option: --no-such-option"),
    (["images", "build", "--flavor", "tpu"], "Invalid value for '--flavor'"),
    (["data", "profile"], "Missing argument 'file'."),
    (["no-such-command"], "No such command 'no-such-command'."),
])
def test_usage_error_with_json_is_one_document(args: list[str], message: str) -> None:
    assert_one_json_document(in_process, args, message)


def test_usage_error_of_the_installed_command_with_json_is_one_document() -> None:
    assert_one_json_document(as_a_process, ["images", "build", "--no-such-option"], "No such option: --no-such-option")


def test_usage_error_without_json_leaves_stdout_empty() -> None:
    code, stdout, stderr = in_process("images", "build", "--no-such-option")
    assert code == 2 and stdout == "" and "No such option" in stderr
