"""Scale benchmark (issue 17): simulate a knockout screen and design a model for it offline, end to end,
through the `cellforge` CLI, at growing numbers of cells; memory should stay flat in the number of cells.

    .venv/bin/python benchmarks/scale_bench.py --cells 100000 400000 [--genes 2000] [--seed 0] [--max-nodes N]
        [--max-minutes M]

Per size: `cellforge data simulate` then `cellforge design --llm offline` (Docker sandboxes), each in its
own process: wall time and that process's peak RSS (`wait4` rusage), the size of the file, and the largest
`memory.max_usage_in_bytes` (cgroup v1) or `memory.peak` (v2) of the sandbox containers the design started
(labelled with its pid); per design phase (its progress lines on stderr) the seconds, the CLI's peak RSS
(polled from /proc every 0.5 s) and the sandboxes' peak. Prints one JSON object. Targets: at 1,000,000 cells x 2,000 genes, simulate +
design within 20 minutes and 6 GB of peak RSS for each CLI process, the sandboxes within their limit. The
design runs with the CLI's default time budget (`--max-minutes` 15, the search spending what is left after the
data path) unless `--max-minutes` / `--max-nodes` are given; each row records why its search stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGET_SECONDS = 20 * 60
TARGET_RSS_BYTES = 6 * 10**9
SANDBOX_LIMIT_BYTES = 4 * 2**30  # DesignSettings.memory default ("4g")
CGROUP_FILES = ("/sys/fs/cgroup/memory/docker/{id}/memory.max_usage_in_bytes",
                "/sys/fs/cgroup/system.slice/docker-{id}.scope/memory.peak")


PHASES = ("profile", "analysis", "discussion", "split", "codegen", "sandbox", "pytest", "train", "validate",
          "debug", "improve", "compete", "deliver", "evaluate", "report", "done")  # service.pipeline.progress


class Phases:
    """Per phase of the design (from its progress lines on stderr, `<phase> <message>`): wall seconds, the
    CLI process's peak RSS (polled from /proc) and the sandboxes' peak, while that phase was the latest."""

    def __init__(self) -> None:
        self.current, self.started = "start", time.perf_counter()
        self.rows: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def _row(self, phase: str) -> dict[str, float]:
        return self.rows.setdefault(phase, {"seconds": 0.0, "peak_rss_mb": 0.0, "sandbox_peak_mb": 0.0})

    def line(self, text: str) -> None:
        word = text.split(" ", 1)[0]
        if word not in PHASES or word == self.current:
            return
        with self._lock:
            now = time.perf_counter()
            self._row(self.current)["seconds"] += now - self.started
            self.current, self.started = word, now

    def memory(self, rss_bytes: int = 0, sandbox_bytes: int = 0) -> None:
        with self._lock:
            row = self._row(self.current)
            row["peak_rss_mb"] = max(row["peak_rss_mb"], rss_bytes / 2**20)
            row["sandbox_peak_mb"] = max(row["sandbox_peak_mb"], sandbox_bytes / 2**20)

    def close(self) -> dict[str, dict[str, float]]:
        self.line("done ")
        return {k: {m: round(v, 1) for m, v in row.items()} for k, row in self.rows.items()}


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class SandboxPeak:
    """Polls the containers a process owns (label cellforge.owner=vm:<pid>:...) for their cgroup peak memory."""

    def __init__(self, interval: float = 1.0, phases: Phases | None = None) -> None:
        import docker

        self._client = docker.from_env()
        self.phases = phases
        self._interval, self.pid = interval, 0
        self.peak, self.containers = 0, set[str]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for c in self._client.containers.list(filters={"label": "cellforge.managed=true"}):
                    if not c.labels.get("cellforge.owner", "").startswith(f"vm:{self.pid}:"):
                        continue
                    self.containers.add(c.id)
                    for pattern in CGROUP_FILES:
                        try:
                            value = int(Path(pattern.format(id=c.id)).read_text())
                        except (OSError, ValueError):
                            continue
                        self.peak = max(self.peak, value)
                        if self.phases is not None:
                            self.phases.memory(sandbox_bytes=value)
            except Exception:  # a container gone between list and read, a slow daemon: poll again
                pass
            self._stop.wait(self._interval)

    def start(self, pid: int) -> None:
        self.pid = pid
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str], sandbox: SandboxPeak | None = None, phases: Phases | None = None) -> dict[str, Any]:
    """Run a CLI command; its wall time, peak RSS (of it and the children it waited for), last JSON line,
    and with `phases` the figures of each design phase."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if sandbox is not None:
        sandbox.start(proc.pid)
    stdout_lines: list[str] = []
    err_lines: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    reader = threading.Thread(target=lambda: stdout_lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    done = threading.Event()
    if phases is not None:
        def poll() -> None:
            while not done.wait(0.5):
                phases.memory(rss_bytes=_rss(proc.pid))
        threading.Thread(target=poll, daemon=True).start()
    for line in proc.stderr:
        err_lines.append(line)
        if phases is not None:
            phases.line(line.strip())
    err = "".join(err_lines)
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if sandbox is not None:
        sandbox.stop()
    last = next((line for line in reversed(stdout_lines) if line.startswith("{")), "{}")
    return {"cmd": " ".join(cmd[1:3]), "rc": proc.returncode, "wall_s": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
            "json": json.loads(last), "stderr_tail": err[-600:] if proc.returncode else ""}


def case(cells: int, genes: int, seed: int, max_nodes: int | None, max_minutes: float | None,
         root: Path) -> dict[str, Any]:
    cli = str(Path(sys.executable).parent / "cellforge")
    data = root / f"knockout-{cells}.h5ad"
    sim = run([cli, "data", "simulate", "--kind", "knockout", "--cells", str(cells), "--genes", str(genes),
               "--seed", str(seed), "--out", str(data), "--json"])
    row: dict[str, Any] = {"cells": cells, "genes": genes, "simulate": sim}
    if sim["rc"] != 0:
        return row
    row["file_mb"] = round(data.stat().st_size / 2**20, 1)
    phases = Phases()
    sandbox = SandboxPeak(phases=phases)
    budget = ([] if max_nodes is None else ["--max-nodes", str(max_nodes)]) + \
        ([] if max_minutes is None else ["--max-minutes", str(max_minutes)])
    design = run([cli, "design", "--data", str(data), "--task", "Predict expression after CRISPR knockout of unseen "
                  "genes", "--llm", "offline", "--out", str(root / f"run-{cells}"), "--seed", str(seed),
                  *budget, "--json"], sandbox, phases)
    design["phases"] = phases.close()
    design["sandbox_peak_mb"] = round(sandbox.peak / 2**20, 1)
    design["sandbox_containers"] = len(sandbox.containers)
    metrics_file = root / f"run-{cells}" / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        design["status"] = metrics.get("status")
        design["verdict"] = (metrics.get("verdict") or {}).get("summary")
        search = metrics.get("search") or {}
        design["search"] = {k: search.get(k) for k in ("nodes", "improve_nodes", "stopped", "skipped")}
    row["design"] = design
    total = sim["wall_s"] + design["wall_s"]
    row.update({"total_s": round(total, 1), "within_time_target": total <= TARGET_SECONDS,
                "within_rss_target": max(sim["peak_rss_mb"], design["peak_rss_mb"]) * 2**20 <= TARGET_RSS_BYTES,
                "sandbox_within_limit": design["sandbox_peak_mb"] * 2**20 <= SANDBOX_LIMIT_BYTES})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-nodes", type=int, default=None, help="cap on the improve steps (default: none)")
    parser.add_argument("--max-minutes", type=float, default=None, help="design budget (default: the CLI's, 15)")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and runs go (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cellforge-scale-", dir=args.workdir) as tmp:
        rows = []
        for n in args.cells:
            rows.append(case(n, args.genes, args.seed, args.max_nodes, args.max_minutes, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress, in case a later size fails
    print(json.dumps({"benchmark": "scale", "genes": args.genes, "seed": args.seed, "cases": rows}))


if __name__ == "__main__":
    main()
