"""Domain priors the generated models must get right, each on simulated data through the rendered templates:
a knocked-down gene's own expression falls, an unseen cell type responds according to its control state, and
an unseen dose between measured ones is interpolated monotonically."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from service.agents import analyse_task, run_discussion
from service.data import make_split, profile_dataset, simulate
from service.llm import OfflineBackend
from service.pipeline import pipeline_handlers, render_bundle
from generated_code import case_config, load_bundle


class Design:
    """A simulated dataset taken through the offline design up to the fitted closed-form model: the plan's
    rendered bundle's modules, the split's train/test conditions as train.py reads them, and the
    test conditions' observed Δ (their held-out cells, as the evaluator scores them)."""

    def __init__(self, tmp: Path, data: ad.AnnData, task: str, **split_args):
        path = tmp / "data.h5ad"
        data.write_h5ad(path)
        self.m, self.plan = _render(task, path, tmp)
        self.info = make_split(path, self.plan.evaluation.split_scheme, 0, tmp / "split", **split_args)
        split = tmp / "split"
        train_cells, test_inputs, truth = (ad.read_h5ad(split / f"{name}.h5ad") for name in
                                           ("train", "test_inputs", "test_truth"))
        self.genes = list(train_cells.var_names)
        controls = self.m.control_means(train_cells)
        self.train = self.m.ConditionSet.from_cells(train_cells, controls)
        self.test = self.m.ConditionSet(self.m.targets_of(test_inputs),
                                        {**controls, **self.m.control_means(test_inputs)})
        means = self.m.group_means(truth.X, truth.obs["condition"].astype(str).to_numpy(),
                                   list(self.test.table["condition"]))
        self.observed = means - self.test.control
        self.model = self.m.PerturbationModel(self.m.CONFIG, self.genes, controls)
        # As train.py's final fit: every training condition, nothing held back to stop on.
        nothing = self.train.subset(np.zeros(len(self.train), dtype=bool))
        self.model.fit_closed_form(self.train, nothing, *self.m.cell_sample(train_cells, 2000, 0))

    def predict(self, conditions) -> np.ndarray:
        return self.model.predict_delta(conditions)


def _render(task: str, path: Path, tmp: Path):
    """The offline design's plan for the data at `path` and its rendered bundle (imported)."""
    llm = OfflineBackend(pipeline_handlers())
    profile = profile_dataset(path)
    plan = run_discussion(analyse_task(profile, task, llm), profile, llm, tmp / "discussion").plan
    return load_bundle(render_bundle(plan).write(tmp / "code")), plan


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2))


# ------------------------------------------------------------------------------------------ knockdowns


@pytest.fixture(scope="module")
def knockouts(tmp_path_factory) -> Design:
    return Design(tmp_path_factory.mktemp("knockout"), simulate("knockout", 3, n_cells=4000, n_genes=200),
                  "Predict expression after CRISPR knockout of unseen genes")


@pytest.mark.slow  # a whole offline design on simulated data (half a minute on 2 busy cores)
def test_knockdown_lowers_the_target_gene_of_unseen_knockouts(knockouts):
    d = knockouts
    pred, true = d.predict(d.test), d.observed
    pos = {g: i for i, g in enumerate(d.genes)}
    rows = [(r, pos[p]) for r, p in enumerate(d.test.table["perturbation"]) if p in pos]
    assert len(rows) >= 6 and not set(d.test.table["perturbation"]) & set(d.train.table["perturbation"])
    predicted = np.array([pred[r, g] for r, g in rows])
    expected = np.array([true[r, g] for r, g in rows])
    assert (predicted < 0).all()
    # The magnitude is learned from the training knockouts: close to the truth, where a mean Δ is near 0.
    mean_delta = d.train.delta.mean(axis=0)
    assert np.mean(np.abs(predicted - expected)) < 0.35 * np.mean(np.abs(expected))
    assert np.mean(np.abs(predicted - expected)) < 0.5 * np.mean(np.abs([mean_delta[g] - t for (_, g), t in
                                                                           zip(rows, expected, strict=True)]))


