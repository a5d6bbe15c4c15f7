"""Benchmark of the unseen-cell-type base's members, each alone: where the designed model's skill comes from and
how much any choice among its members could gain (minutes per dataset, in process, no sandbox).

Per held-out cell type: the split as `cellforge design` makes it, the offline plan's closed-form base fitted on
the whole training part, and on test every member of it alone (transfer, the context ridge, the kernels, the
scaled members, ...), the base as fitted (`designed`: its stack or fixed recipe) and every baseline. Each is
compared with the oracle best baseline of the run (picked on test per metric), as `selection_bench.py` compares
the delivered predictor. `oracle_member` takes on each run the best of the members and the designed base on
test: no rule that picks one of these members per held-out type can do better (a weighted combination could,
though the fitted stack, `designed`, stays below it), so where it stays below the target a better choice among
the members will not reach it. `oracle_combination` goes further: the members' non-negative weights fitted per
held-out type to the test truth itself (least squares over all genes), a bound on what reweighting them can do.
`oracle_strength` asks what knowing how strongly the held-out type responds would be worth: each member rescaled
to the true Δ's projection on the stimulus's programme (its mean Δ over the training types), as the base rescales
its scaled members to the gain kernel's, the best of them on test per run; a bound for any better estimate of the
strength (the gain kernel's job) with these shapes.
`shapes_at_true_strength` is no choice at all: the equal-weight average of the three members that read a shape off
the control state (the context ridge, the context kernel, the profile kernel), each at that strength.

    .venv/bin/python benchmarks/member_bench.py --kind stimulation --seeds 0 1 2 [--cell-types N]
        [--perturbations N] [--genes N] [--contexts T_cell ...] [--receptors] > result.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "benchmarks")]

from design_bench import PRIMARY, SCHEMES, gain, held_out, verdict  # noqa: E402
from selection_bench import MSE, designed_bundle, fitted  # noqa: E402
from service.data import make_split  # noqa: E402
from service.data.baselines import run_baselines  # noqa: E402
from service.data.evaluate import Evaluator  # noqa: E402

METRICS = {PRIMARY: max, MSE: min}  # how the oracle picks on each metric
ORACLE = "oracle_member"
COMBINATION = "oracle_combination"
STRENGTH = "oracle_strength"
SHAPES = "shapes_at_true_strength"
SHAPE_MEMBERS = ("context_ridge", "context_kernel", "profile_kernel")


def true_delta(test: Evaluator, conditions) -> np.ndarray:
    """Each of `conditions`' measured mean profile minus its control, as the evaluator holds them."""
    truth = test.truth
    order = pd.Index(truth.targets["condition"].astype(str)).get_indexer(conditions.table["condition"].astype(str))
    return truth.mean[order] - truth.control[order]


def oracle_combination(members: dict[str, np.ndarray], delta: np.ndarray) -> np.ndarray:
    """The members' combination with non-negative weights closest to the true `delta` (squared error)."""
    names = [n for n in members if n != "designed"]
    weights = nnls(np.stack([members[n].ravel() for n in names], axis=1), delta.ravel())[0]
    return sum(w * members[n] for w, n in zip(weights, names, strict=True))


def at_true_strength(base, members: dict[str, np.ndarray], delta: np.ndarray) -> dict[str, np.ndarray]:
    """Each member (the designed base too) at the true `delta`'s strength, rescaled as the base rescales its scaled
    members to the gain kernel's (`_at_gain_kernel_strength`), the gain kernel being the programme (transfer's Δ)
    at the truth's projection on it."""
    programme = members["transfer"]
    strength = np.sum(delta * programme, axis=1) / np.maximum(np.sum(programme ** 2, axis=1), 1e-12)
    truth = members | {"gain_kernel": strength[:, None] * programme}
    return {name: base._at_gain_kernel_strength(truth, name) for name in truth}


