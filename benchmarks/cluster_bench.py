"""Ray cluster benchmark: the Ray backend against the direct Docker backend in one run; prints one JSON object.

    .venv/bin/python benchmarks/cluster_bench.py [--address ADDR] [--n 8] [--roundtrips 200] [--sandboxes 6]
        [--seconds 5] [--design-jobs 3] [--image I]

Without --address it starts a local cluster of three sandbox nodes (ray.cluster_utils.Cluster, one
zone resource each) and shuts it down at the end. Figures:

- `exec_roundtrip_ms_p50`: execute("1+1") on one sandbox, through Ray and direct (target: Ray ≤ 1.5×), with
  nobody watching its events (`ray`, `direct`) and with an `on_event` callback (`ray_stream`, `direct_stream`:
  as the API's executions run), both over the sandbox actor's execution channel (sandbox.ray_channel);
  `ray_noop_call`: an actor call to the same sandbox that does nothing (`idle_seconds`), Ray's cost of a call;
- `start_ms_p50`: create() until the kernel answers, through Ray and direct (target: Ray ≤ 1.3×): `ray` with
  a spare actor ready (as the API server's backend does, it makes one after each start; here it is waited for,
  unmeasured, between samples),
  `ray_no_spare` with none (`spare_ttl=0`: each start places a new actor, a new Ray worker process);
- `throughput_exec_per_s`: `--sandboxes` sandboxes executing "1+1" back to back for `--seconds`, spread
  over the three nodes vs packed on one. On one machine the nodes share its cores, so this shows how
  the backend's overhead spreads, not added compute;
- `design_jobs`: `--design-jobs` N small design jobs (simulated data, offline agents, one attempt, no
  improve steps) started at once as Ray tasks, exactly as a server runs them (service.jobs.ray_jobs), one
  per node vs all on one node. Each job asks for a whole node's CPUs, so one node runs them one after
  another and N nodes run them at once: on N machines the wall time would drop about N×. On one machine
  the N nodes share its cores, so the figure shows the cost of spreading jobs over nodes, not a speed-up.

Samples of the two backends alternate, so load from elsewhere on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from sandbox import DockerBackend, SandboxBackend, SandboxSpec
from sandbox.bench import p50, p95
from sandbox.ray_backend import MARKER, SERVER_SPARE_TTL_S, SLOT_RESOURCE, RayBackend, RaySandbox
from sandbox.spec import DEFAULT_CPU_IMAGE

ZONES = ("zone_a", "zone_b", "zone_c")
DESIGN_TASK = "Predict expression after knockout of unseen genes"
NODE_CPUS = 4


def local_cluster() -> Any:
    from ray.cluster_utils import Cluster

    args: dict[str, Any] = {"num_cpus": NODE_CPUS, "object_store_memory": 100 << 20}
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
            if isinstance(backend, RayBackend):
                await backend.spares_ready()  # its spare's worker starts now, not during the next sample
    return samples


async def roundtrips(backends: dict[str, SandboxBackend], spec: SandboxSpec, n: int) -> dict[str, list[float]]:
    sandboxes = {name: await backend.create(spec) for name, backend in backends.items()}
    samples: dict[str, list[float]] = {f"{name}{mode}": [] for name in backends for mode in ("", "_stream")}
    try:
        for sb in sandboxes.values():
            for _ in range(5):
                await sb.execute("1+1")
        for _ in range(0, n, 20):
            for name, sb in sandboxes.items():
                for mode, on_event in (("", None), ("_stream", lambda event: None)):
                    for _ in range(20):
                        ms, res = await timed(sb.execute("1+1", on_event=on_event))
                        if res.result != "2":
                            raise RuntimeError(f"1+1 gave {res.outcome} {res.result!r}")
                        samples[f"{name}{mode}"].append(ms)
                if isinstance(sb, RaySandbox):
                    for _ in range(20):  # the transport's floor: an actor call that does nothing
                        samples.setdefault(f"{name}_noop_call", []).append((await timed(sb.idle_seconds()))[0])
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


def design_job(data: Path, number: int) -> Any:
    """A small design job as a server queues it (the handler on the node reads only these params)."""
    from service.jobs import Job

    return Job(id=f"job_bench{number}_{secrets.token_hex(4)}", tenant_id="tn_000000bench", kind="design",
               status="running", params={"dataset_path": str(data), "task": DESIGN_TASK,
                                         "options": {"max_attempts": 1, "max_nodes": 0, "cpus": 1.0, "memory": "2g"}},
               result=None, error=None, phase=None, checkpoint=None, attempts=1, cancel_requested=False,
               created_at=time.time(), started_at=time.time(), finished_at=None)


async def design_jobs(data: Path, zones: list[str]) -> dict[str, Any]:
    """One design job per entry of `zones`, all at once, each a Ray task on a node of that zone taking all its
    CPUs; wall seconds until all ended, and each job's own seconds."""
    from service.jobs.ray_jobs import Outcome as JobOutcome
    from service.jobs.ray_jobs import _task, job_options

    async def one(number: int, zone: str) -> tuple[float, str, str]:
        job = design_job(data, number)
        options = {**job_options(job), "num_cpus": NODE_CPUS, "resources": {SLOT_RESOURCE: MARKER, zone: MARKER}}
        started = time.perf_counter()
        async for ref in _task.options(**options).remote(job):  # type: ignore[attr-defined]  # a streaming generator
            item = await ref
            if isinstance(item, JobOutcome):
                return time.perf_counter() - started, item.node, item.result["status"]
        raise RuntimeError(f"design job {job.id} ended without a result")

    started = time.perf_counter()
    done = await asyncio.gather(*(one(i, zone) for i, zone in enumerate(zones)))
    return {"wall_s": round(time.perf_counter() - started, 1), "job_s": sorted(round(s, 1) for s, _, _ in done),
            "nodes": len({node for _, node, _ in done}), "statuses": sorted({status for _, _, status in done})}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    spec = SandboxSpec(image=args.image, cpus=0.5, memory="512m", labels={"tenant": "bench"})
    ray_backend, docker_backend = RayBackend(args.address, spare_ttl=SERVER_SPARE_TTL_S), DockerBackend()
    backends: dict[str, SandboxBackend] = {"ray": ray_backend, "direct": docker_backend}
    # Unmeasured: the first sandbox on each node pays for starting its Ray worker pool.
    for zone in ZONES:
        await (await ray_backend.create(spec.model_copy(update={"resources": {zone: MARKER}}))).close()
    start = await starts({**backends, "ray_no_spare": RayBackend(args.address, spare_ttl=0)}, spec, args.n)
    trip = await roundtrips(backends, spec, args.roundtrips)
    spread = [spec.model_copy(update={"resources": {ZONES[i % 3]: MARKER}}) for i in range(args.sandboxes)]
    packed = [spec.model_copy(update={"resources": {ZONES[0]: MARKER}}) for _ in range(args.sandboxes)]
    three, one = await throughput(ray_backend, spread, args.seconds), await throughput(ray_backend, packed, args.seconds)
    await docker_backend.close()
    await ray_backend.close()
    jobs: dict[str, Any] = {}
    if args.design_jobs:
        from service.data import simulate

        n = min(args.design_jobs, len(ZONES))
        with tempfile.TemporaryDirectory(prefix="cellforge-bench-") as folder:
            data = Path(folder) / "screen.h5ad"
            simulate("knockout", 0, n_cells=1500, n_genes=50, n_perturbations=6).write_h5ad(data)
            spread_jobs = await design_jobs(data, [ZONES[i] for i in range(n)])
            one_node = await design_jobs(data, [ZONES[0]] * n)
        jobs = {"design_jobs": {
            "n": n, f"{n}_nodes": spread_jobs, "1_node": one_node,
            "wall_ratio_1_node_vs_n_nodes": round(one_node["wall_s"] / spread_jobs["wall_s"], 3),
            "note": (f"each job takes a whole node's CPUs, so one node runs the {n} jobs one after another and {n} "
                     f"nodes run them at once; this machine has {os.cpu_count()} cores shared by all the local "
                     "nodes (and anything else running), so the figures show the overhead of spreading jobs over "
                     "nodes, not the speed-up of separate machines"),
        }}
    figures: dict[str, dict[str, Any]] = {
        "start_ms_p50": {name: p50(s) for name, s in start.items()},
        "exec_roundtrip_ms_p50": {name: p50(s) for name, s in trip.items()},
        "exec_roundtrip_ms_p95": {name: p95(s) for name, s in trip.items()},
        "throughput_exec_per_s": {"3_nodes": three, "1_node": one},
    }
    start_ratio = figures["start_ms_p50"]["ray"] / figures["start_ms_p50"]["direct"]
    trip_ratio = figures["exec_roundtrip_ms_p50"]["ray"] / figures["exec_roundtrip_ms_p50"]["direct"]
    cold_ratio = figures["start_ms_p50"]["ray_no_spare"] / figures["start_ms_p50"]["direct"]
    stream_ratio = figures["exec_roundtrip_ms_p50"]["ray_stream"] / figures["exec_roundtrip_ms_p50"]["direct_stream"]
    return {
        "n": args.n,
        "roundtrips": args.roundtrips,
        "sandboxes": args.sandboxes,
        "ray_version": ray.__version__,
        **figures,
        "ratios": {"start": round(start_ratio, 3), "start_no_spare": round(cold_ratio, 3),
                   "exec_roundtrip": round(trip_ratio, 3), "exec_roundtrip_stream": round(stream_ratio, 3),
                   "throughput_3_vs_1": round(three["exec_per_s"] / one["exec_per_s"], 3)},
        "targets_met": {"start_ray_le_1.3x": start_ratio <= 1.3, "exec_roundtrip_ray_le_1.5x": trip_ratio <= 1.5,
                        "exec_roundtrip_stream_ray_le_1.5x": stream_ratio <= 1.5},
        **jobs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="a running cluster with zone_a..zone_c nodes; default: start one")
    parser.add_argument("--n", type=int, default=8, help="sandbox starts per backend")
    parser.add_argument("--roundtrips", type=int, default=200)
    parser.add_argument("--sandboxes", type=int, default=6, help="concurrent sandboxes in the throughput figure")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--design-jobs", type=int, default=3,
                        help=f"design jobs in the N-nodes-vs-one figure (at most {len(ZONES)}; 0: skip it)")
    parser.add_argument("--image", default=DEFAULT_CPU_IMAGE)
    args = parser.parse_args()
    os.environ.setdefault("CELLFORGE_LLM_BACKEND", "offline")  # the design jobs' agents (their nodes inherit it)
    cluster = None
    if args.address is None:
        cluster = local_cluster()
        args.address = cluster.address
    try:
        ray.init(address=args.address, namespace="cellforge-bench", logging_level=logging.WARNING)
        print(json.dumps(asyncio.run(bench(args))))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()


if __name__ == "__main__":
    main()