@pytest.mark.slow  # a whole offline design on simulated data (half a minute on 2 busy cores)
def test_knockdown_removes_a_fitted_share_of_expression(knockouts):
    """The self effect is a curve of the control level: near-proportional for a weak gene, near log κ for a
    strong one, so a more expressed target falls further; κ is fitted, not fixed."""
    m = knockouts.m
    effect = knockouts.model.self_effect
    assert 0.02 < effect.kept < 0.5  # the simulator's knockdowns leave 5–30% (plus escaping cells)
    levels = np.linspace(0.1, 4.0, 20)
    curve = m.SelfEffect.curve(levels, effect.kept)
    assert (np.diff(curve) < 0).all() and (curve < 0).all()
    # Recovered from knockdowns that follow the curve.
    rng = np.random.default_rng(0)
    genes = [f"G{i}" for i in range(30)]
    controls = {"c": rng.uniform(0.2, 4.0, 30)}
    delta = rng.normal(0, 0.05, (30, 30))
    delta[np.arange(30), np.arange(30)] = m.SelfEffect.curve(controls["c"], 0.2)
    table = pd.DataFrame({"condition": genes, "perturbation": genes, "dose": np.nan, "context": "c"})
    train = m.ConditionSet(table, controls, controls["c"] + delta)
    assert m.SelfEffect(genes).fit(train).kept == pytest.approx(0.2, abs=0.02)


@pytest.mark.slow  # a whole offline design on simulated data (half a minute on 2 busy cores)
def test_knockdown_downstream_effects_come_from_the_learned_parts(knockouts):
    """Beyond the target itself the prediction tracks the knockdown's cascade better than the mean Δ (the
    stack's co-expression / co-variation / embedding members carry it)."""
    d = knockouts
    pred, true = d.predict(d.test), d.observed
    centroid = d.m.centroid_delta(d.train, d.test)
    pos = {g: i for i, g in enumerate(d.genes)}
    keep = np.ones_like(pred, dtype=bool)
    for r, p in enumerate(d.test.table["perturbation"]):
        keep[r, pos[p]] = False
    r_model = [np.corrcoef((pred - centroid)[i][keep[i]], (true - centroid)[i][keep[i]])[0, 1]
               for i in range(len(pred))]
    assert np.nanmean(r_model) > 0.2
    weights = d.model.base.chosen["stack_weights"]
    assert sum(w for name, w in weights.items() if name != "mean") > 0


# ------------------------------------------------------------------------------------------ cell types


@pytest.fixture(scope="module")
def cell_types(tmp_path_factory) -> list[Design]:
    data = simulate("stimulation", 5, n_cells=10000, n_genes=120)
    return [Design(tmp_path_factory.mktemp(f"celltype_{context}"), data,
                   "Predict stimulation responses in an unseen cell type", context=context)
            for context in ("B_cell", "monocyte")]


def _recipes(d: Design) -> dict[str, np.ndarray]:
    """The baselines' recipes for each test condition: Δ-transfer (the stimulus's mean Δ in the training cell
    types), the stimulus's context mean (their mean perturbed profile minus the held-out type's control) and
    the pooled context mean (every training perturbed profile's mean, minus that control)."""
    t, out = d.train.table, {"transfer": [], "stimulus_context_mean": [], "context_mean": []}
    perturbed = d.train.control + d.train.delta
    for row, r in enumerate(d.test.table.itertuples()):
        same = (t["perturbation"] == r.perturbation).to_numpy()
        out["transfer"].append(d.train.delta[same].mean(axis=0))
        out["stimulus_context_mean"].append(perturbed[same].mean(axis=0) - d.test.control[row])
        out["context_mean"].append(perturbed.mean(axis=0) - d.test.control[row])
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.slow  # a whole offline design on simulated data (half a minute on 2 busy cores)
def test_unseen_cell_type_responds_according_to_its_control_state(cell_types):
    """Stimuli act through receptor levels and cofactor genes of each type's control state: the held-out
    type's response is predicted from its control profile better than by transfer or context mean."""
    for d in cell_types:
        assert d.plan.architecture.base_predictor == "delta_transfer"
        assert d.info.held_out_context not in set(d.train.table["context"])
        pred, true = d.predict(d.test), d.observed
        recipes = _recipes(d)
        assert _mse(pred, true) < 0.9 * min(_mse(v, true) for v in recipes.values()), d.info.held_out_context
        weights = d.model.base.chosen["stack_weights"]
        # members that read the state (the average at the gain kernel's strength is made of them)
        placing = ("context_ridge", "context_kernel", "profile_kernel", "gain_kernel", "average_at_gain")
        assert sum(weights.get(name, 0.0) for name in placing) > 0.5


