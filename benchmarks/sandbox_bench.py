"""Sandbox layer benchmark: prints one JSON object (the same figures as `cellforge sandbox bench --json`).

    .venv/bin/python benchmarks/sandbox_bench.py [--n 10] [--roundtrips 200] [--max-live 30] [--image I] [--preload CODE]
        [--runtime runsc]
"""

from __future__ import annotations

import argparse
import asyncio

from sandbox import DockerBackend
from sandbox.bench import run_bench
from sandbox.spec import DEFAULT_CPU_IMAGE
from sandbox.pool import DEFAULT_PRELOAD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--roundtrips", type=int, default=200)
    parser.add_argument("--max-live", type=int, default=30)
    parser.add_argument("--live-memory", default="512m")
    parser.add_argument("--image", default=DEFAULT_CPU_IMAGE)
    parser.add_argument("--preload", default=DEFAULT_PRELOAD)
    parser.add_argument("--runtime", default=None, help="container runtime (runsc: gVisor); default the engine's")
    args = parser.parse_args()
    result = asyncio.run(
        run_bench(
            DockerBackend(),
            args.image,
            n=args.n,
            roundtrips=args.roundtrips,
            live_limit=args.max_live,
            live_memory=args.live_memory,
            preload=args.preload,
            runtime=args.runtime,
        )
    )
    print(result.model_dump_json())


if __name__ == "__main__":
    main()
