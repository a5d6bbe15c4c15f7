"""`sandbox.commands`: processes run inside a sandbox, their output streamed like an execution's.

The process is started by the kernel (inkernel/run_command.py), so it runs under the kernel's
identity and limits, its output arrives as stream events, the execution timeout interrupts it (the
process is killed), and its exit code comes back in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import inkernel
from .errors import UsageError
from .events import ExecutionResult, Outcome, StreamEvent

if TYPE_CHECKING:
    from .kernel import Sandbox

_RC = "__cellforge_rc__"


class Commands:
    """Processes in one sandbox: `await sandbox.commands.run(["python", "train.py"], cwd=...)`."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox

    async def run(
        self,
        argv: Sequence[str],
        cwd: str | None = None,
        timeout: float | None = None,
        on_event: Callable[[StreamEvent], Any] | None = None,
    ) -> ExecutionResult:
        """Run `argv` (no shell) in `cwd` (default: the workspace); `ok` only for exit code 0,
        otherwise `error` with ename `CommandFailed` and the `exit_code`."""
        if isinstance(argv, str) or not argv or not all(isinstance(a, str) for a in argv):
            raise UsageError(f"commands.run: expected a non-empty list of strings, got {argv!r}")
        code = inkernel.call("run_command", "run", list(argv), cwd or self._sb.workspace, result=_RC)
        result, replies = await self._sb.run_code(code, {"rc": _RC}, timeout, on_event)
        if result.outcome is not Outcome.OK:
            return result
        exit_code = _exit_code(replies.get("rc"))
        if exit_code == 0:
            return result.model_copy(update={"exit_code": 0, "result": None})
        return result.model_copy(
            update={
                "outcome": Outcome.ERROR,
                "exit_code": exit_code,
                "result": None,
                "ename": "CommandFailed",
                "evalue": f"{argv[0]} exited with code {exit_code}",
            }
        )


def _exit_code(reply: Any) -> int:
    """The exit code in the kernel's (untrusted) reply to the rc expression; -1 when unreadable."""
    try:
        return int(reply["data"]["text/plain"])
    except (TypeError, KeyError, ValueError):
        return -1