def test_context_ridges_fall_back_to_transfer_when_the_state_says_nothing(tmp_path):
    """Six cell types with different control states, responses that do not depend on them: the ridges'
    λ and widths chosen leave-one-context-out shrink them to transfer, and the prediction stays as good."""
    path = tmp_path / "data.h5ad"
    simulate("stimulation", 1, n_cells=4000, n_genes=60).write_h5ad(path)
    m, plan = _render("Predict stimulation responses in an unseen cell type", path, tmp_path)
    assert plan.architecture.base_predictor == "delta_transfer"
    rng = np.random.default_rng(7)
    genes, contexts, perts = 40, [f"c{i}" for i in range(7)], [f"S{i}" for i in range(6)]
    controls = {c: rng.normal(2.0, 1.0, genes) for c in contexts}
    shared = {p: rng.normal(0.0, 1.0, genes) for p in perts}
    rows = [(p, c) for p in perts for c in contexts]
    delta = np.stack([shared[p] + 0.3 * rng.normal(size=genes) for p, c in rows])

    def conditions(subset):
        table = pd.DataFrame({"condition": [f"{p}||{c}" for p, c in subset], "perturbation": [p for p, _ in subset],
                              "dose": np.nan, "context": [c for _, c in subset]})
        idx = [rows.index(x) for x in subset]
        means = np.stack([controls[c] for _, c in subset]) + delta[idx] if subset else None
        return m.ConditionSet(table, controls, means)

    train = conditions([x for x in rows if x[1] != "c6"])
    test = conditions([x for x in rows if x[1] == "c6"])
    empty = conditions([])
    config = case_config(m, loss=plan.loss.model_dump(mode="json"))
    base = m.BasePredictor(config, [f"G{i}" for i in range(genes)]).fit(train, np.zeros((len(train), 1)), empty,
                                                                      np.zeros((0, 1)))
    pred = base.predict(test, np.zeros((len(test), 1)))
    transfer = np.stack([shared[p] for p, _ in rows if _ == "c6"])  # the noise-free response
    observed = np.stack([train.delta[(train.table["perturbation"] == p).to_numpy()].mean(axis=0) for p in perts])
    assert _mse(pred, test.delta) < 1.1 * _mse(observed, test.delta)
    assert _mse(pred, transfer) < 1.5 * _mse(observed, transfer)


# ------------------------------------------------------------------------------------------ doses


@pytest.fixture(scope="module")
def doses(tmp_path_factory) -> Design:
    # 100 genes and 4000 cells: the closed-form fit (the fast suite's one) takes half the time of 150 × 6000.
    return Design(tmp_path_factory.mktemp("dose"), simulate("drug", 2, n_cells=4000, n_genes=100),
                  "Predict responses of cell lines to unseen doses of known drugs")


def test_unseen_dose_of_a_simulated_drug_is_interpolated(doses):
    """Hill dose responses, two of four doses held out per drug (test and validation): where the test dose
    lies between the two measured ones the model follows the drug's own curve, much closer to what the
    held-out cells show than the average drug at that dose."""
    d = doses
    assert d.plan.evaluation.split_scheme == "unseen-dose" and d.model.base.by_dose
    inside = np.array([d.info.categories[c] == "interpolation" for c in d.test.table["condition"]])
    assert inside.sum() >= 3
    pred = d.predict(d.test)[inside]
    mean_at_dose = np.stack([d.m.mean_delta_by(d.train.table, d.train.delta, r.context, r.dose)
                             for r in d.test.table[inside].itertuples()])
    observed = d.observed[inside]
    assert _mse(pred, observed) < 0.75 * _mse(mean_at_dose, observed)
    assert d.model.base.chosen["stack_weights"]["dose_curve"] > 0


