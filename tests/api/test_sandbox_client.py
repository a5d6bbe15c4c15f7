"""The E2B-shaped client against a real `cellforge serve`: a context-managed sandbox, `run_code` with
streaming callbacks and a typed `Execution`, files, commands, sync and async, over HTTP and gRPC."""

from __future__ import annotations

import asyncio

import pytest

from service.client import AsyncSandbox, Execution, NotFoundError, Sandbox

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_run_code_streams_and_returns_a_typed_execution(server, alice, transport):
    url = server.url if transport == "http" else server.grpc_target
    out: list[str] = []
    err: list[str] = []
    with Sandbox(url, alice.key, transport=transport, memory="512m") as sb:
        execution = sb.run_code("import sys\nprint('hello')\nprint('warn', file=sys.stderr)\nx = 6 * 7\nx",
                                on_stdout=out.append, on_stderr=err.append)
        assert isinstance(execution, Execution) and execution.error is None and execution.outcome == "ok"
        assert execution.text == "42" and execution.results[0].is_main_result
        assert "".join(execution.logs.stdout) == "hello\n" and "".join(execution.logs.stderr) == "warn\n"
        assert "".join(out) == "hello\n" and "".join(err) == "warn\n"
        assert sb.run_code("x + 1").text == "43"  # the kernel keeps its state between calls
        failed = sb.run_code("1 / 0")
        assert failed.error is not None and failed.error.name == "ZeroDivisionError" and failed.outcome == "error"
        assert "ZeroDivisionError" in failed.error.traceback
        timed_out = sb.run_code("import time\ntime.sleep(30)", timeout=1)
        assert timed_out.outcome == "timeout" and timed_out.error is not None

        sb.files.write("data/a.csv", "a,b\n1,2\n")
        sb.files.write("data/raw.bin", b"\x00\x01")
        assert sb.files.read("data/a.csv") == "a,b\n1,2\n"
        assert sb.files.read("data/raw.bin", format="bytes") == b"\x00\x01"
        assert [(e.name, e.path) for e in sb.files.list("data")] == [("a.csv", "data/a.csv"), ("raw.bin", "data/raw.bin")]

        listing = sb.commands.run("ls data")
        assert listing.exit_code == 0 and listing.stdout.split() == ["a.csv", "raw.bin"] and listing.error is None
        missing = sb.commands.run(["ls", "no-such-folder"])
        assert missing.exit_code not in (0, None) and missing.error and "No such file" in missing.stderr
        sandbox_id = sb.sandbox_id
        assert sb.is_running()
    with pytest.raises(NotFoundError):  # leaving the block deleted it
        Sandbox.connect(sandbox_id, url, alice.key, transport=transport)


def test_async_sandbox_awaits_and_calls_coroutine_handlers_in_order(server, alice):
    async def main() -> tuple[Execution, list[str], str, int | None]:
        seen: list[str] = []

        async def on_stdout(text: str) -> None:
            await asyncio.sleep(0)
            seen.append(text)

        async with await AsyncSandbox.create(server.url, alice.key, memory="512m") as sb:
            execution = await sb.run_code("for i in range(3):\n    print(i, flush=True)\n'done'", on_stdout=on_stdout)
            await sb.files.write("note.txt", "hi")
            note = await sb.files.read("note.txt")
            command = await sb.commands.run(["cat", "note.txt"])
        return execution, seen, note, command.exit_code

    execution, seen, note, exit_code = asyncio.run(main())
    assert "".join(seen) == "0\n1\n2\n" and execution.text == "'done'"
    assert note == "hi" and exit_code == 0
