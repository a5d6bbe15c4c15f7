"""`cellforge score` and `cellforge baselines`: the service's own scoring of predictions on a split."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, cast

import typer
from rich.progress import Progress
from rich.table import Table

from service.data import DataError

# The evaluator and baselines (scikit-learn) load inside the commands, not with the whole CLI.
if TYPE_CHECKING:
    from service.data.celleval import CellEvalReport
    from service.data.evaluate import EvaluationReport, Evaluator

from .choices import WhichChoice
from .output import JsonOpt, emit_json, fail, spinner, tables


SplitOpt = Annotated[Path, typer.Option("--split", help="A split directory (cellforge data split).",
                                        show_default=False)]
WhichOpt = Annotated[WhichChoice, typer.Option("--which", help="Score the test or the val conditions.")]

# The columns of the baselines table: the metrics models are compared on.
HEADLINE = ("pearson_delta", "pearson_delta_pert", "pearson_delta_top20_de", "mse_top20_de", "r2_delta",
            "discrimination_l1", "de_overlap")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _evaluator(split: Path, which: str, progress: Progress) -> Evaluator:
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


def _cell_eval_table(report: CellEvalReport) -> Table:
    from service.data.celleval import LOWER_IS_BETTER

    table = Table(title=f"cell-eval {report.version} (Virtual Cell Challenge metrics)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("better", justify="left")
    for name, value in {"vcc_score": report.vcc_score, **report.summary}.items():
        table.add_row(name, _fmt(value), "lower" if name in LOWER_IS_BETTER else "higher")
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


def _verdict(report: EvaluationReport, baselines: dict[str, EvaluationReport], which: str, primary: str,
             predictions: Path):
    """The predictions against the best baseline on the scored part, as a design run's verdict states it."""
    from service.pipeline.verdict import (MIN_TEST_CONDITIONS, VERDICT_METRICS, Verdict, beats_best, headline,
                                          metric_verdict)

    metrics = {}
    for m in dict.fromkeys((primary, *VERDICT_METRICS)):
        scores = {n: r.summary.get(m) for n, r in baselines.items()}
        mine = report.summary.get(m)
        metrics[m] = metric_verdict(m, mine if which == "val" else None, mine if which == "test" else None,
                                    scores if which == "val" else {}, scores if which == "test" else {},
                                    report.per_condition, {n: r.per_condition for n, r in baselines.items()})
    p = metrics[primary]
    v = Verdict(status="scored", primary_metric=primary, beats_baselines=beats_best(p, one_split=True),
                subject=f"predictions ({predictions.name})", n_test_conditions=report.n_conditions, metrics=metrics)
    if report.n_conditions < MIN_TEST_CONDITIONS:
        v.warnings.append(f"the {which} part holds {report.n_conditions} condition(s), fewer than "
                          f"{MIN_TEST_CONDITIONS}: too few to decide; read the per-condition spread")
    v.summary = headline(v)
    return v


def score(
    split: SplitOpt,
    predictions: Annotated[Path, typer.Option("--predictions", help="Predictions .h5ad (one row per condition).",
                                              show_default=False)],
    which: WhichOpt = WhichChoice.TEST,
    primary: Annotated[str, typer.Option("--primary", help="The metric the verdict is stated for (with "
                                                           "mse_top20_de).")] = "pearson_delta_pert",
    per_condition: Annotated[bool, typer.Option("--per-condition", help="Also print one row per condition.")] = False,
    cell_eval: Annotated[bool, typer.Option("--cell-eval/--no-cell-eval",
                                            help="Also score with Arc's cell-eval (VCC profile and core metrics).")
                         ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Score predictions against the real cells of the split, with the data ceiling, and against every
    applicable baseline: the verdict (best baseline, margin, who beats the predictions) comes first; then
    cell-eval's scores of the same predictions."""
    from service.data.baselines import run_baselines
    from service.data.celleval import CellEvalError

    try:
        with spinner() as progress:
            evaluator = _evaluator(split, which, progress)
            progress.add_task("scoring", total=None)
            report = evaluator.score(predictions)
            progress.add_task("baselines", total=None)
            baselines = {n: evaluator.score(p) for n, p in run_baselines(evaluator.task).items()}
            cell: CellEvalReport | None = None
            cell_eval_error: str | None = None
            if cell_eval:
                progress.add_task("cell-eval (first use compiles its DE test: about a minute)", total=None)
                try:
                    cell = evaluator.cell_eval(predictions)
                except CellEvalError as exc:  # our scores stand; say why cell-eval's are missing
                    cell_eval_error = str(exc)
    except DataError as exc:
        fail(exc, json_out)
    if primary not in report.summary:
        fail(DataError(f"--primary {primary!r} is not a metric of these predictions; one of "
                       f"{', '.join(sorted(report.summary))}"), json_out)
    from service.cli.design_cmd import print_verdict

    verdict = _verdict(report, baselines, which, primary, predictions)
    print_verdict(verdict.model_dump(mode="json"), json_out)
    console = tables(json_out)
    if per_condition:
        console.print(_per_condition_table(report))
    console.print(_report_table(report))
    if cell is not None:
        console.print(_cell_eval_table(cell))
    if cell_eval_error:
        console.print(f"[yellow]{cell_eval_error}[/]")
    if json_out:
        emit_json({"ok": True, **report.model_dump(mode="json"), "verdict": verdict.model_dump(mode="json"),
                   "baselines": {n: r.summary for n, r in baselines.items()},
                   "cell_eval": cell.model_dump() if cell is not None else {"error": cell_eval_error}})


def baselines(
    split: SplitOpt,
    which: WhichOpt = WhichChoice.TEST,
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
    tables(json_out).print(table)
    if json_out:
        emit_json({"ok": True, "which": which, "ceiling": evaluator.ceiling, "written": written,
                   "baselines": {n: {"summary": r.summary, "normalized": r.normalized} for n, r in reports.items()}})


def register(app: typer.Typer) -> None:
    """Add `cellforge score` and `cellforge baselines` to the top-level app."""
    app.command("score")(score)
    app.command("baselines")(baselines)