def test_dose_curve_is_monotone_between_measured_doses(doses):
    """A drug measured at four doses whose genes rise or fall with dose (Hill curves), the middle dose
    unseen: every gene's prediction there lies between its values at the neighbouring doses, near the curve."""
    m = doses.m
    rng = np.random.default_rng(3)
    genes, drugs, levels = 30, [f"D{i}" for i in range(8)], [0.01, 0.1, 1.0, 10.0, 100.0]
    effect = {p: rng.normal(0, 1.5, genes) for p in drugs}
    ec50 = {p: float(np.exp(rng.uniform(np.log(0.3), np.log(3.0)))) for p in drugs}
    hill = lambda p, dose: dose ** 1.5 / (dose ** 1.5 + ec50[p] ** 1.5)  # noqa: E731
    controls = {"c": np.full(genes, 2.0)}

    def conditions(rows):
        table = pd.DataFrame({"condition": [f"{p}|{x:g}|c" for p, x in rows], "perturbation": [p for p, _ in rows],
                              "dose": [x for _, x in rows], "context": "c"})
        means = np.stack([controls["c"] + effect[p] * hill(p, x) for p, x in rows]) if rows else None
        return m.ConditionSet(table, controls, means)

    held = ("D0", 1.0)
    train = conditions([(p, x) for p in drugs for x in levels if (p, x) != held])
    test = conditions([held])
    config = case_config(m, ridge_lambdas=[0.1, 10.0], loss={"de_weighting": "none", "kind": "mse"},
                         split_scheme="unseen-dose")
    base = m.BasePredictor(config, [f"G{i}" for i in range(genes)]).fit(
        train, np.zeros((len(train), 1)), conditions([]), np.zeros((0, 1)))
    curve = base._dose_curve(base.full, test.table, np.zeros((1, genes)))[0]
    below, above = effect["D0"] * hill("D0", 0.1), effect["D0"] * hill("D0", 10.0)
    low, high = np.minimum(below, above), np.maximum(below, above)
    assert ((curve >= low - 1e-9) & (curve <= high + 1e-9)).all()
    pred = base.predict(test, np.zeros((1, 1)))[0]
    assert ((pred >= low - 0.05 * np.abs(effect["D0"])) & (pred <= high + 0.05 * np.abs(effect["D0"]))).all()
    truth = effect["D0"] * hill("D0", 1.0)
    assert _mse(pred, truth) < 0.05 * float(np.mean(truth ** 2))
    mean_at_dose = m.mean_delta_by(train.table, train.delta, "c", 1.0)
    assert _mse(pred, truth) < 0.1 * _mse(mean_at_dose, truth)
    assert base.chosen["stack_weights"]["dose_curve"] > 0.8


@pytest.mark.slow  # an offline design per held-out cell type
def test_an_uncertain_unseen_cell_type_is_shrunk_towards_a_safer_response(tmp_path):
    """Where the base's members disagree about a held-out type beyond what the training types show (a weak
    responder next to responsive types), its response is uncertain: the fitted shrink blends the stack towards
    no change or the gain kernel's response, and for the weakest responder that lowers the error against the
    truth; the most responsive type is moved less."""
    data = simulate("stimulation", 1, n_cells=8000, n_genes=120)
    designs = {}
    for context in ("T_cell", "endothelial"):  # the least and the most responsive of this simulation's types
        (tmp_path / context).mkdir()
        designs[context] = Design(tmp_path / context, data, "Predict stimulation responses in an unseen cell type",
                                  context=context)
    observed = {context: float(np.mean(np.abs(d.observed))) for context, d in designs.items()}
    weak, strong = min(observed, key=observed.get), max(observed, key=observed.get)

    def raw_and_shrunk(d: Design) -> tuple[np.ndarray, np.ndarray]:
        return d.model.base.stack.combine(d.model.base.members(d.test)), d.predict(d.test)

    base = designs[weak].model.base
    c, r0, target = base.chosen["shrink"]
    assert c > 0 and target in ("none", "gain_kernel"), base.chosen
    assert (base._disagreement(base.members(designs[weak].test)) > r0).any()  # the premise: its members disagree
    raw, shrunk = raw_and_shrunk(designs[weak])
    assert _mse(shrunk, designs[weak].observed) < _mse(raw, designs[weak].observed)
    s_raw, s_shrunk = raw_and_shrunk(designs[strong])
    moved = np.linalg.norm(shrunk - raw) / np.linalg.norm(raw)
    assert np.linalg.norm(s_shrunk - s_raw) / np.linalg.norm(s_raw) < moved
