"""The perturbation simulator: determinism, count matrix contract, detection by the loader, and the
biology it promises (knockdown cascades, dose response, cell-type-specific cytokine responses)."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from service.cli import app
from service.data import SimulationError, load_dataset, simulate
from service.data.simulator import KINDS

SMALL = {"n_cells": 1500, "n_genes": 300}


@pytest.fixture(scope="module")
def datasets() -> dict[str, ad.AnnData]:
    return {kind: simulate(kind, 7, **SMALL) for kind in KINDS}


def _truth_delta(adata: ad.AnnData, perturbation: str, context: str, dose: float | None = None) -> np.ndarray:
    cond = adata.uns["simulation"]["conditions"]
    hit = (cond["perturbation"] == perturbation) & (cond["context"] == context)
    if dose is not None:
        hit &= np.isclose(cond["dose"], dose)
    (row,) = np.flatnonzero(hit)
    return adata.uns["simulation"]["delta"][row]


def _lognorm_pseudobulk(adata: ad.AnnData, mask: np.ndarray, genes: np.ndarray) -> np.ndarray:
    x = adata[mask].X.toarray()[:, : len(genes)]
    return np.log1p(1e4 * x / x.sum(axis=1, keepdims=True)).mean(axis=0)


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = simulate("combo", 3, **SMALL), simulate("combo", 3, **SMALL), simulate("combo", 4, **SMALL)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)
    np.testing.assert_array_equal(a.uns["simulation"]["delta"], b.uns["simulation"]["delta"])
    assert a.X.shape != c.X.shape or (a.X != c.X).nnz > 0


@pytest.mark.parametrize("kind", KINDS)
def test_counts_shapes_and_obs(datasets: dict[str, ad.AnnData], kind: str) -> None:
    adata = datasets[kind]
    n_features = SMALL["n_genes"] if kind != "multiome" else adata.n_vars
    assert adata.shape == (SMALL["n_cells"], n_features)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    data = adata.X.data
    assert (data >= 0).all() and np.array_equal(data, np.round(data))
    assert {"perturbation", "cell_type", "batch"} <= set(adata.obs.columns)
    assert ("dose" in adata.obs.columns) == (kind == "drug")
    labels = set(adata.obs["perturbation"].astype(str))
    assert "control" in labels and len(labels) >= 4
    genes = set(adata.var_names[adata.var["feature_types"] == "Gene Expression"])
    assert all(g.startswith("G") and g[1:].isdigit() for g in genes)
    if kind in ("knockout", "combo", "multiome"):
        perturbed = {g for lab in labels - {"control"} for g in lab.split("+")}
        assert perturbed <= genes
    if kind == "combo":
        assert any("+" in lab for lab in labels)
    assert adata.obs["cell_type"].nunique() == (8 if kind == "stimulation" else 3)
    assert adata.obs["batch"].nunique() == 2
    truth = adata.uns["simulation"]
    assert truth["delta"].shape == (len(truth["conditions"]["condition"]), len(genes))


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("knockout", "genetic"), ("combo", "genetic_combo"), ("drug", "chemical"), ("cytokine", "cytokine"),
     ("multiome", "genetic"), ("stimulation", "cytokine")],
)
def test_loader_detects_each_kind(datasets: dict[str, ad.AnnData], kind: str, expected: str) -> None:
    layout = load_dataset(datasets[kind], min_cells=0).layout
    assert layout.kind == expected
    assert layout.perturbation_key == "perturbation" and layout.control_labels == ["control"]
    assert layout.context_key == "cell_type" and layout.batch_key == "batch"
    assert layout.rna_is_counts
    assert layout.dose_key == ("dose" if kind == "drug" else None)
    assert layout.modalities == (["rna_counts", "protein", "atac"] if kind == "multiome" else ["rna_counts"])


def test_knockdown_lowers_gene_and_moves_direct_targets_by_edge_sign(datasets: dict[str, ad.AnnData]) -> None:
    adata = datasets["knockout"]
    truth = adata.uns["simulation"]
    net = truth["network"]
    genes = np.asarray(adata.var_names)
    index = {g: i for i, g in enumerate(genes)}
    context = truth["cell_types"][0]
    checked = agree = 0
    for gene in truth["knockdown"]["gene"]:
        delta = _truth_delta(adata, gene, context)
        assert delta[index[gene]] < -0.05, f"knocked-down {gene} not lower"
        sel = net["source"] == gene
        for target, weight in zip(net["target"][sel], net["weight"][sel], strict=True):
            if abs(delta[index[target]]) > 0.05:
                checked += 1
                agree += np.sign(delta[index[target]]) == -np.sign(weight)  # less activator: down
        for group in net["group_of_member"][net["group_member"] == gene]:
            target = net["group_target"][group]
            checked += 1
            agree += delta[index[target]] < 0  # complex members activate their target
    assert checked >= 10 and agree / checked > 0.9

    # The sampled counts show it too: the strongest knockdown's pseudobulk follows the truth.
    strongest = max(truth["knockdown"]["gene"], key=lambda g: np.abs(_truth_delta(adata, g, context)).sum())
    obs = adata.obs
    ctrl = _lognorm_pseudobulk(adata, ((obs.perturbation == "control") & (obs.cell_type == context)).to_numpy(), genes)
    pert = _lognorm_pseudobulk(adata, ((obs.perturbation == strongest) & (obs.cell_type == context)).to_numpy(), genes)
    observed = pert - ctrl
    assert observed[index[strongest]] < 0
    assert np.corrcoef(observed, _truth_delta(adata, strongest, context))[0, 1] > 0.5


@pytest.mark.parametrize("seed", [1, 2])
def test_knockdowns_give_module_structured_responses(seed: int) -> None:
    """Knockdowns of one module's regulators move that module alike (what co-expression predictors learn)."""
    truth = simulate("knockout", seed, n_cells=300, n_genes=400, n_perturbations=40).uns["simulation"]
    module = dict(zip(truth["genes"]["name"], truth["genes"]["module"], strict=True))
    cond = truth["conditions"]
    rows = np.flatnonzero(cond["context"] == truth["cell_types"][0])
    delta = truth["delta"][rows]
    strong = np.abs(delta).max(axis=1) > 0.3
    mods = np.array([module[p] for p in cond["perturbation"][rows]])[strong]
    corr = np.corrcoef(delta[strong])
    upper = np.triu_indices_from(corr, 1)
    same = (mods[:, None] == mods[None, :])[upper]
    assert same.any() and (~same).any()
    assert corr[upper][same].mean() > corr[upper][~same].mean() + 0.15


