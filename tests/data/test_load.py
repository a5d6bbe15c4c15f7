"""Detection of dataset layouts, and one specific error per defect."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from service.data import (
    DataError,
    DataFileError,
    DuplicateGeneNames,
    InvalidDose,
    MissingLabels,
    NegativeCounts,
    NoControlCells,
    NonFiniteValues,
    PerturbationColumnNotFound,
    TooFewCells,
    UnknownColumn,
    UnknownPerturbationKey,
    is_control_label,
    load_dataset,
    load_split,
    make_split,
    profile_dataset,
    read_h5ad,
)
from service.data import InconsistentAnnotation


@pytest.mark.parametrize(
    ("key", "control", "extra", "kind"),
    [
        ("perturbation", "control", {}, "genetic"),
        ("gene", "non-targeting", {}, "genetic"),
        ("guide_identity", "NT", {}, "genetic"),
        ("target_gene", "Non-Targeting_0042", {}, "genetic"),
        ("Perturbation Name", "CTRL", {}, "genetic"),
        ("condition", "ctrl", {"perturbations": ("G1", "G2", "G1+G2", "G3+ctrl")}, "genetic_combo"),
        ("drug", "DMSO", {"doses": [0.1, 1.0, 10.0], "perturbations": ("dA", "dB")}, "chemical"),
        ("compound", "Vehicle", {"perturbations": ("dA", "dB")}, "chemical"),
        ("treatment", "vehicle", {"perturbations": ("dA", "dB")}, "chemical"),
        ("drugname", "DMSO_TF", {"perturbations": ("dA", "dB")}, "chemical"),  # Tahoe-100M's control
        ("label", "ctrl", {"perturbations": ("stim",)}, "cytokine"),  # Kang's set as pertpy ships it
        ("cytokine", "PBS", {"perturbations": ("IFNG", "TNF")}, "cytokine"),
        ("stimulation", "unstimulated", {"perturbations": ("IFNB", "IL4")}, "cytokine"),
        ("perturbation", "control", {"perturbations": ("IFNG", "TNF", "IL-1b", "G3")}, "cytokine"),
        ("perturbation", "control", {"perturbations": ("IFNG", "G1", "G2")}, "genetic"),
    ],
)
def test_detects_column_control_and_kind(make_adata, key, control, extra, kind):
    ds = load_dataset(make_adata(perturbation_key=key, control_label=control, **extra))
    assert ds.layout.perturbation_key == key
    assert ds.layout.control_labels == [control]
    assert ds.layout.kind == kind
    assert ds.obs.loc[ds.obs["is_control"], "perturbation"].eq("control").all()
    assert (ds.obs["perturbation"] != "control").sum() > 0


def test_combos_are_canonical_and_ctrl_parts_dropped(make_adata):
    ds = load_dataset(make_adata(perturbation_key="condition", control_label="ctrl",
                                 perturbations=("G1", "G2+G1", "G3+ctrl", "ctrl+ctrl")))
    assert set(ds.obs["perturbation"]) == {"control", "G1", "G1+G2", "G3"}
    # "ctrl+ctrl" is a control too: 40 controls plus its 12 cells.
    assert int(ds.obs["is_control"].sum()) == 52


def test_dose_context_batch_and_condition_key(make_adata):
    ds = load_dataset(make_adata(perturbation_key="drug", control_label="DMSO", doses=[0.5, 5.0],
                                 perturbations=("dA",), contexts=["A549", "K562"]))
    lay = ds.layout
    assert (lay.dose_key, lay.context_key, lay.batch_key) == ("dose", "cell_type", "batch")
    assert set(ds.obs["condition"]) == {"control||A549", "control||K562", "dA|0.5|A549", "dA|5|A549",
                                        "dA|0.5|K562", "dA|5|K562"}
    assert ds.obs.loc[ds.obs["is_control"], "dose"].isna().all()


def test_dose_with_unit_suffix_is_parsed(make_adata):
    adata = make_adata(perturbation_key="drug", control_label="DMSO", doses=[1.0, 10.0], perturbations=("dA",))
    adata.obs["dose"] = adata.obs["dose"].map(lambda d: f"{d:g}uM")
    assert set(load_dataset(adata).obs["dose"].dropna()) == {1.0, 10.0}


def test_tahoe_drug_concentration_tuples_are_the_dose(make_adata):
    """Tahoe-100M's obs: the drug in `drug` (control DMSO_TF), its concentration only inside
    `drugname_drugconc` as "[('Talc', 0.05, 'uM')]": read as the dose column, a drug screen with doses."""
    adata = make_adata(perturbation_key="drug", control_label="DMSO_TF", doses=[0.05, 0.5, 5.0],
                       perturbations=("Talc", "Bortezomib"), contexts=["HT-29", "A549"], context_key="cell_line")
    adata.obs["drugname_drugconc"] = [f"[('{p}', {0.0 if p == 'DMSO_TF' else d:g}, 'uM')]"
                                      for p, d in zip(adata.obs["drug"], adata.obs.pop("dose"), strict=True)]
    ds = load_dataset(adata)
    assert ds.layout.dose_key == "drugname_drugconc" and ds.layout.kind == "chemical"
    assert ds.layout.control_labels == ["DMSO_TF"] and ds.layout.context_key == "cell_line"
    assert set(ds.obs["dose"].dropna()) == {0.05, 0.5, 5.0} and ds.obs.loc[ds.obs["is_control"], "dose"].isna().all()


def test_scperturb_underscore_combinations_are_combinations(make_adata):
    """scPerturb writes Norman's double knockouts `CEBPE_RUNX1T1`: where most labels with `_` split into parts
    that are labels of the column themselves, `_` separates a combination (also for a pair whose singles were
    not measured). Guide names (`TP53_sg1`) stay single perturbations."""
    norman = make_adata(perturbations=("CEBPE", "RUNX1T1", "KLF1", "CEBPE_RUNX1T1", "KLF1_CEBPE", "AHR_FEV"))
    ds = load_dataset(norman)
    assert ds.layout.kind == "genetic_combo"
    assert set(ds.obs["perturbation"]) == {"control", "CEBPE", "RUNX1T1", "KLF1", "CEBPE+RUNX1T1", "CEBPE+KLF1",
                                           "AHR+FEV"}
    guides = load_dataset(make_adata(perturbations=("TP53_sg1", "TP53_sg2", "MYC_sg1", "MYC")))
    assert guides.layout.kind == "genetic" and "TP53_sg1" in set(guides.obs["perturbation"])


def test_context_column_with_spaces_and_capitals(make_adata):
    adata = make_adata(contexts=["T", "B"])
    adata.obs = adata.obs.rename(columns={"cell_type": "Cell Line"})
    assert load_dataset(adata).layout.context_key == "Cell Line"


def test_explicit_control_label(make_adata):
    ds = load_dataset(make_adata(control_label="parental"), control="parental")
    assert ds.layout.control_labels == ["parental"]
    assert int(ds.obs["is_control"].sum()) == 40


def test_falls_through_to_a_column_that_has_controls(make_adata):
    adata = make_adata(perturbation_key="guide_identity")
    adata.obs["gene"] = "G0"  # a 'gene' column without any control label must not be chosen
    assert load_dataset(adata).layout.perturbation_key == "guide_identity"


def test_non_integer_count_scale_values_are_counts(make_adata):
    adata = make_adata(sparse=False)
    adata.X = adata.X * 1.37  # e.g. ambient-corrected counts: not integers, far above log-normalized range
    adata.X[0, :] = 100.5
    assert load_dataset(adata).layout.rna_is_counts


@pytest.mark.parametrize("sparse", [True, False])
def test_counts_vs_lognorm(make_adata, sparse):
    assert load_dataset(make_adata(sparse=sparse)).layout.modalities == ["rna_counts"]
    lay = load_dataset(make_adata(counts=False, sparse=sparse)).layout
    assert lay.modalities == ["rna_lognorm"] and not lay.rna_is_counts


def test_feature_types_give_modalities(make_adata):
    ds = load_dataset(make_adata(feature_types={"Antibody Capture": 4, "Peaks": 8}))
    assert ds.layout.modalities == ["rna_counts", "protein", "atac"]
    assert ds.layout.feature_types_key == "feature_types"
    assert (ds.feature_block == "rna").sum() == 60
    assert (ds.feature_block == "protein").sum() == 4 and (ds.feature_block == "atac").sum() == 8


def test_control_spellings():
    for label in ("control", "Ctrl", "NON-TARGETING", "non_targeting_12", "NTC", "nt", "DMSO", "vehicle",
                  "Unstimulated", "PBS", "safe-targeting", "DMSO_TF", "vehicle_control", "no_drug"):
        assert is_control_label(label), label
    for label in ("NT5E", "CTRLB", "TP53", "IFNG", "dose"):
        assert not is_control_label(label), label


def test_backed_file_loads_and_validates(make_adata, h5ad_path):
    path = h5ad_path(make_adata())
    adata = read_h5ad(path, backed=True)
    assert adata.isbacked
    ds = load_dataset(path, backed=True)
    assert ds.layout.backed and ds.layout.rna_is_counts


def test_a_files_values_are_scanned_once_per_process_until_the_file_changes(make_adata, h5ad_path, monkeypatch):
    """A design profiles then splits the same file: its values are checked once. A file rewritten in place
    (here with a negative value) is a new file: checked again, and refused."""
    import service.data.load as load

    scans = []
    real = load.row_chunks
    monkeypatch.setattr(load, "row_chunks", lambda X, *a: scans.append(1) or real(X, *a))
    adata = make_adata(sparse=False)
    path = h5ad_path(adata)
    load_dataset(path)
    first = len(scans)
    load_dataset(path)
    assert first >= 1 and len(scans) == first  # the second load skips the values pass
    adata.X[2, 4] = -3
    adata.write_h5ad(path)
    with pytest.raises(NegativeCounts):
        load_dataset(path)


# --- errors: each defect has its own type and a message naming what is wrong ----------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataFileError, match="no such file") as e:
        load_dataset(tmp_path / "nope.h5ad")
    assert "nope.h5ad" in str(e.value)


def test_not_hdf5(tmp_path):
    p = tmp_path / "fake.h5ad"
    p.write_text("cell,gene\n1,2\n")
    with pytest.raises(DataFileError, match="not an HDF5 file") as e:
        load_dataset(p)
    assert "fake.h5ad" in str(e.value)


def test_hdf5_that_is_not_anndata(tmp_path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataFileError, match="AnnData group"):
        load_dataset(p)


def test_missing_x(make_adata):
    adata = make_adata()
    adata.layers["counts"] = adata.X
    adata.X = None
    with pytest.raises(DataFileError, match=r"X is empty \(layers: 'counts'\)"):
        load_dataset(adata)


def test_no_perturbation_column_lists_columns(make_adata):
    adata = make_adata(control_label="wildtype")
    adata.obs = adata.obs.rename(columns={"perturbation": "mystery"})
    with pytest.raises(PerturbationColumnNotFound) as e:
        load_dataset(adata)
    assert "'mystery'" in str(e.value) and "'batch'" in str(e.value) and "--perturbation-key" in str(e.value)


def test_unnamed_column_with_control_labels_is_found(make_adata):
    adata = make_adata(control_label="non-targeting")
    adata.obs = adata.obs.rename(columns={"perturbation": "sgRNA_call"})
    assert load_dataset(adata).layout.perturbation_key == "sgRNA_call"


def test_pipe_in_labels_and_missing_context_stay_parseable(make_adata):
    adata = make_adata(perturbations=("G1|a", "G2"), contexts=["A", "B"])
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:5, adata.obs.columns.get_loc("cell_type")] = None
    obs = load_dataset(adata).obs
    assert "G1/a" in set(obs["perturbation"]) and "unknown" in set(obs["context"])
    assert all(key.count("|") == 2 for key in obs["condition"])


def test_unknown_perturbation_key_lists_keys(make_adata):
    with pytest.raises(UnknownPerturbationKey) as e:
        load_dataset(make_adata(), perturbation_key="sgRNA")
    assert "'sgRNA'" in str(e.value) and "'perturbation'" in str(e.value)


def test_unknown_dose_key(make_adata):
    with pytest.raises(UnknownColumn, match="'conc_nM'"):
        load_dataset(make_adata(), dose_key="conc_nM")


def test_no_control_cells_lists_labels(make_adata):
    with pytest.raises(NoControlCells) as e:
        load_dataset(make_adata(control_label="wildtype"))
    msg = str(e.value)
    assert "'perturbation'" in msg and "'wildtype'" in msg and "'G3'" in msg and "--control" in msg
    with pytest.raises(NoControlCells, match="'parental'"):
        load_dataset(make_adata(), control="parental")


def test_missing_labels(make_adata):
    adata = make_adata()
    adata.obs["perturbation"] = adata.obs["perturbation"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("perturbation")] = np.nan
    with pytest.raises(MissingLabels, match="1 cells have no label.*'cell3'"):
        load_dataset(adata)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_named(make_adata, sparse, bad):
    adata = make_adata(sparse=False)
    adata.X[5, 7] = bad
    if sparse:
        adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(NonFiniteValues) as e:
        load_dataset(adata)
    assert "'cell5'" in str(e.value) and "'G7'" in str(e.value)


def test_negative_counts_named(make_adata):
    adata = make_adata(sparse=False)
    adata.X[2, 4] = -3
    adata.X = sp.csr_matrix(adata.X)
    with pytest.raises(NegativeCounts) as e:
        load_dataset(adata)
    assert "-3" in str(e.value) and "'cell2'" in str(e.value) and "'G4'" in str(e.value)


def test_negative_protein_clr_is_allowed(make_adata):
    adata = make_adata(feature_types={"Antibody Capture": 3}, sparse=False)
    adata.X[:, -3:] -= 50  # CLR-like protein values are negative; only the RNA block must be >= 0
    assert load_dataset(adata).layout.modalities[-1] == "protein"


def test_duplicate_gene_names(make_adata):
    adata = make_adata()
    adata.var_names = ["G1"] + list(adata.var_names[1:])
    with pytest.raises(DuplicateGeneNames, match="'G1'"):
        load_dataset(adata)


def test_too_few_cells_names_conditions(make_adata):
    adata = make_adata()
    drop = np.flatnonzero(adata.obs["perturbation"].to_numpy() == "G2")[:9]
    adata = adata[np.setdiff1d(np.arange(adata.n_obs), drop)].copy()
    with pytest.raises(TooFewCells) as e:
        load_dataset(adata, min_cells=5)
    assert "'G2||all (3 cells)'" in str(e.value) and "--min-cells" in str(e.value)
    assert load_dataset(adata, min_cells=3).layout.n_cells == adata.n_obs


def test_invalid_dose(make_adata):
    adata = make_adata(perturbation_key="drug", control_label="DMSO", doses=[1.0], perturbations=("dA",))
    adata.obs["dose"] = adata.obs["dose"].astype(object)
    adata.obs.iloc[50, adata.obs.columns.get_loc("dose")] = "high"
    with pytest.raises(InvalidDose, match="'dose'.*'high'"):
        load_dataset(adata)


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError)
    for cls in (DataFileError, NoControlCells, TooFewCells, NegativeCounts):
        assert issubclass(cls, DataError)


def test_obs_index_preserved(make_adata):
    adata = make_adata()
    ds = load_dataset(adata)
    pd.testing.assert_index_equal(ds.obs.index, adata.obs.index)


def test_ensembl_var_names_use_the_symbol_column(make_adata, tmp_path):
    adata = make_adata()
    symbols = list(adata.var_names)
    symbols[20] = "G1"  # a duplicated symbol gets a suffix rather than colliding
    adata.var["gene_name"] = symbols
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    ds = load_dataset(adata)
    assert ds.layout.gene_symbols_key == "gene_name"
    assert ds.gene_names[3] == "G3" and ds.gene_names[20] == "G1-1"
    info = make_split(ds, "unseen-perturbation", 0, tmp_path)
    assert "G0" in info.genes and "ENSG00000000000" not in info.genes
    train = load_split(tmp_path).train
    assert train.var.loc["G5", "gene_id"] == "ENSG00000000005"
    assert profile_dataset(ds).target_genes_measured_fraction == 1.0


def _with_targets(adata, targets: dict[str, str], column: str = "targets"):
    adata.obs[column] = [targets.get(p, "") for p in adata.obs["drug"].astype(str)]
    return adata


def test_drug_target_annotations_are_read_per_perturbation(make_adata):
    adata = _with_targets(make_adata(perturbation_key="drug", control_label="DMSO", doses=[1.0, 10.0],
                                     perturbations=("dA", "dB", "dC")),
                          {"dA": "G1;G2", "dB": "G3, G4", "dC": ""}, column="target_genes")
    ds = load_dataset(adata)
    assert ds.layout.perturbation_key == "drug" and ds.layout.annotation_key == "target_genes"
    assert ds.annotations == {"dA": ["G1", "G2"], "dB": ["G3", "G4"]}  # dC: not annotated


def test_a_stimulus_receptors_column_is_its_annotation(make_adata):
    """A stimulation set names each stimulus's receptors (obs["receptors"]): read as its annotation, as a drug's
    targets are."""
    adata = _with_targets(make_adata(perturbation_key="drug", control_label="DMSO", perturbations=("IFNB", "IL6")),
                          {"IFNB": "G1;G2", "IL6": "G3"}, column="receptors")
    ds = load_dataset(adata)
    assert ds.layout.annotation_key == "receptors"
    assert ds.annotations == {"IFNB": ["G1", "G2"], "IL6": ["G3"]}


def test_genetic_data_has_no_annotation_column(make_adata):
    adata = make_adata()
    adata.obs["target_gene"] = adata.obs["perturbation"].astype(str)
    ds = load_dataset(adata)
    assert ds.layout.annotation_key is None and ds.annotations == {}


def test_inconsistent_annotation_names_the_perturbation_and_values(make_adata):
    adata = _with_targets(make_adata(perturbation_key="drug", control_label="DMSO", doses=[1.0, 10.0],
                                     perturbations=("dA", "dB")), {"dA": "G1", "dB": "G3"})
    adata.obs.loc[adata.obs.index[(adata.obs["drug"] == "dA").to_numpy()][:2], "targets"] = "G2"
    with pytest.raises(InconsistentAnnotation, match=r"'dA'.*'targets'.*'G1'.*'G2'|'dA'.*'targets'.*'G2'.*'G1'"):
        load_dataset(adata)
