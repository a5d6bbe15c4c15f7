"""Benchmark of selection and the designed closed-form base, in process (no sandbox, no network training, no
search): minutes per dataset, for trying a change to the split, the selection rule or the generated bases.

Per held-out unit: the split as `cellforge design` makes it, every applicable baseline and the offline plan's
closed-form base (fitted on each validation fold and on the whole split, as the generated train.py fits it)
compete with their stack on validation as the service ranks them; the winner is scored on test against the
oracle best baseline (picked on test per metric). For unseen cell types the base *is* the designed model (the
residual network is never applied to a context absent from training); elsewhere the network is left out.
`--validation holdout` restores the old two-group validation fold (for comparison).

    .venv/bin/python benchmarks/selection_bench.py --kind stimulation --seeds 0 1 2 [--contexts T_cell ...]
        [--perturbations N] [--cells N] [--genes N] [--cell-types N] [--validation auto|holdout] [--receptors] [--out DIR] > result.json

`--perturbations 1`: a single stimulus, as in a PBMC interferon set (default: the simulator's, 10 stimuli).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "benchmarks")]

import service.data.splits as splits  # noqa: E402
from design_bench import PERTURBATIONS, PRIMARY, TASKS, counts, gain, held_out, split_and_baselines, verdict  # noqa: E402
from generated_code import load_bundle  # noqa: E402
from service.agents import analyse_task, run_discussion  # noqa: E402
from service.data import profile_dataset, simulate  # noqa: E402
from service.data.baselines import run_baselines  # noqa: E402
from service.data.evaluate import Evaluator  # noqa: E402
from service.llm import OfflineBackend  # noqa: E402
from service.pipeline import pipeline_handlers, render_bundle  # noqa: E402
from service.pipeline.compete import Entry, rank, stack_test_predictions, with_stack  # noqa: E402
from service.pipeline.rundir import RunDir  # noqa: E402

MSE = "mse_top20_de"


def fitted(m, data: Path):
    """The closed-form part of the generated model (bundle `m`) fitted on `data`'s training part."""
    cells = m.read_part(data, "train.h5ad")
    bulk = m.read_pseudobulk(data)
    controls = m.control_means(cells, bulk)
    train = m.ConditionSet.from_cells(cells, controls, bulk)
    none = train.subset(np.zeros(len(train), dtype=bool))
    return m.fitted_model(m.CONFIG, list(cells.var_names), controls, cells, train, none, m.CONFIG.seed)


def fit_predict(m, data: Path, inputs: str) -> ad.AnnData:
    """The closed-form part fitted on `data`'s training part; predictions of `inputs`."""
    return fitted(m, data).predict(m.read_part(data, inputs))


def annotate_receptors(adata: ad.AnnData) -> ad.AnnData:
    """`adata` with each stimulus's receptor genes in obs["targets"] (`;`-joined), as a scientist annotates a
    stimulation set (interferon-β: IFNAR1;IFNAR2): here the simulation's own receptors."""
    sim = adata.uns["simulation"]
    stimuli, genes = ((sim["stimulus_receptors"]["stimulus"], sim["stimulus_receptors"]["receptors"])
                      if "stimulus_receptors" in sim else
                      (sim["cytokine_receptors"]["cytokine"], sim["cytokine_receptors"]["receptor"]))
    receptors = dict(zip(map(str, stimuli), map(str, genes), strict=True))
    adata.obs["targets"] = [receptors.get(str(p), "") for p in adata.obs["perturbation"]]
    return adata