@pytest.mark.parametrize("seed", [3, 7])
def test_combo_has_non_additive_interactions(seed: int) -> None:
    """Redundant regulators of a shared target: losing both hurts it more than the two losses added."""
    adata = simulate("combo", seed, n_cells=300, n_genes=300, n_perturbations=30)
    truth = adata.uns["simulation"]
    net = truth["network"]
    index = {g: i for i, g in enumerate(adata.var_names)}
    context = truth["cell_types"][0]
    pairs = truth["cooperative_pairs"]
    assert len(pairs) >= 1
    synergy = []
    for pair in pairs:
        a, b = pair.split("+")
        groups_of = {g: set(net["group_of_member"][net["group_member"] == g]) for g in (a, b)}
        shared = groups_of[a] & groups_of[b]
        for group in shared:
            if net["group_redundant"][group]:
                j = index[net["group_target"][group]]
                both = _truth_delta(adata, pair, context)[j]
                synergy.append(_truth_delta(adata, a, context)[j] + _truth_delta(adata, b, context)[j] - both)
    assert synergy and max(synergy) > 0.2


def test_drug_response_grows_with_dose(datasets: dict[str, ad.AnnData]) -> None:
    adata = datasets["drug"]
    truth = adata.uns["simulation"]
    targets = truth["drug_targets"]
    index = {g: i for i, g in enumerate(adata.var_names)}
    doses = np.unique(truth["conditions"]["dose"])
    assert len(doses) >= 3
    for drug in np.unique(targets["drug"]):
        for context in truth["cell_types"]:
            deltas = [_truth_delta(adata, drug, context, d) for d in doses]
            size = [np.linalg.norm(d) for d in deltas]
            assert all(np.diff(size) > 0), f"{drug} in {context}: effect size {size} not increasing with dose"
            for gene, sign in zip(targets["gene"][targets["drug"] == drug], targets["sign"][targets["drug"] == drug],
                                  strict=True):
                own = [d[index[gene]] * sign for d in deltas]  # inhibited targets fall, activated rise
                assert own[-1] > own[0] and own[-1] > 0
    # Drugs differ by target set: their top-dose responses are not all alike.
    top = np.array([_truth_delta(adata, d, truth["cell_types"][0], doses[-1]) for d in np.unique(targets["drug"])])
    corr = np.corrcoef(top)
    assert corr[np.triu_indices_from(corr, 1)].min() < 0.9


