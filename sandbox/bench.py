"""Measurements of the sandbox layer: cold start, warm acquire, execute round trip, density.

Used by `cellforge sandbox bench` and `benchmarks/sandbox_bench.py`. Every figure is measured
against the real engine in the same run, including the reference `docker run --rm IMAGE true`.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel

from .backend import SandboxBackend
from .errors import SandboxError
from .pool import DEFAULT_PRELOAD, SandboxPool
from .runtimes import RUNC, require_runtime
from .spec import SandboxSpec

if TYPE_CHECKING:
    from .docker_backend import DockerBackend
    from .kernel import Sandbox

# The targets of issue 2; `BenchResult.targets_met` checks the figures against them.
TARGET_WARM_ACQUIRE_MS = 50.0
TARGET_COLD_VS_BARE = 2.0
TARGET_ROUNDTRIP_P50_MS = 5.0
TARGET_LIVE_SANDBOXES = 20

Progress = Callable[[str, int, int], None]


class BenchResult(BaseModel):
    image: str
    runtime: str
    n: int
    cold_start_ms_p50: float
    bare_docker_run_ms_p50: float
    warm_acquire_ms_p50: float
    exec_roundtrip_ms_p50: float
    exec_roundtrip_ms_p95: float
    torch_import_ms_p50: float
    max_live_sandboxes: int
    max_live_tried: int
    live_memory: str
    targets_met: dict[str, bool]


def p50(samples: list[float]) -> float:
    return round(statistics.median(samples), 2)


def p95(samples: list[float]) -> float:
    return round(statistics.quantiles(samples, n=100, method="inclusive")[94], 2)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


def bare_docker_run_ms(
    image: str, n: int, progress: Progress = _no_progress, runtime: str | None = None
) -> list[float]:
    """`docker run --rm [--runtime R] IMAGE true`, the floor any container-based sandbox starts from."""
    samples = []
    command = ["docker", "run", "--rm", *(["--runtime", runtime] if runtime else []), image, "true"]
    for i in range(n):
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True)
        samples.append(_ms(start))
        if proc.returncode != 0:
            raise SandboxError(f"{' '.join(command)} failed: {proc.stderr.decode(errors='replace').strip()}")
        progress("bare docker run", i + 1, n)
    return samples


async def cold_start_ms(backend: SandboxBackend, spec: SandboxSpec, n: int, progress: Progress = _no_progress) -> list[float]:
    """create() until the kernel is ready (what `create` guarantees on return)."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        sb = await backend.create(spec)
        samples.append(_ms(start))
        await sb.close()
        progress("cold start", i + 1, n)
    return samples


async def warm_acquire_ms(
    backend: SandboxBackend,
    spec: SandboxSpec,
    n: int,
    preload: str = DEFAULT_PRELOAD,
    progress: Progress = _no_progress,
) -> list[float]:
    """acquire() from a pool whose warm sandbox is ready; the refill is awaited between samples."""
    samples = []
    async with SandboxPool(backend, [spec], warm=1, preload=preload, reap_orphans=False) as pool:
        for i in range(n):
            await pool.wait_warm()
            start = time.perf_counter()
            lease = await pool.acquire(spec, tenant="bench")
            samples.append(_ms(start))
            await lease.close()
            progress("warm acquire", i + 1, n)
    return samples


async def roundtrip_ms(
    backend: SandboxBackend, spec: SandboxSpec, n: int, progress: Progress = _no_progress
) -> list[float]:
    """execute("1+1") round trips on one sandbox, after a few unmeasured ones."""
    sb = await backend.create(spec)
    try:
        for _ in range(5):
            await sb.execute("1+1")
        samples = []
        for i in range(n):
            start = time.perf_counter()
            res = await sb.execute("1+1")
            samples.append(_ms(start))
            if res.outcome != "ok" or res.result != "2":
                raise SandboxError(f"1+1 gave outcome {res.outcome} result {res.result!r}")
            if (i + 1) % 20 == 0:
                progress("execute round trip", i + 1, n)
    finally:
        await sb.close()
    return samples


async def torch_import_ms(
    backend: SandboxBackend, spec: SandboxSpec, n: int, progress: Progress = _no_progress
) -> list[float]:
    """`import torch` in a fresh kernel: the first thing most generated code does."""
    samples = []
    for i in range(n):
        sb = await backend.create(spec)
        try:
            start = time.perf_counter()
            res = await sb.execute("import torch", timeout=120)
            samples.append(_ms(start))
            if res.outcome != "ok":
                raise SandboxError(f"import torch gave outcome {res.outcome}: {res.ename} {res.evalue}")
        finally:
            await sb.close()
        progress("import torch", i + 1, n)
    return samples


async def max_live(backend: SandboxBackend, spec: SandboxSpec, limit: int, progress: Progress = _no_progress) -> int:
    """Start up to `limit` sandboxes (two at a time) and count those that all answer at once."""
    live: list[Sandbox] = []
    try:
        for i in range(0, limit, 2):
            batch = await asyncio.gather(*(backend.create(spec) for _ in range(min(2, limit - i))), return_exceptions=True)
            started = [sb for sb in batch if not isinstance(sb, BaseException)]
            live.extend(started)
            progress("live sandboxes", len(live), limit)
            if len(started) < len(batch):
                break
        answers = await asyncio.gather(*(sb.execute("1+1", timeout=60) for sb in live), return_exceptions=True)
        return sum(1 for a in answers if not isinstance(a, BaseException) and a.outcome == "ok" and a.result == "2")
    finally:
        await asyncio.gather(*(sb.close() for sb in live), return_exceptions=True)


async def run_bench(
    backend: DockerBackend,
    image: str,
    n: int = 10,
    roundtrips: int = 200,
    live_limit: int = 30,
    live_memory: str = "512m",
    preload: str = DEFAULT_PRELOAD,
    runtime: str | None = None,
    progress: Progress = _no_progress,
) -> BenchResult:
    spec = SandboxSpec(image=image, runtime=runtime)
    require_runtime(runtime, backend.client)
    bare = await asyncio.to_thread(bare_docker_run_ms, image, n, progress, runtime)
    cold = await cold_start_ms(backend, spec, n, progress)
    warm = await warm_acquire_ms(backend, spec, n, preload, progress)
    rt = await roundtrip_ms(backend, spec, roundtrips, progress)
    torch = await torch_import_ms(backend, spec, max(1, min(n, 3)), progress)
    alive = await max_live(backend, spec.model_copy(update={"memory": live_memory}), live_limit, progress)
    result = dict(
        image=image,
        runtime=runtime or RUNC,
        n=n,
        cold_start_ms_p50=p50(cold),
        bare_docker_run_ms_p50=p50(bare),
        warm_acquire_ms_p50=p50(warm),
        exec_roundtrip_ms_p50=p50(rt),
        exec_roundtrip_ms_p95=p95(rt),
        torch_import_ms_p50=p50(torch),
        max_live_sandboxes=alive,
        max_live_tried=live_limit,
        live_memory=live_memory,
    )
    result["targets_met"] = {
        "warm_acquire_ms_p50": result["warm_acquire_ms_p50"] <= TARGET_WARM_ACQUIRE_MS,
        "cold_start_vs_bare": result["cold_start_ms_p50"] <= TARGET_COLD_VS_BARE * result["bare_docker_run_ms_p50"],
        "exec_roundtrip_ms_p50": result["exec_roundtrip_ms_p50"] <= TARGET_ROUNDTRIP_P50_MS,
        "max_live_sandboxes": alive >= TARGET_LIVE_SANDBOXES,
    }
    return BenchResult(**result)
