"""Cost of the design conversation (task analysis + expert discussion): offline vs a scripted model.

The scripted model is the test suite's OpenAI-compatible stand-in (tests/fake_llm_server.py, real `openai`
client over loopback HTTP); it answers like the rule-based experts, after `--latency` seconds per reply,
so both runs reach the same plan and the figures compare only what the LLM layer sends and how it waits.
Prompt size is measured on the bytes the server received (characters of the messages; tokens ≈ chars / 4).
Prints one JSON object.

    .venv/bin/python benchmarks/llm_calls_bench.py [--tasks knockout drug] [--rounds 4] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

from agent_profiles import TASKS  # noqa: E402
from fake_llm_server import FakeLLMServer, Reply  # noqa: E402
from scripted_experts import RuleModel  # noqa: E402

from service.agents import analyse_task, handlers, run_discussion  # noqa: E402
from service.llm import LLMConfig, OfflineBackend, make_backend, read_calls  # noqa: E402

def offline_run(facts, task: str, rounds: int, work: Path) -> dict:
    llm = OfflineBackend(handlers())
    started = time.perf_counter()
    result = run_discussion(analyse_task(facts, task, llm), facts, llm, work / "offline", max_rounds=rounds)
    return {"seconds": round(time.perf_counter() - started, 3), "rounds": len(result.rounds), "plan": result.plan}


def scripted_run(facts, task: str, rounds: int, latency: float, work: Path) -> dict:
    server = FakeLLMServer().start()
    try:
        model = RuleModel()
        server.script(*[Reply(model, delay=latency) for _ in range(400)])
        config = LLMConfig.resolve({"model": "fake-model", "base_url": server.base_url, "api_key": "unused"},
                                   env={}, config_path=None)
        run_dir = work / "scripted"
        llm = make_backend(config, handlers(), run_dir)
        started = time.perf_counter()
        result = run_discussion(analyse_task(facts, task, llm), facts, llm, run_dir, max_rounds=rounds)
        seconds = time.perf_counter() - started
        chars = [sum(len(m["content"]) for m in r.messages) for r in server.requests]
        by_kind_chars: dict[str, int] = {}
        for r, n in zip(server.requests, chars, strict=True):
            found = re.search(r"JSON schema \((\w+)\)", r.messages[0]["content"])
            schema = found.group(1) if found else "unnamed"
            by_kind_chars[schema] = by_kind_chars.get(schema, 0) + n
        system_chars = [len(r.messages[0]["content"]) for r in server.requests]
        calls = read_calls(run_dir)
    finally:
        server.stop()
    return {"seconds": round(seconds, 3), "rounds": len(result.rounds), "plan": result.plan,
            "calls": len(calls), "http_requests": len(chars), "prompt_chars": sum(chars),
            "prompt_tokens_est": sum(chars) // 4,
            "prompt_chars_by_schema": dict(sorted(by_kind_chars.items())), "system_prompt_chars_mean": round(sum(system_chars) / len(chars)),
            "by_kind": {k: sum(1 for c in calls if c.kind == k) for k in sorted({c.kind for c in calls})}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["knockout", "drug"], choices=sorted(TASKS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds the scripted model takes per reply")
    args = parser.parse_args()
    out = {"latency_s": args.latency, "tasks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.tasks:
            facts, task = TASKS[name]
            work = Path(tmp) / name
            offline = offline_run(facts, task, args.rounds, work)
            scripted = scripted_run(facts, task, args.rounds, args.latency, work)
            out["tasks"][name] = {
                "offline_seconds": offline["seconds"],
                "same_plan": scripted.pop("plan") == offline.pop("plan"),
                **{k: v for k, v in scripted.items()},
            }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
