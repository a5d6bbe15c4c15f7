"""Merge the JSON outputs of several `design_bench.py` runs into one summary and a Markdown table (the
README's "How well it does" table): each run's delivered predictor and designed model against the best
baseline of that run on both headline metrics.

    .venv/bin/python benchmarks/design_table.py drug.json cytokine.json knockout.json [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from design_bench import METRICS, PRIMARY, summarise


def _label(row: dict) -> str:
    where = f", held out {row['context']}" if row.get("context") else ""
    return f"{row['kind']} seed {row['seed']}{where}"


def _cell(row: dict, metric: str) -> str:
    m = row[metric]
    own = "—" if m["designed"] is None else f"{m['designed']:.3f}"
    return (f"{m['delivered']:.3f} / {own} / {m['best']:.3f} ({m['best_baseline']}) | {m['verdict']}"
            + ("" if m["designed_verdict"] is None else f", model {m['designed_verdict']}"))


def table(rows: list[dict]) -> str:
    lines = ["| run | test conditions (units) | delivered | primary: delivered / model / best baseline | |"
             " top-20-DE MSE: delivered / model / best baseline | | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if PRIMARY not in row:
            lines.append(f"| {_label(row)} | {row.get('n_test_conditions')} | {row['status']} | — | | — | |"
                         f" {row['seconds']} |")
            continue
        units = f" ({row['n_test_groups']})" if row.get("n_test_groups") else ""
        lines.append(f"| {_label(row)} | {row['n_test_conditions']}{units} | {row['delivered']} | "
                     + " | ".join(_cell(row, m) for m in METRICS) + f" | {row['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", type=Path, nargs="+", help="design_bench.py JSON outputs")
    parser.add_argument("--json", action="store_true", help="print the merged summary as JSON after the table")
    args = parser.parse_args()
    rows = [row for path in args.reports for row in json.loads(path.read_text())["runs"]]
    print(table(rows))
    if args.json:
        print(json.dumps(summarise(rows), indent=1))


if __name__ == "__main__":
    main()
