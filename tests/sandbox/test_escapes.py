"""Terminal escapes from sandboxed code never reach an operator's terminal (hostile probe 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.escapes import strip_escapes

ESCAPES = {
    "osc52 clipboard, BEL": "\x1b]52;c;ZWNobyBwd25lZA==\x07",
    "osc title, ST": "\x1b]0;owned\x1b\\",
    "osc8 hyperlink": "\x1b]8;;http://evil.example\x1b\\link\x1b]8;;\x1b\\",
    "csi colour and clear": "\x1b[31m\x1b[2J\x1b[H",
    "dcs": "\x1bP+q544e\x1b\\",
    "apc": "\x1b_payload\x1b\\",
    "pm": "\x1b^private\x1b\\",
    "sos": "\x1bXstring\x1b\\",
    "8-bit csi": "\x9b31m",
    "8-bit osc": "\x9d0;title\x9c",
    "reset": "\x1bc",
    "charset": "\x1b(0",
    "bell, backspace, shift-out": "\x07\x08\x0e",
}


@pytest.mark.parametrize("sequence", list(ESCAPES.values()), ids=list(ESCAPES))
def test_strip_escapes_removes_every_control_sequence(sequence):
    assert strip_escapes(f"before{sequence}after") in ("beforeafter", "beforelinkafter")


def test_strip_escapes_keeps_text_tabs_and_newlines():
    text = "col1\tcol2\nligne 2 – ünïcode ✓\r\n100%\r"
    assert strip_escapes(text) == text
    assert strip_escapes("\x1b]52;c;unterminated") == ""
    assert strip_escapes("lone\x1b") == "lone"


@pytest.mark.slow
@pytest.mark.docker
def test_cellforge_sandbox_run_shows_no_escape_from_the_sandbox(docker_image, sandbox_runtime, tmp_path):
    hostile = "".join(ESCAPES.values())
    script = tmp_path / "hostile.py"
    script.write_text(
        "import sys\n"
        f"print('out' + {hostile!r})\n"
        f"print('err' + {hostile!r}, file=sys.stderr)\n"
        f"raise ValueError('boom' + {hostile!r})\n"
    )
    cli = str(Path(sys.executable).with_name("cellforge"))
    res = subprocess.run(
        [cli, "sandbox", "run", str(script), "--image", docker_image, "--memory", "512m",
         *(["--runtime", sandbox_runtime] if sandbox_runtime else [])],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 1
    assert "outlink" in res.stdout and "errlink" in res.stderr and "ValueError: boomlink" in res.stderr
    for stream in (res.stdout, res.stderr):
        assert not any(c in stream for c in "\x1b\x07\x08\x0e\x9b\x9c\x9d"), repr(stream)