def designed_bundle(kind: str, seed: int, folder: Path, cells: int, cell_types: int | None,
                    perturbations: int | None, receptors: bool = False, genes: int = 500) -> tuple[Path, object]:
    """The simulated dataset of one seed (written to `folder`; with `receptors`, its stimuli's receptors
    annotated) and the generated code of the offline plan for it, loaded as a module."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.h5ad"
    adata = simulate(kind, seed, n_cells=cells, n_genes=genes, n_cell_types=cell_types,
                     n_perturbations=perturbations or PERTURBATIONS.get(kind))
    (annotate_receptors(adata) if receptors else adata).write_h5ad(data)
    profile = profile_dataset(data)
    llm = OfflineBackend(pipeline_handlers())
    plan = run_discussion(analyse_task(profile, TASKS[kind], llm), profile, llm, folder / "discussion").plan
    return data, load_bundle(render_bundle(plan).write(folder / "code"))


def one_unit(m, kind: str, seed: int, data: Path, work: Path, context: str | None) -> dict:
    started = time.perf_counter()
    rd = RunDir(work / f"{kind}_{seed}_{context}").create()
    selection, entries = split_and_baselines(rd, kind, seed, data, context)
    designed = {f.name: fit_predict(m, f.data, "val_inputs.h5ad") for f in selection.folds}
    entries.append(Entry("designed", "designed", selection.score(designed), designed))
    ranked = rank(with_stack(selection, entries, PRIMARY), PRIMARY)
    winner = ranked[0]
    test_eval = Evaluator(rd.split, "test")
    test = dict(run_baselines(rd.split, "test"))
    test["designed"] = fit_predict(m, selection.main_data, "test_inputs.h5ad")
    delivered = test[winner.name] if winner.kind != "stack" else stack_test_predictions(winner.weights, test_eval, test)
    scores = {n: test_eval.score(p).summary for n, p in test.items()}
    got = test_eval.score(delivered).summary
    row: dict = {"kind": kind, "seed": seed, "context": context, "validation": selection.describe(),
                 "delivered": winner.key, "weights": winner.weights, "seconds": round(time.perf_counter() - started, 1),
                 "val": {e.key: {k: e.score(k) for k in (PRIMARY, MSE)} for e in ranked},
                 "test": {n: {k: s.get(k) for k in (PRIMARY, MSE)} for n, s in scores.items()}}
    for metric, pick in ((PRIMARY, max), (MSE, min)):
        baselines = {n: s[metric] for n, s in scores.items() if n != "designed" and s.get(metric) is not None}
        best = pick(baselines, key=lambda n: baselines[n])
        row[metric] = {"delivered": got[metric], "designed": scores["designed"][metric], "best_baseline": best,
                       "best": baselines[best], "verdict": verdict(metric, got[metric], baselines[best]),
                       "designed_verdict": verdict(metric, scores["designed"][metric], baselines[best]),
                       "gain": gain(metric, got[metric], baselines[best]),
                       "designed_gain": gain(metric, scores["designed"][metric], baselines[best])}
    print(f"{kind} {seed} {context}: {winner.key} " + " ".join(
        f"{k}={row[k]['delivered']:.3f} vs {row[k]['best_baseline']} {row[k]['best']:.3f} ({row[k]['verdict']})"
        for k in (PRIMARY, MSE)), file=sys.stderr, flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    out = {}
    for metric in (PRIMARY, MSE):
        for who, key, g in (("delivered", "verdict", "gain"), ("designed", "designed_verdict", "designed_gain")):
            out[f"{metric}_{who}"] = {**counts([r[metric][key] for r in rows]),
                                      "mean_relative_gain": round(statistics.fmean(r[metric][g] for r in rows), 4)}
    return out


def against_the_others(rows: list[dict]) -> dict:
    """Each method (the delivered predictor, the designed model, every baseline) against the best of the
    *other* baselines on test, per unit, as the verdict judges the delivered one: how far the benchmark's
    yardstick, an oracle pick per unit among several baselines, is from what any single method reaches."""
    out: dict = {}
    for who in ["delivered", *rows[0]["test"]]:  # the test scores hold the designed model's and every baseline's
        by_metric: dict = {}
        for metric, pick in ((PRIMARY, max), (MSE, min)):
            verdicts, gains = [], []
            for r in rows:
                others = [s[metric] for n, s in r["test"].items() if n not in ("designed", who) and s.get(metric) is not None]
                mine = r[metric]["delivered"] if who == "delivered" else r["test"].get(who, {}).get(metric)
                if mine is None or not others:
                    continue
                best = pick(others)
                verdicts.append(verdict(metric, mine, best))
                gains.append(gain(metric, mine, best))
            by_metric[metric] = {**counts(verdicts),
                                 "median_relative_gain": round(statistics.median(gains), 4) if gains else None}
        out[who] = by_metric
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="stimulation", choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--contexts", nargs="+", default=None, help="unseen cell type: the cell types to hold out (all)")
    parser.add_argument("--perturbations", type=int, default=None,
                        help="perturbations simulated (default: design_bench's for the kind, else the simulator's)")
    parser.add_argument("--cells", type=int, default=12000, help="cells simulated (the README demo's size)")
    parser.add_argument("--genes", type=int, default=500,
                        help="genes simulated (the README demo's 500; real sets keep 2,000-5,000 variable genes)")
    parser.add_argument("--cell-types", type=int, default=None,
                        help="cell types simulated (default: the simulator's, 8 for stimulation, else 3)")
    parser.add_argument("--validation", default="auto", choices=["auto", "holdout"])
    parser.add_argument("--receptors", action="store_true",
                        help="annotate each stimulus's receptor genes (obs['targets']) from the simulation")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs here (default: a temporary folder, removed at the end; a stimulation "
                             "run of three seeds holds 2-5 GB of splits and folds)")
    args = parser.parse_args()
    if args.receptors and args.kind not in ("stimulation", "cytokine"):
        parser.error(f"--receptors: a {args.kind} simulation has no receptors (stimulation or cytokine only)")
    if args.validation == "holdout":
        splits.MIN_VAL_GROUPS = 2
    work = args.out or Path(tempfile.mkdtemp(prefix="cellforge-selection-"))
    rows = []
    try:
        for seed in args.seeds:
            folder = work / f"{args.kind}_{seed}"
            data, m = designed_bundle(args.kind, seed, folder, args.cells, args.cell_types, args.perturbations,
                                      args.receptors, args.genes)
            held = held_out(args.kind, ad.read_h5ad(data, backed="r"), args.contexts)
            rows += [one_unit(m, args.kind, seed, data, folder, c) for c in held]
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "selection", "kind": args.kind, "seeds": args.seeds, "perturbations": args.perturbations,
                      "genes": args.genes, "validation": args.validation, "receptors": args.receptors,
                      "summary": summary(rows),
                      "against_the_others": against_the_others(rows), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
