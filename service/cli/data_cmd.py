"""`cellforge data profile|split`: look at a perturbation dataset and cut it into an honest split.

Commands hang off `data_app`, so other data commands (e.g. `data simulate`) are added to the same
sub-app by decorating further functions below.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from service.data import DataError, DataProfile, make_split, profile_dataset
from service.data.load import DEFAULT_MIN_CELLS
from service.data.splits import SplitInfo

from .choices import AtacChoice, SchemeChoice
from .output import JsonOpt, emit_json, err, fail, spinner, tables

data_app = typer.Typer(help="Profile, split and simulate perturbation datasets (.h5ad).", no_args_is_help=True)

FileArg = Annotated[Path, typer.Argument(help="An AnnData .h5ad file.", show_default=False)]
KeyOpt = Annotated[str | None, typer.Option("--perturbation-key", help="obs column of the perturbation.")]
ControlOpt = Annotated[str | None, typer.Option("--control", help="Control label (default: detected).")]
DoseKeyOpt = Annotated[str | None, typer.Option("--dose-key", help="obs column of the dose (default: detected).")]
ContextKeyOpt = Annotated[str | None, typer.Option(
    "--context-key", help="obs column of the cell type / context (default: detected; 'none': pool every cell).")]
MinCellsOpt = Annotated[int, typer.Option("--min-cells", help="Fail on conditions with fewer cells (0: never).")]


def _show_profile(p: DataProfile) -> None:
    table = Table(title=f"{p.source}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    cpc, lib = p.cells_per_condition, p.library_size
    rows = [
        ("cells x genes", f"{p.n_cells:,} x {p.n_genes:,}"
         + (f" ({p.n_features:,} features)" if p.n_features != p.n_genes else "")),
        ("modalities", ", ".join(p.modalities) + f" ({p.normalization})"),
        ("perturbation", f"{p.perturbation_kind}; column {p.perturbation_key!r}, control {', '.join(p.control_labels)}"),
        ("perturbations / conditions", f"{p.n_perturbations:,} / {p.n_conditions:,}; {p.n_control_cells:,} control cells"),
        ("cells per condition", f"min {cpc['min']:g}, median {cpc['median']:g}, max {cpc['max']:g}"),
        ("sparsity", f"{p.sparsity:.1%}"),
        ("library size", f"median {lib['median']:g} (q10 {lib['q10']:g}, q90 {lib['q90']:g})"),
        ("contexts", f"{p.n_contexts} ({p.context_key})" if p.context_key else "none"),
        ("doses", f"{p.n_doses} levels ({p.dose_key})" if p.dose_key else "none"),
        ("combos", f"{p.n_combos}" + (f", {p.combos.both_singles_present} with both singles" if p.combos else "")),
        ("batches", f"{p.n_batches} ({p.batch_key})" if p.batch_key else "none"),
    ]
    if p.target_genes_measured_fraction is not None:
        rows.append(("targets measured", f"{p.target_genes_measured_fraction:.0%} of {p.n_target_genes}"))
    if p.target_knockdown_fraction is not None:
        rows.append(("targets knocked down", f"{p.target_knockdown_fraction:.0%}"))
    rows += [
        ("effects above noise", f"{p.above_noise_fraction:.0%} of conditions"),
        ("recommended split", (p.recommended_split or "none: nothing can be held out (see the notes)")
         + (f" (also {', '.join(p.alternative_splits)})" if p.alternative_splits else "")),
        ("recommended metrics", ", ".join(p.recommended_metrics)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out = tables(False)
    out.print(table)
    for note in p.notes:
        out.print(f"[yellow]note:[/] {note}", highlight=False)


@data_app.command("profile")
def profile(file: FileArg, perturbation_key: KeyOpt = None, control: ControlOpt = None, dose_key: DoseKeyOpt = None,
            context_key: ContextKeyOpt = None, min_cells: MinCellsOpt = DEFAULT_MIN_CELLS,
            json_out: JsonOpt = False) -> None:
    """Detect the layout of FILE, validate it and print its profile."""
    try:
        with spinner() as progress:
            task = progress.add_task("profiling", total=1.0)
            result = profile_dataset(file, perturbation_key=perturbation_key, control=control, dose_key=dose_key,
                                     context_key=context_key, min_cells=min_cells,
                                     on_progress=lambda frac: progress.update(task, completed=frac))
    except DataError as exc:
        fail(exc, json_out)
    if json_out:
        emit_json({"ok": True, **result.model_dump()})
    else:
        _show_profile(result)


@data_app.command("split")
def split(
    file: FileArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write the split into.", show_default=False)],
    scheme: Annotated[SchemeChoice, typer.Option("--scheme", help="Which conditions are held out.",
                                                 show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same split.")] = 0,
    n_genes: Annotated[int | None, typer.Option(
        "--n-genes", help="Keep this many highly variable genes (perturbed genes always kept).")] = None,
    perturbation_key: KeyOpt = None,
    control: ControlOpt = None,
    dose_key: DoseKeyOpt = None,
    context_key: ContextKeyOpt = None,
    context: Annotated[str | None, typer.Option(
        "--context", help="unseen-context: the context to hold out (default: drawn).")] = None,
    few_shot_k: Annotated[int, typer.Option(
        "--few-shot-k", help="unseen-context: conditions of the held-out context kept in train.")] = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction")] = 0.2,
    val_fraction: Annotated[float, typer.Option("--val-fraction")] = 0.1,
    atac: Annotated[AtacChoice, typer.Option(
        "--atac", help="Peaks: binarize, or tfidf (idf of the training cells).")] = AtacChoice.BINARIZE,
    min_cells: MinCellsOpt = DEFAULT_MIN_CELLS,
    json_out: JsonOpt = False,
) -> None:
    """Split FILE by SCHEME into train/val_inputs/val_truth/test_inputs/test_truth + split.json under OUT."""
    try:
        with spinner() as progress:
            task = progress.add_task("loading", total=None)
            info = make_split(file, SchemeChoice(scheme).value, seed, out, n_genes, perturbation_key=perturbation_key, control=control,
                              dose_key=dose_key, context_key=context_key, min_cells=min_cells,
                              test_fraction=test_fraction, val_fraction=val_fraction,
                              context=context, few_shot_k=few_shot_k, atac=AtacChoice(atac).value,
                              on_progress=lambda msg: progress.update(task, description=msg))
    except DataError as exc:
        fail(exc, json_out)
    if json_out:
        emit_json({"ok": True, "out": str(out), **info.model_dump()})
    else:
        _show_split(info, out)


def _show_split(info: SplitInfo, out: Path) -> None:
    held = f", held-out context {info.held_out_context!r}" if info.held_out_context else ""
    table = Table(title=f"{info.scheme} split (seed {info.seed}{held}) -> {out}", title_justify="left")
    for column in ("part", "conditions", "cells", "categories"):
        table.add_column(column)
    cells = {"train": info.n_cells["train"], "val": info.n_cells["val_truth"], "test": info.n_cells["test_truth"]}
    for part, conds in info.conditions.items():
        counts = Counter(info.categories[c] for c in conds if c in info.categories)
        table.add_row(part, str(len(conds)), str(cells[part]), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for which in ("val", "test"):
        table.add_row(f"{which}_inputs", "-", str(info.n_cells[f"{which}_inputs"]),
                      f"control cells of the {which} contexts")
    out_console = tables(False)
    out_console.print(table)
    if info.validation == "cv":
        out_console.print(f"validation: {len(info.folds)}-fold cross-validation over whole {info.group_by} groups of "
                          f"the training conditions (the val fold would be too small to decide): "
                          f"{', '.join(str(len(f)) for f in info.folds)} conditions per fold", highlight=False)
    else:
        out_console.print(f"validation: whole {info.group_by} groups held out, as the test holds them out",
                          highlight=False)
    out_console.print(f"{len(info.genes)} features ({', '.join(f'{k} {v}' for k, v in info.feature_types.items())}), "
                      f"{info.normalization}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add `cellforge data` to the top-level app."""
    app.add_typer(data_app, name="data")


