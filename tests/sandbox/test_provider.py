"""The sandbox provider: one backend made on first use and shared by every lease (from any thread), closed
once with what is still leased; a lease with no room waits (or fails) as asked."""

from __future__ import annotations

import asyncio
import threading

import pytest

import sandbox.provider as provider_module
from sandbox import BackendProvider, CapacityError, SandboxClosedError, SandboxSpec
from sandbox.facade import LoopRunner
from sandbox.local_backend import LocalBackend

SPEC = SandboxSpec(image="local", memory="512m", timeout=30)


class CountingLocal(LocalBackend):
    made: list[CountingLocal] = []

    def __init__(self) -> None:
        super().__init__()
        self.created = 0
        self.closed = 0
        CountingLocal.made.append(self)

    async def create(self, spec):
        self.created += 1
        return await super().create(spec)

    async def close(self) -> None:
        self.closed += 1
        await super().close()


@pytest.fixture
def counting(monkeypatch):
    CountingLocal.made = []
    monkeypatch.setattr(provider_module, "new_backend", lambda kind: CountingLocal())
    return CountingLocal.made


def test_one_backend_for_every_lease_from_any_thread_closed_once_with_what_is_left(counting):
    provider = BackendProvider("local")
    assert not counting  # nothing made before the first lease
    results: list[str] = []

    def work() -> None:
        sb = provider.lease_blocking(SPEC)
        results.append(sb.execute("6 * 7").result)
        sb.close()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    left_open = provider.lease_blocking(SPEC)
    assert results == ["42", "42"]
    assert len(counting) == 1 and counting[0].created == 3 and provider.backends_made == 1
    provider.close()
    provider.close()  # idempotent
    assert counting[0].closed == 1
    assert left_open._target.closed  # destroyed with the provider
    with pytest.raises(SandboxClosedError):
        provider.lease_blocking(SPEC)


class FullUntil(BackendProvider):
    """A provider whose tenant has no room for the first `refusals` leases."""

    def __init__(self, refusals: int) -> None:
        super().__init__("local")
        self.refusals = refusals

    async def lease(self, spec):
        if self.refusals:
            self.refusals -= 1
            raise CapacityError("tenant 't' holds 1 live sandboxes (quota 1)", retry_after=0.2)
        return await super().lease(spec)


def test_a_lease_without_room_waits_reporting_why_or_fails_once_the_wait_is_over():
    with FullUntil(refusals=2) as provider:
        reasons: list[str] = []
        sb = provider.lease_blocking(SPEC, wait=30, on_wait=reasons.append)
        assert reasons == ["tenant 't' holds 1 live sandboxes (quota 1)"] * 2
        sb.close()
        provider.refusals = 100
        with pytest.raises(CapacityError, match="quota 1"):
            provider.lease_blocking(SPEC, wait=0.5)

        class Stop(Exception):
            pass

        def stop(why: str) -> None:
            raise Stop(why)

        with pytest.raises(Stop):  # the caller's callback ends the wait (a cancelled job)
            provider.lease_blocking(SPEC, wait=30, on_wait=stop)


def test_a_blocking_call_from_the_providers_own_loop_is_refused():
    async def inside() -> None:
        runner = LoopRunner(asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="deadlock"):
            runner.run(asyncio.sleep(0))

    asyncio.run(inside())
