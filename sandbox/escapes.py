"""Terminal control sequences removed from text that came out of a sandbox.

Sandboxed code writes whatever bytes it likes; shown raw on an operator's terminal they can set the
clipboard (OSC 52), the window title, hyperlinks (OSC 8), rewrite the screen, or talk to the
terminal itself (DCS, APC). What is removed: OSC, DCS, SOS, PM and APC strings (ended by BEL or ST,
or unterminated up to the end of the text), CSI sequences, every other ESC sequence and a lone ESC,
C1 controls (their 8-bit forms included), and C0 controls other than tab, newline and carriage
return (kept for progress bars).
"""

from __future__ import annotations

import re

_ESCAPES = re.compile(
    r"(?:\x1b[\]PX^_]|[\x90\x98\x9d-\x9f]).*?(?:\x07|\x1b\\|\x9c|\Z)"  # OSC, DCS, SOS, PM, APC strings
    r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI
    r"|\x1b[ -/]*[0-~]?"  # any other ESC sequence, or a lone ESC
    r"|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]",  # remaining C0 controls, DEL, C1 controls
    re.DOTALL,
)


def strip_escapes(text: str) -> str:
    """`text` without terminal control sequences; tabs, newlines and carriage returns are kept."""
    return _ESCAPES.sub("", text)