def test_cytokine_response_differs_by_cell_type(datasets: dict[str, ad.AnnData]) -> None:
    adata = datasets["cytokine"]
    truth = adata.uns["simulation"]
    cell_types = truth["cell_types"]
    for cytokine in truth["cytokine_receptors"]["cytokine"]:
        deltas = np.array([_truth_delta(adata, cytokine, c) for c in cell_types])
        assert np.abs(deltas).max() > 0.3, f"{cytokine} has no visible response"
        corr = np.corrcoef(deltas)
        norms = np.linalg.norm(deltas, axis=1)
        assert corr[np.triu_indices_from(corr, 1)].min() < 0.8 or norms.max() > 2 * norms.min()


def test_stimulation_responses_follow_each_cell_type_s_control_state() -> None:
    """Eight cell types; a stimulus's response in each is a nonlinear function of its control state plus a
    small deviation of its own: a kernel ridge on the other types' control profiles predicts a held-out
    type's response better than their mean response does, and not perfectly."""
    adata = simulate("stimulation", 7, n_cells=8000, n_genes=200)
    truth = adata.uns["simulation"]
    types = list(truth["cell_types"])
    assert len(types) == 8 and truth["state_noise"] > 0
    assert truth["stimulus_receptors"]["activity_by_cell_type"].shape == (len(truth["stimulus_receptors"]["stimulus"]), 8)
    genes = np.asarray(adata.var_names)
    obs = adata.obs
    control = np.stack([_lognorm_pseudobulk(adata, ((obs.perturbation == "control") & (obs.cell_type == t)).to_numpy(),
                                            genes) for t in types])
    kernel_error = transfer_error = 0.0
    for stimulus in truth["stimulus_receptors"]["stimulus"]:
        deltas = np.array([_truth_delta(adata, stimulus, t) for t in types])
        assert np.abs(deltas).max() > 0.3, f"{stimulus} has no visible response"
        for held in range(len(types)):
            rest = [i for i in range(len(types)) if i != held]
            gaps = np.sum((control[rest][:, None] - control[rest][None]) ** 2, axis=-1)
            width = np.median(gaps[gaps > 0])
            K = np.exp(-gaps / width)
            k = np.exp(-np.sum((control[rest] - control[held]) ** 2, axis=-1) / width)
            mean = deltas[rest].mean(axis=0)
            kernel = mean + k @ np.linalg.solve(K + 0.1 * np.eye(len(rest)), deltas[rest] - mean)
            kernel_error += np.mean((kernel - deltas[held]) ** 2)
            transfer_error += np.mean((mean - deltas[held]) ** 2)
    assert 0.2 * transfer_error < kernel_error < 0.85 * transfer_error


@pytest.mark.parametrize("n_perturbations", [1, 2])
def test_one_or_two_perturbations_leave_cells_in_every_condition(n_perturbations: int) -> None:
    """A single stimulus (a PBMC interferon set) is a common design: each cell type keeps its controls and
    its perturbed cells."""
    a = simulate("stimulation", 0, n_cells=3000, n_genes=100, n_perturbations=n_perturbations)
    counts = a.obs.groupby(["cell_type", "perturbation"], observed=True).size().unstack(fill_value=0)
    assert counts.shape == (8, n_perturbations + 1)
    assert (counts.to_numpy() >= 20).all(), counts
    assert 0.3 <= (a.obs["perturbation"] == "control").mean() <= 0.7