@data_app.command("simulate")
def simulate_cmd(
    kind: Annotated[str, typer.Option("--kind", help="knockout, combo, drug, cytokine, multiome or stimulation.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="The .h5ad file to write.", show_default=False)],
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same dataset.")] = 0,
    cells: Annotated[int, typer.Option("--cells", help="Number of cells.")] = 5000,
    genes: Annotated[int, typer.Option("--genes", help="Number of genes.")] = 1000,
    perturbations: Annotated[int | None, typer.Option("--perturbations", help="Number of perturbations (default: scaled to the cells).")] = None,
    cell_types: Annotated[int | None, typer.Option("--cell-types", help="Number of cell types (default: 8 for stimulation, else 3).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Simulate a perturbation dataset with known ground truth (network and noise-free effects in uns)."""
    from service.data import simulate_to_file

    try:
        with spinner() as progress:
            progress.add_task(f"simulating {kind}: {cells:,} cells x {genes:,} genes", total=None)
            out.parent.mkdir(parents=True, exist_ok=True)
            # Written as it is sampled, a chunk of cells at a time: memory does not grow with --cells.
            adata = simulate_to_file(out, kind, seed, cells, genes, n_perturbations=perturbations,
                                     n_cell_types=cell_types)
    except DataError as exc:
        fail(exc, json_out)
    truth = adata.uns["simulation"]
    summary = {"out": str(out), "kind": kind, "seed": seed, "n_cells": adata.n_obs, "n_features": adata.n_vars,
               "n_perturbations": int(adata.obs["perturbation"].nunique() - 1),
               "n_conditions": len(truth["conditions"]["condition"]), "n_edges": len(truth["network"]["source"])}
    err.print(f"[green]simulated[/] {kind} (seed {seed}) -> {out}: {adata.n_obs:,} cells x {adata.n_vars:,} "
              f"features, {summary['n_perturbations']} perturbations", highlight=False)
    if json_out:
        emit_json({"ok": True, **summary})
