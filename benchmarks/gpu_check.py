"""GPU sandbox check, for a machine with an NVIDIA GPU and the NVIDIA container toolkit: prints one JSON object.

    .venv/bin/cellforge images build --flavor gpu
    .venv/bin/python benchmarks/gpu_check.py [--gpus 1] [--runtime runsc] [--size 4096] [--image I]

Starts a real sandbox with a GPU device request, and inside it: `torch.cuda.is_available()`, the
devices the sandbox sees, a float32 matmul on the GPU checked against the CPU, and its TFLOP/s.
Exit status 0 only when CUDA is available in the sandbox and the matmul agrees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from sandbox import DEFAULT_GPU_IMAGE, DockerBackend, SandboxError, SandboxSpec

PROBE = """
import json, time, torch
facts = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if facts["cuda_available"]:
    facts["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    n = SIZE
    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    torch.cuda.synchronize()
    (a @ b).sum().item()  # warm-up: cuBLAS handles, kernels
    runs, start = 10, time.perf_counter()
    for _ in range(runs):
        c = a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / runs
    facts["matmul_n"] = n
    facts["matmul_ms"] = round(seconds * 1000, 3)
    facts["matmul_tflops"] = round(2 * n ** 3 / seconds / 1e12, 2)
    rows = slice(0, 64)
    expected = a[rows].cpu().double() @ b.cpu().double()
    facts["matmul_max_rel_error"] = float(((c[rows].cpu().double() - expected).abs().max() / expected.abs().max()))
    facts["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
print(json.dumps(facts))
"""


async def check(args: argparse.Namespace) -> dict:
    spec = SandboxSpec(image=args.image, gpus=args.gpus, runtime=args.runtime, memory=args.memory, timeout=300)
    backend = DockerBackend()
    started = time.perf_counter()
    sb = await backend.create(spec)
    try:
        ready_ms = (time.perf_counter() - started) * 1000
        res = await sb.execute(PROBE.replace("SIZE", str(args.size)), timeout=300)
        if res.outcome != "ok":
            return {"ok": False, "outcome": res.outcome.value, "error": f"{res.ename}: {res.evalue}",
                    "died_cause": res.died_cause, "stderr": res.stderr[-2000:]}
        facts = json.loads(res.stdout.strip().splitlines()[-1])
        nvidia_smi = await sb.commands.run(["sh", "-c", "nvidia-smi -L || true"], timeout=60)
    finally:
        await sb.close()
        await backend.close()
    ok = bool(facts["cuda_available"]) and facts.get("matmul_max_rel_error", 1.0) < 1e-2
    return {"ok": ok, "image": args.image, "runtime": args.runtime or "runc", "gpus": args.gpus,
            "ready_ms": round(ready_ms, 1), "nvidia_smi": nvidia_smi.stdout.strip(), **facts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--runtime", default=None, help="container runtime (runsc needs a runsc with --nvproxy)")
    parser.add_argument("--image", default=DEFAULT_GPU_IMAGE)
    parser.add_argument("--memory", default="8g")
    parser.add_argument("--size", type=int, default=4096, help="matmul size n (n x n float32)")
    args = parser.parse_args()
    try:
        result = asyncio.run(check(args))
    except SandboxError as exc:
        result = {"ok": False, "error": str(exc)}
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