def test_multiome_has_three_feature_types(datasets: dict[str, ad.AnnData]) -> None:
    adata = datasets["multiome"]
    types = adata.var["feature_types"].astype(str)
    assert set(types) == {"Gene Expression", "Antibody Capture", "Peaks"}
    assert adata.var_names.is_unique
    protein = adata[:, (types == "Antibody Capture").to_numpy()].X.toarray()
    peaks = adata[:, (types == "Peaks").to_numpy()].X.toarray()
    assert (protein.mean(axis=0) > 1).all(), "every protein has background and signal"
    assert 0.01 < (peaks > 0).mean() < 0.8
    assert all(n.startswith("chr") and ":" in n for n in adata.var_names[(types == "Peaks").to_numpy()])


def test_simulation_truth_round_trips_through_h5ad(datasets: dict[str, ad.AnnData], tmp_path) -> None:
    for kind in ("combo", "drug", "cytokine", "multiome"):
        path = tmp_path / f"{kind}.h5ad"
        datasets[kind].write_h5ad(path)
        back = ad.read_h5ad(path)
        _assert_same(datasets[kind].uns["simulation"], back.uns["simulation"], kind)
        assert (back.X != datasets[kind].X).nnz == 0


def _assert_same(a: object, b: object, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, np.ndarray) and a.dtype.kind in "fc":
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, np.ndarray):
        assert np.asarray(b).astype(a.dtype).tolist() == a.tolist(), where
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"kind": "crispr"}, "kind='crispr'"), ({"n_genes": 10}, "n_genes=10"), ({"n_cells": 5}, "n_cells=5"),
     ({"kind": "cytokine", "n_perturbations": 50}, "at most 20 cytokines")],
)
def test_bad_parameters_get_a_specific_error(kwargs: dict, message: str) -> None:
    args = {"kind": "knockout", "seed": 0, **SMALL, **kwargs}
    with pytest.raises(SimulationError, match=message):
        simulate(**args)


def test_cli_writes_h5ad_and_prints_json(tmp_path) -> None:
    out = tmp_path / "sim.h5ad"
    result = CliRunner().invoke(
        app, ["data", "simulate", "--kind", "drug", "--seed", "5", "--cells", "600", "--genes", "120",
              "--out", str(out), "--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["kind"] == "drug" and summary["n_cells"] == 600
    assert ad.read_h5ad(out).obs["dose"].notna().all()

    bad = CliRunner().invoke(app, ["data", "simulate", "--kind", "nope", "--out", str(out), "--json"])
    assert bad.exit_code == 1
    assert json.loads(bad.stdout.strip().splitlines()[-1])["error"] == "SimulationError"


def test_drug_cells_carry_their_target_annotations(datasets: dict[str, ad.AnnData]) -> None:
    adata = datasets["drug"]
    table = adata.uns["simulation"]["drug_targets"]
    obs = adata.obs
    assert (obs.loc[obs["perturbation"] == "control", "targets"] == "").all()
    for drug in np.unique(table["drug"]):
        (label,) = obs.loc[obs["perturbation"] == drug, "targets"].unique()
        assert label.split(";") == list(table["gene"][table["drug"] == drug])
    # A target is inhibited (or activated) by every compound that hits it: annotations carry the mode of action.
    signs: dict[str, set[float]] = {}
    for gene, sign in zip(table["gene"], table["sign"], strict=True):
        signs.setdefault(str(gene), set()).add(float(sign))
    assert all(len(s) == 1 for s in signs.values())
    dataset = load_dataset(adata)
    assert dataset.layout.perturbation_key == "perturbation" and dataset.layout.annotation_key == "targets"
    assert "targets" not in datasets["knockout"].obs.columns
