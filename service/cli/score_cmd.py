"""`cellforge score` and `cellforge baselines`: the service's own scoring of predictions on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from service.data import DataError

# The evaluator and baselines (scikit-learn) load inside the commands, not with the whole CLI.
if TYPE_CHECKING:
    from service.data.evaluate import EvaluationReport, Evaluator

from .output import JsonOpt, fail, spinner


SplitOpt = Annotated[Path, typer.Option("--split", help="A split directory (cellforge data split).",
                                        show_default=False)]
WhichOpt = Annotated[str, typer.Option("--which", help="Score the 'test' or the 'val' conditions.")]

# The columns of the baselines table: the metrics models are compared on.
HEADLINE = ("pearson_delta", "pearson_delta_pert", "pearson_delta_top20_de", "mse_top20_de", "r2_delta",
            "discrimination_l1", "de_overlap")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _evaluator(split: Path, which: str, progress: Progress) -> Evaluator:
    if which not in ("test", "val"):
        raise DataError(f"--which must be 'test' or 'val', not {which!r}")
    from service.data.evaluate import Evaluator

    progress.add_task(f"reading {split} and the real {which} cells", total=None)
    return Evaluator(split, cast(Literal["test", "val"], which))


def _report_table(report: EvaluationReport) -> Table:
    table = Table(title=f"{report.which}: {report.n_conditions} conditions", title_justify="left")
    for column in ("metric", "model", "mean baseline", "ceiling", "normalized"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, value in report.summary.items():
        table.add_row(name, _fmt(value), _fmt(report.mean_baseline.get(name)), _fmt(report.ceiling.get(name)),
                      _fmt(report.normalized.get(name)))
    return table


def _per_condition_table(report: EvaluationReport) -> Table:
    columns = [m for m in HEADLINE if m in report.summary]
    table = Table(title="per condition", title_justify="left")
    table.add_column("condition")
    table.add_column("cells", justify="right")
    for m in columns:
        table.add_column(m, justify="right")
    for row in report.per_condition:
        table.add_row(row["condition"], str(row["n_cells"]), *(_fmt(row.get(m)) for m in columns))
    return table


def score(
    split: SplitOpt,
    predictions: Annotated[Path, typer.Option("--predictions", help="Predictions .h5ad (one row per condition).",
                                              show_default=False)],
    which: WhichOpt = "test",
    per_condition: Annotated[bool, typer.Option("--per-condition", help="Also print one row per condition.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Score predictions against the real cells of the split, with the data ceiling and the mean-Δ baseline."""
    try:
        with spinner() as progress:
            evaluator = _evaluator(split, which, progress)
            progress.add_task("scoring", total=None)
            report = evaluator.score(predictions)
    except DataError as exc:
        fail(exc, json_out)
    console = Console()
    if per_condition:
        console.print(_per_condition_table(report))
    console.print(_report_table(report))
    if json_out:
        print(json.dumps({"ok": True, **report.model_dump()}), flush=True)


def baselines(
    split: SplitOpt,
    which: WhichOpt = "test",
    out: Annotated[Path | None, typer.Option("--out", help="Also write each baseline's predictions here.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run and score every applicable baseline on the split: one table of baselines vs the ceiling."""
    from service.data.baselines import BASELINES, applicable_baselines

    reports: dict[str, EvaluationReport] = {}
    written: dict[str, str] = {}
    try:
        with spinner() as progress:
            evaluator = _evaluator(split, which, progress)
            names = applicable_baselines(evaluator.task)
            bar = progress.add_task("baselines", total=len(names))
            for name in names:
                progress.update(bar, description=f"baseline {name}")
                predictions = BASELINES[name][0](evaluator.task)
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    predictions.write_h5ad(out / f"{name}.h5ad")
                    written[name] = str(out / f"{name}.h5ad")
                reports[name] = evaluator.score(predictions)
                progress.advance(bar)
    except DataError as exc:
        fail(exc, json_out)

    columns = [m for m in HEADLINE if any(m in r.summary for r in reports.values())]
    table = Table(title=f"baselines on {which} ({evaluator.truth.mean.shape[0]} conditions)", title_justify="left")
    table.add_column("baseline")
    for m in columns:
        table.add_column(m, justify="right")
    for name, report in reports.items():
        table.add_row(name, *(_fmt(report.summary.get(m)) for m in columns))
    table.add_row("[bold]ceiling[/]", *(_fmt(evaluator.ceiling.get(m)) for m in columns))
    Console().print(table)
    if json_out:
        print(json.dumps({
            "ok": True, "which": which, "ceiling": evaluator.ceiling, "written": written,
            "baselines": {n: {"summary": r.summary, "normalized": r.normalized} for n, r in reports.items()},
        }), flush=True)


def register(app: typer.Typer) -> None:
    """Add `cellforge score` and `cellforge baselines` to the top-level app."""
    app.command("score")(score)
    app.command("baselines")(baselines)
