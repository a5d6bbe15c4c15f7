"""The data profile: the numbers it reports are the data's, for each kind of dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app
from service.data import load_dataset, normalize_log1p, profile_dataset, pseudobulk
from service.data.profile import NOTHING_TO_HOLD_OUT


def test_genetic_profile_counts_and_quantiles(make_adata):
    adata = make_adata(cells_per_condition=30, n_control=100)
    p = profile_dataset(adata)
    assert (p.n_cells, p.n_genes, p.n_features) == (400, 60, 60)
    assert (p.n_perturbations, p.n_conditions, p.n_control_cells) == (10, 10, 100)
    assert p.perturbation_kind == "genetic" and p.modalities == ["rna_counts"] and p.normalization == "raw_counts"
    assert p.cells_per_condition["median"] == 30 and p.cells_per_condition_min == 30
    X = adata.X.toarray()
    assert p.sparsity == pytest.approx(float((X == 0).mean()), abs=1e-4)
    assert p.library_size["median"] == pytest.approx(float(np.median(X.sum(1))))
    assert p.genes_detected["max"] == float((X > 0).sum(1).max())
    assert p.n_target_genes == 10 and p.target_genes_measured_fraction == 1.0
    # The factory knocks each target down to 15%: every measured target must go down.
    assert p.target_knockdown_fraction == 1.0 and p.target_direction == "down"
    assert p.above_noise_fraction >= 0.8
    assert p.recommended_split == "unseen-perturbation" and p.recommended_n_genes is None
    assert "pearson_delta" in p.recommended_metrics and "de_overlap" in p.recommended_metrics
    assert p.n_batches == 2 and p.conditions_in_one_batch_fraction == 0.0


def test_activation_screen_targets_go_up(make_adata):
    adata = make_adata(cells_per_condition=30, n_control=100, sparse=False)
    perts = adata.obs["perturbation"].to_numpy()
    for i in range(10):  # overexpress each target instead of knocking it down
        adata.X[perts == f"G{i}", i] = adata.X[perts == f"G{i}", i] * 10 + 20
    p = profile_dataset(adata)
    assert p.target_direction == "up" and p.target_knockdown_fraction == 0.0
    assert any("activation" in n for n in p.notes)


def test_shuffled_labels_show_no_signal(make_adata):
    adata = make_adata(cells_per_condition=30, n_control=100)
    rng = np.random.default_rng(0)
    adata.obs["perturbation"] = rng.permutation(adata.obs["perturbation"].to_numpy())
    p = profile_dataset(adata)
    assert p.above_noise_fraction <= 0.2
    assert any("weak effects" in n for n in p.notes)
    assert p.target_knockdown_fraction < 1.0


def test_delta_norm_matches_pseudobulk(make_adata):
    adata = make_adata()
    p = profile_dataset(adata)
    ds = load_dataset(adata)
    means = pseudobulk(normalize_log1p(adata.X), ds.obs["condition"].to_numpy())
    delta = means.drop(index="control||all") - means.loc["control||all"]
    norms = np.sqrt((delta.to_numpy() ** 2).sum(1))
    assert p.delta_norm["median"] == pytest.approx(float(np.median(norms)), rel=1e-4)
    top = np.sort(np.abs(delta.to_numpy()), axis=1)[:, -20:].sum(1) / np.abs(delta.to_numpy()).sum(1)
    assert p.de_top20_fraction == pytest.approx(float(top.mean()), rel=1e-6)


def test_missing_targets_and_weak_signal_noted(make_adata):
    adata = make_adata(perturbations=("G0", "G1", "NOTMEASURED", "ALSOMISSING"))
    p = profile_dataset(adata)
    assert p.target_genes_measured_fraction == 0.5
    assert p.targets_not_measured == ["ALSOMISSING", "NOTMEASURED"]
    assert any("2 of 4 target genes are not measured" in n for n in p.notes)
    assert p.n_small_conditions == 4 and any("fewer than 20 cells" in n for n in p.notes)


def test_combo_profile(make_adata):
    p = profile_dataset(make_adata(perturbations=("G1", "G2", "G3", "G1+G2", "G2+G3", "G1+G9", "G8+G9"),
                                   perturbation_key="condition", control_label="ctrl"))
    assert p.perturbation_kind == "genetic_combo" and p.n_combos == 4
    c = p.combos
    assert (c.n_singles, c.both_singles_present, c.one_single_present, c.no_single_present) == (3, 2, 1, 1)
    assert p.recommended_split == "combo"


def test_chemical_profile_with_contexts(make_adata):
    adata = make_adata(perturbations=("dA", "dB", "dC"), perturbation_key="drug", control_label="DMSO",
                       doses=[0.1, 1.0, 10.0], contexts=["A549", "MCF7"])
    drop = (adata.obs["drug"] == "dC").to_numpy() & (adata.obs["cell_type"] == "MCF7").to_numpy()
    adata = adata[~drop].copy()
    p = profile_dataset(adata)
    assert p.perturbation_kind == "chemical" and p.dose_key == "dose"
    assert p.n_doses == 3 and p.doses.n_drugs == 3
    assert p.doses.doses_per_drug["dA"] == [0.1, 1.0, 10.0]
    assert p.doses.levels_per_drug_min == p.doses.levels_per_drug_max == 3
    assert p.n_contexts == 2 and p.contexts.control_cells == {"A549": 40, "MCF7": 40}
    assert p.contexts.perturbations == {"A549": 3, "MCF7": 2}
    assert p.contexts.perturbations_in_all_contexts == 2
    assert p.contexts.coverage == pytest.approx(5 / 6)
    # Three drugs are too few to hold whole drugs out; three doses each allow holding a dose out.
    assert p.recommended_split == "unseen-dose"
    assert set(p.alternative_splits) == {"unseen-drug", "unseen-context"}


def test_recommendations_follow_the_design(make_adata):
    many_drugs = make_adata(perturbations=tuple(f"d{i}" for i in range(8)), perturbation_key="drug",
                            control_label="DMSO", doses=[1.0, 10.0], cells_per_condition=6)
    assert profile_dataset(many_drugs).recommended_split == "unseen-drug"
    few_cytokines = make_adata(perturbations=("IFNG", "TNF", "IL4"), contexts=["T", "B", "NK"])
    p = profile_dataset(few_cytokines)
    assert p.perturbation_kind == "cytokine" and p.recommended_split == "unseen-context"
    assert p.alternative_splits == ["unseen-perturbation"]


def test_one_stimulus_by_cell_type_under_the_kang_names(make_adata):
    """The Kang et al. PBMC layout (GSE96583): one stimulus in obs['stim'], cell types in obs['cell'], donors
    in obs['individual']. The cell-type column is found, so the one question the data can answer is asked."""
    adata = make_adata(perturbations=("STIM",), perturbation_key="stim", control_label="CTRL",
                       contexts=["T", "B", "NK", "mono"])
    adata.obs = adata.obs.rename(columns={"cell_type": "cell", "batch": "individual"})
    p = profile_dataset(adata)
    assert p.context_key == "cell" and p.n_contexts == 4 and p.batch_key == "individual"
    assert p.recommended_split == "unseen-context" and p.alternative_splits == []


@pytest.mark.parametrize("key, control, stimulus", [("label", "ctrl", "stim"),  # pertpy's Kang
                                                    ("condition", "control", "stimulated")])  # scGen's
def test_a_stimulus_named_only_stimulated_is_a_stimulation_not_a_knockout(make_adata, key, control, stimulus):
    """Kang's set as pertpy and scGen ship it: the one stimulus is labelled `stim` / `stimulated` under a column
    that says nothing of its kind. It is a stimulation (no gene is knocked out, no target-gene note)."""
    adata = make_adata(perturbations=(stimulus,), perturbation_key=key, control_label=control,
                       contexts=["CD4T", "B", "NK", "CD14Mono"])
    p = profile_dataset(adata)
    assert p.perturbation_kind == "cytokine" and p.recommended_split == "unseen-context"
    assert p.n_target_genes is None and not any("target gene" in n for n in p.notes)


def test_one_perturbation_in_one_context_has_nothing_to_hold_out(make_adata):
    """One stimulus and no cell types ('cell' holds barcodes, not a cell type): no split is recommended, and the
    note says why and which obs columns there are, not a split that fails later."""
    adata = make_adata(perturbations=("STIM",), perturbation_key="stim", control_label="CTRL")
    adata.obs["cell"] = [f"AAAC{i:06d}" for i in range(adata.n_obs)]
    p = profile_dataset(adata)
    assert p.context_key is None and p.recommended_split is None and p.alternative_splits == []
    note = next(n for n in p.notes if n.startswith(NOTHING_TO_HOLD_OUT))
    assert "STIM" in note and "'cell'" in note and "--context-key" in note
    one_drug = make_adata(perturbations=("dA",), perturbation_key="drug", control_label="DMSO", doses=[1.0, 10.0])
    assert profile_dataset(one_drug).recommended_split == "unseen-dose"  # a dose can still be held out


def test_lognorm_and_multimodal_profile(make_adata):
    p = profile_dataset(make_adata(counts=False))
    assert p.normalization == "log_normalized" and p.modalities == ["rna_lognorm"]
    p = profile_dataset(make_adata(feature_types={"Antibody Capture": 5, "Peaks": 10}))
    assert p.feature_types == {"rna": 60, "atac": 10, "protein": 5}
    assert p.n_genes == 60 and p.n_features == 75
    assert "atac_roc_auc" in p.recommended_metrics


def test_backed_profile_equals_in_memory(make_adata, h5ad_path):
    path = h5ad_path(make_adata())
    mem = profile_dataset(path, backed=False).model_dump()
    disk = profile_dataset(path, backed=True).model_dump()
    assert disk.pop("backed") is True and mem.pop("backed") is False
    assert disk == mem


def test_profile_feeds_agent_facts(make_adata):
    facts_mod = pytest.importorskip("service.agents.profile_facts")
    facts = facts_mod.facts_from_profile(profile_dataset(make_adata()))
    assert facts.n_conditions == 10 and facts.perturbation_kind == "genetic"


def test_cli_profile_json_and_table(make_adata, h5ad_path):
    path = h5ad_path(make_adata(perturbation_key="gene", control_label="non-targeting"))
    runner = CliRunner()
    result = runner.invoke(app, ["data", "profile", str(path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["ok"] and payload["n_cells"] == 160 and payload["perturbation_key"] == "gene"
    result = runner.invoke(app, ["data", "profile", str(path)])
    assert result.exit_code == 0 and "recommended split" in result.stdout


def test_cli_profile_errors(make_adata, h5ad_path, tmp_path):
    runner = CliRunner()
    path = h5ad_path(make_adata())
    result = runner.invoke(app, ["data", "profile", str(path), "--perturbation-key", "sgRNA", "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["error"] == "UnknownPerturbationKey" and "'perturbation'" in payload["message"]
    result = runner.invoke(app, ["data", "profile", str(tmp_path / "missing.h5ad")])
    assert result.exit_code == 1 and "DataFileError" in result.output and "Traceback" not in result.output


def test_drug_annotations_are_reported_with_their_gene_coverage(make_adata):
    from service.agents.profile_facts import facts_from_profile

    adata = make_adata(perturbations=("dA", "dB", "dC", "dD"), perturbation_key="drug", control_label="DMSO",
                       doses=[0.1, 1.0, 10.0])
    targets = {"dA": "G1;G2", "dB": "G3;NOT_MEASURED", "dC": "G4"}  # dD is not annotated
    plain = profile_dataset(adata)
    adata.obs["targets"] = [targets.get(p, "") for p in adata.obs["drug"].astype(str)]
    p = profile_dataset(adata)
    assert p.annotation_key == "targets" and p.annotated_perturbations_fraction == pytest.approx(0.75)
    assert p.n_target_genes == 5 and p.target_genes_measured_fraction == pytest.approx(0.8)
    assert p.targets_not_measured == ["NOT_MEASURED"]
    assert any("annotated in obs['targets']" in note for note in p.notes)
    # The agents see the coverage as the measured share of target genes; without annotations there is none.
    assert facts_from_profile(p).target_genes_measured_fraction == pytest.approx(0.8)
    assert plain.annotation_key is None and plain.target_genes_measured_fraction is None
