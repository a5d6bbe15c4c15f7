"""Ray cluster benchmark: the Ray backend against the direct Docker backend in one run; prints one JSON object.

    .venv/bin/python benchmarks/cluster_bench.py [--address ADDR] [--n 8] [--roundtrips 200] [--sandboxes 6]
        [--seconds 5] [--image I]

Without --address it starts a local cluster of three sandbox nodes (ray.cluster_utils.Cluster, one
zone resource each) and shuts it down at the end. Figures:

- `exec_roundtrip_ms_p50`: execute("1+1") on one sandbox, through Ray and direct (target: Ray ≤ 1.5×);
- `start_ms_p50`: create() until the kernel answers, through Ray and direct (target: Ray ≤ 1.3×);
- `throughput_exec_per_s`: `--sandboxes` sandboxes executing "1+1" back to back for `--seconds`, spread
  over the three nodes vs packed on one. On one machine the nodes share its cores, so this shows how
  the backend's overhead spreads, not added compute.

Samples of the two backends alternate, so load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import ray

from sandbox import DockerBackend, SandboxBackend, SandboxSpec
from sandbox.bench import p50, p95
from sandbox.ray_backend import MARKER, SLOT_RESOURCE, RayBackend
from sandbox.spec import DEFAULT_CPU_IMAGE

ZONES = ("zone_a", "zone_b", "zone_c")
NODE_CPUS = 4


def local_cluster() -> Any:
    from ray.cluster_utils import Cluster

    args = {"num_cpus": NODE_CPUS, "object_store_memory": 100 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**args, "resources": {SLOT_RESOURCE: 16, ZONES[0]: 1}, "include_dashboard": False},
    )
    for zone in ZONES[1:]:
        cluster.add_node(**args, resources={SLOT_RESOURCE: 16, zone: 1})
    cluster.wait_for_nodes()
    return cluster


async def timed(coro: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = await coro
    return (time.perf_counter() - start) * 1000, value


async def starts(backends: dict[str, SandboxBackend], spec: SandboxSpec, n: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(n):
        for name, backend in backends.items():
            ms, sb = await timed(backend.create(spec))
            samples[name].append(ms)
            await sb.close()
    return samples


async def roundtrips(backends: dict[str, SandboxBackend], spec: SandboxSpec, n: int) -> dict[str, list[float]]:
    sandboxes = {name: await backend.create(spec) for name, backend in backends.items()}
    samples: dict[str, list[float]] = {name: [] for name in backends}
    try:
        for sb in sandboxes.values():
            for _ in range(5):
                await sb.execute("1+1")
        for _ in range(0, n, 20):
            for name, sb in sandboxes.items():
                for _ in range(20):
                    ms, res = await timed(sb.execute("1+1"))
                    if res.result != "2":
                        raise RuntimeError(f"1+1 gave {res.outcome} {res.result!r}")
                    samples[name].append(ms)
    finally:
        await asyncio.gather(*(sb.close() for sb in sandboxes.values()))
    return samples


async def throughput(backend: RayBackend, specs: list[SandboxSpec], seconds: float) -> dict[str, Any]:
    sandboxes = await asyncio.gather(*(backend.create(spec) for spec in specs))
    try:
        deadline = time.perf_counter() + seconds

        async def loop(sb: Any) -> int:
            done = 0
            while time.perf_counter() < deadline:
                await sb.execute("1+1")
                done += 1
            return done

        counts = await asyncio.gather(*(loop(sb) for sb in sandboxes))
        return {"exec_per_s": round(sum(counts) / seconds, 1), "nodes": len({sb.node.node_id for sb in sandboxes})}
    finally:
        await asyncio.gather(*(sb.close() for sb in sandboxes))


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    spec = SandboxSpec(image=args.image, cpus=0.5, memory="512m", labels={"tenant": "bench"})
    ray_backend, docker_backend = RayBackend(args.address), DockerBackend()
    backends: dict[str, SandboxBackend] = {"ray": ray_backend, "direct": docker_backend}
    # Unmeasured: the first sandbox on each node pays for starting its Ray worker pool.
    for zone in ZONES:
        await (await ray_backend.create(spec.model_copy(update={"resources": {zone: MARKER}}))).close()
    start = await starts(backends, spec, args.n)
    trip = await roundtrips(backends, spec, args.roundtrips)
    spread = [spec.model_copy(update={"resources": {ZONES[i % 3]: MARKER}}) for i in range(args.sandboxes)]
    packed = [spec.model_copy(update={"resources": {ZONES[0]: MARKER}}) for _ in range(args.sandboxes)]
    three, one = await throughput(ray_backend, spread, args.seconds), await throughput(ray_backend, packed, args.seconds)
    await docker_backend.close()
    figures = {
        "start_ms_p50": {name: p50(s) for name, s in start.items()},
        "exec_roundtrip_ms_p50": {name: p50(s) for name, s in trip.items()},
        "exec_roundtrip_ms_p95": {name: p95(s) for name, s in trip.items()},
        "throughput_exec_per_s": {"3_nodes": three, "1_node": one},
    }
    start_ratio = figures["start_ms_p50"]["ray"] / figures["start_ms_p50"]["direct"]
    trip_ratio = figures["exec_roundtrip_ms_p50"]["ray"] / figures["exec_roundtrip_ms_p50"]["direct"]
    return {
        "n": args.n,
        "roundtrips": args.roundtrips,
        "sandboxes": args.sandboxes,
        "ray_version": ray.__version__,
        **figures,
        "ratios": {"start": round(start_ratio, 3), "exec_roundtrip": round(trip_ratio, 3),
                   "throughput_3_vs_1": round(three["exec_per_s"] / one["exec_per_s"], 3)},
        "targets_met": {"start_ray_le_1.3x": start_ratio <= 1.3, "exec_roundtrip_ray_le_1.5x": trip_ratio <= 1.5},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="a running cluster with zone_a..zone_c nodes; default: start one")
    parser.add_argument("--n", type=int, default=8, help="sandbox starts per backend")
    parser.add_argument("--roundtrips", type=int, default=200)
    parser.add_argument("--sandboxes", type=int, default=6, help="concurrent sandboxes in the throughput figure")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--image", default=DEFAULT_CPU_IMAGE)
    args = parser.parse_args()
    cluster = None
    if args.address is None:
        cluster = local_cluster()
        args.address = cluster.address
    try:
        ray.init(address=args.address, namespace="cellforge-bench", logging_level="WARNING")
        print(json.dumps(asyncio.run(bench(args))))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