def one_type(m, kind: str, seed: int, data: Path, work: Path, context: str | None) -> dict:
    split = work / f"{kind}_{seed}_{context}"
    make_split(data, SCHEMES[kind], seed, split, context=context)
    model = fitted(m, split)
    base = model.base
    conditions = m.conditions_to_predict(m.read_part(split, "test_inputs.h5ad"), model.controls)
    members = base.members(conditions)
    members["designed"] = base.predict(conditions, None)
    test = Evaluator(split, "test")
    delta = true_delta(test, conditions)
    combination = oracle_combination(members, delta)
    mine = {n: test.score(m.predictions_adata(conditions, d, model.genes)).summary for n, d in members.items()}
    oracle = test.score(m.predictions_adata(conditions, combination, model.genes)).summary
    rescaled = at_true_strength(base, members, delta)
    strong = [test.score(m.predictions_adata(conditions, d, model.genes)).summary for d in rescaled.values()]
    shapes = np.mean([rescaled[n] for n in SHAPE_MEMBERS], axis=0)
    at_strength = test.score(m.predictions_adata(conditions, shapes, model.genes)).summary
    baselines = {n: test.score(p).summary for n, p in run_baselines(split, "test").items()}
    shutil.rmtree(split, ignore_errors=True)  # a split of 12,000 cells holds hundreds of MB
    row: dict = {"kind": kind, "seed": seed, "context": context, "kept": base.chosen.get("kept"),
                 "members": {n: {k: s[k] for k in METRICS} for n, s in mine.items()},
                 "baselines": {n: {k: s.get(k) for k in METRICS} for n, s in baselines.items()}}
    for metric, pick in METRICS.items():
        scored = {n: s[metric] for n, s in baselines.items() if s.get(metric) is not None}
        best = pick(scored, key=lambda n: scored[n])
        values = {n: s[metric] for n, s in mine.items()}
        values[ORACLE] = pick(values.values())
        values[COMBINATION] = oracle[metric]
        values[STRENGTH] = pick(s[metric] for s in strong)
        values[SHAPES] = at_strength[metric]
        row[metric] = {"best_baseline": best, "best": scored[best],
                       "verdict": {n: verdict(metric, v, scored[best]) for n, v in values.items()},
                       "gain": {n: gain(metric, v, scored[best]) for n, v in values.items()}}
    print(f"{kind} {seed} {context}: " + " ".join(
        f"{metric}: designed {row[metric]['gain']['designed']:+.1%}, oracle member {row[metric]['gain'][ORACLE]:+.1%},"
        f" oracle combination {row[metric]['gain'][COMBINATION]:+.1%},"
        f" oracle strength {row[metric]['gain'][STRENGTH]:+.1%}, shapes at it {row[metric]['gain'][SHAPES]:+.1%}"
        f" vs {row[metric]['best_baseline']}"
        for metric in METRICS), file=sys.stderr, flush=True)
    return row


def summary(rows: list[dict]) -> dict:
    """Per member and metric: win / tie / loss against the best baseline and the mean relative change."""
    out: dict = {}
    for metric in METRICS:
        for name in rows[0][metric]["gain"]:
            verdicts = [r[metric]["verdict"][name] for r in rows]
            out.setdefault(name, {})[metric] = {
                "win": verdicts.count("win"), "tie": verdicts.count("tie"), "loss": verdicts.count("loss"),
                "mean_relative_gain": round(statistics.fmean(r[metric]["gain"][name] for r in rows), 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="stimulation",
                        choices=[k for k, scheme in SCHEMES.items() if scheme == "unseen-context"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--contexts", nargs="+", default=None, help="the cell types to hold out (all)")
    parser.add_argument("--perturbations", type=int, default=None, help="perturbations simulated")
    parser.add_argument("--cells", type=int, default=12000, help="cells simulated (the README demo's size)")
    parser.add_argument("--genes", type=int, default=500, help="genes simulated (the README demo's size)")
    parser.add_argument("--cell-types", type=int, default=None, help="cell types simulated (the simulator's)")
    parser.add_argument("--receptors", action="store_true",
                        help="annotate each stimulus's receptor genes (obs['targets']) from the simulation")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cellforge-members-"))
    rows = []
    try:
        for seed in args.seeds:
            folder = work / f"{args.kind}_{seed}"
            data, m = designed_bundle(args.kind, seed, folder, args.cells, args.cell_types, args.perturbations,
                                      args.receptors, args.genes)
            for context in held_out(args.kind, ad.read_h5ad(data, backed="r"), args.contexts):
                rows.append(one_type(m, args.kind, seed, data, folder, context))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "members", "kind": args.kind, "seeds": args.seeds, "cell_types": args.cell_types,
                      "genes": args.genes, "perturbations": args.perturbations, "receptors": args.receptors, "summary": summary(rows), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
