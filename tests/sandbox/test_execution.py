"""Typed, streamed execution in a real sandbox: events, outcomes, commands, restarts, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sandbox import (
    DisplayEvent,
    ErrorEvent,
    ExecutionResult,
    Outcome,
    ResultEvent,
    SandboxClosedError,
    SandboxDeadError,
    StatusEvent,
    StderrEvent,
    StdoutEvent,
    TruncatedEvent,
)

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


async def test_events_are_typed_and_arrive_in_order(shared_sandbox):
    events = []
    res = await shared_sandbox.execute(
        f"""
import base64, sys
from IPython.display import Image, display
print("to stdout", flush=True)
print("to stderr", file=sys.stderr)
sys.stderr.flush()
display(Image(data=base64.b64decode("{PNG_1X1}"), format="png"))
21 * 2
""",
        on_event=events.append,
    )
    assert res.outcome is Outcome.OK
    assert res.stdout == "to stdout\n" and res.stderr == "to stderr\n"
    assert res.result == "42"
    assert res.displays[0]["image/png"].strip() == PNG_1X1
    kinds = [type(e) for e in events]
    assert kinds == [StdoutEvent, StderrEvent, DisplayEvent, ResultEvent]
    assert events[2].data["image/png"].strip() == PNG_1X1
    assert res.duration_ms > 0 and not res.truncated and not res.state_lost


async def test_stream_yields_output_while_the_code_still_runs(shared_sandbox):
    arrivals = []
    started = time.perf_counter()
    async for item in shared_sandbox.stream("import time\nprint('early', flush=True)\ntime.sleep(1.5)\nprint('late')"):
        arrivals.append((time.perf_counter() - started, item))
    (t_early, early), (t_late, late), (t_end, final) = arrivals
    assert isinstance(early, StdoutEvent) and early.text == "early\n"
    assert isinstance(late, StdoutEvent) and late.text == "late\n"
    assert isinstance(final, ExecutionResult) and final.outcome is Outcome.OK
    assert t_early < 1.0 < t_late  # not buffered until the end


async def test_async_callbacks_are_awaited_in_order(shared_sandbox):
    seen = []

    async def slow_callback(event):
        await asyncio.sleep(0.01)
        seen.append(event.text)

    res = await shared_sandbox.execute("for i in range(5): print(i, flush=True)", on_event=slow_callback)
    assert res.outcome is Outcome.OK
    assert "".join(seen) == "0\n1\n2\n3\n4\n"


async def test_errors_carry_name_value_and_a_clean_trimmed_traceback(shared_sandbox):
    events = []
    res = await shared_sandbox.execute(
        "def dive(n):\n    return dive(n + 1) if n < 200 else {}['missing']\ndive(0)", on_event=events.append
    )
    assert res.outcome is Outcome.ERROR
    assert res.ename == "KeyError" and res.evalue == "'missing'"
    assert not any("\x1b[" in line for line in res.traceback)
    assert len(res.traceback) <= 31 and "outer traceback entries omitted" in res.traceback[0]
    assert "KeyError" in res.traceback[-1]
    assert isinstance(events[-1], ErrorEvent) and events[-1].ename == "KeyError"


async def test_timeout_interrupts_and_keeps_the_kernel_state(shared_sandbox):
    await shared_sandbox.execute("kept = 'still here'")
    events = []
    res = await shared_sandbox.execute("while True:\n    pass", timeout=1.0, on_event=events.append)
    assert res.outcome is Outcome.TIMEOUT
    assert res.ename == "KeyboardInterrupt" and not res.state_lost
    assert 1000 <= res.duration_ms < 1000 + 1000 * shared_sandbox.spec.interrupt_grace
    assert any(isinstance(e, StatusEvent) and e.state == "interrupting" for e in events)
    assert (await shared_sandbox.execute("kept")).result == "'still here'"


async def test_ignored_interrupt_restarts_the_kernel_and_says_state_is_lost(shared_sandbox):
    await shared_sandbox.execute("doomed = 1")
    await shared_sandbox.files.put("survives.txt", b"workspace is kept")
    events = []
    res = await shared_sandbox.execute(
        "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)",
        timeout=0.5,
        on_event=events.append,
    )
    assert res.outcome is Outcome.KILLED and res.state_lost
    states = [e.state for e in events if isinstance(e, StatusEvent)]
    assert states == ["interrupting", "restarting", "restarted"]
    gone = await shared_sandbox.execute("doomed")
    assert gone.outcome is Outcome.ERROR and gone.ename == "NameError"
    assert await shared_sandbox.files.get("survives.txt") == b"workspace is kept"


@pytest.mark.slow
async def test_flooding_stdout_is_truncated_with_a_marker(shared_sandbox):
    events = []
    res = await shared_sandbox.execute("for i in range(400_000):\n    print(i)", timeout=60, on_event=events.append)
    limit = shared_sandbox.spec.output_limit
    assert res.outcome is Outcome.OK and res.truncated
    assert res.stdout_bytes > 2 * limit
    assert len(res.stdout.encode()) < limit + 200
    assert res.stdout.rstrip().endswith("the rest was dropped]")
    assert sum(isinstance(e, TruncatedEvent) for e in events) == 1
    assert (await shared_sandbox.execute("'alive'")).result == "'alive'"


async def test_run_command_streams_output_and_reports_the_exit_code(shared_sandbox):
    events = []
    ok = await shared_sandbox.commands.run(
        ["sh", "-c", "echo first; sleep 1; echo second; echo warn >&2"], on_event=events.append
    )
    assert ok.outcome is Outcome.OK and ok.exit_code == 0
    assert ok.stdout == "first\nsecond\n" and ok.stderr == "warn\n"
    assert isinstance(events[0], StdoutEvent) and events[0].text == "first\n"

    failed = await shared_sandbox.commands.run(["python", "-c", "import sys; print('bad input'); sys.exit(3)"])
    assert failed.outcome is Outcome.ERROR and failed.exit_code == 3
    assert failed.ename == "CommandFailed" and "3" in failed.evalue and failed.stdout == "bad input\n"

    missing = await shared_sandbox.commands.run(["no-such-program"])
    assert missing.outcome is Outcome.ERROR and missing.ename == "FileNotFoundError"

    in_dir = await shared_sandbox.commands.run(["pwd"], cwd="/tmp")
    assert in_dir.stdout == "/tmp\n"


async def test_run_command_timeout_stops_the_process(shared_sandbox):
    res = await shared_sandbox.commands.run(["sleep", "300"], timeout=1.0)
    assert res.outcome is Outcome.TIMEOUT
    left = await shared_sandbox.commands.run(["sh", "-c", "ps -eo comm | grep -c '^sleep$' || true"])
    assert left.stdout.strip() == "0"


async def test_interrupt_stops_running_code(shared_sandbox):
    task = asyncio.create_task(shared_sandbox.execute("import time\ntime.sleep(30)", timeout=60))
    await asyncio.sleep(0.5)
    await shared_sandbox.interrupt()
    res = await asyncio.wait_for(task, 5)
    assert res.outcome is Outcome.ERROR and res.ename == "KeyboardInterrupt"


async def test_restart_loses_variables_but_keeps_the_workspace(shared_sandbox):
    await shared_sandbox.execute("before_restart = True")
    await shared_sandbox.files.put("kept.txt", b"yes")
    await shared_sandbox.restart()
    assert (await shared_sandbox.execute("'before_restart' in globals()")).result == "False"
    assert await shared_sandbox.files.get("kept.txt") == b"yes"


async def test_many_sandboxes_run_at_once_without_blocking_the_loop(backend, small_spec, shared_sandbox):
    other = await backend.create(small_spec())
    try:
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        started = time.perf_counter()
        results = await asyncio.gather(*(sb.execute("import time; time.sleep(1.5)") for sb in (shared_sandbox, other)))
        elapsed = time.perf_counter() - started
        tick_task.cancel()
        assert all(r.outcome is Outcome.OK for r in results)
        assert elapsed < 2.8  # ran side by side, not one after the other
        assert ticks >= 15  # the event loop kept turning meanwhile
    finally:
        await other.close()


async def test_a_dead_kernel_is_reported_and_can_be_revived(backend, small_spec):
    sb = await backend.create(small_spec())
    try:
        res = await sb.execute("import os\nos._exit(3)")
        assert res.outcome is Outcome.DIED and res.died_cause == "exit code 3" and res.state_lost
        assert sb.dead == "exit code 3"
        with pytest.raises(SandboxDeadError, match="exit code 3"):
            await sb.execute("1")
        await sb.restart()
        assert (await sb.execute("1 + 1")).result == "2"
    finally:
        await sb.close()
    with pytest.raises(SandboxClosedError):
        await sb.execute("1")


async def test_leaving_a_stream_early_interrupts_the_code(shared_sandbox):
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)\nfinished = True"
    async for event in shared_sandbox.stream(code):
        assert isinstance(event, StdoutEvent) and event.text == "started\n"
        break
    started = time.perf_counter()
    res = await shared_sandbox.execute("'finished' in globals()", timeout=10)
    assert res.result == "False" and time.perf_counter() - started < 5


async def test_an_abandoned_run_is_interrupted_until_it_stops(shared_sandbox):
    """The interrupt sent as a caller leaves can be lost (here: the code swallows the first one); the next
    request sends it again rather than queue behind the code until its own timeout."""
    code = ("import time\nprint('started', flush=True)\ntry:\n    time.sleep(60)\n"
            "except KeyboardInterrupt:\n    time.sleep(60)\nfinished = True")
    async with contextlib.aclosing(shared_sandbox.stream(code)) as events:
        async for event in events:
            assert isinstance(event, StdoutEvent) and event.text == "started\n"
            break
    started = time.perf_counter()
    res = await shared_sandbox.execute("'finished' in globals()", timeout=10)
    assert res.outcome == Outcome.OK and res.result == "False" and time.perf_counter() - started < 5
