"""One attempt's sandbox settings: a bad value is a failure the debugger can read, never a crash."""

from __future__ import annotations

from sandbox import BackendKind
from service.pipeline.execute import SandboxSettings, run_attempt


def test_an_invalid_sandbox_setting_is_a_sandbox_stage_failure(tmp_path):
    events = []
    settings = SandboxSettings(backend=BackendKind.LOCAL, memory="4x")
    outcome = run_attempt(tmp_path / "code", tmp_path / "data", tmp_path / "attempt", 1, settings, 60.0, events.append)
    failure = outcome.failure
    assert failure is not None and failure.stage == "sandbox" and failure.ename == "SpecError"
    assert "memory: expected a size like '512m' or '2g', got '4x'" in failure.evalue
    assert [e.phase for e in events] == ["sandbox"] and "local sandbox" in events[0].message
