"""Split schemes: disjoint conditions, no val or test truth in the model files, validation held out as the
test is (or grouped folds when it would be too small), reproducible seeds, the file format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from service.cli import app
from service.data import (
    SplitDirectoryError,
    SplitError,
    binarize,
    clr,
    highly_variable_genes,
    inverse_document_frequency,
    load_split,
    make_split,
    mean_var,
    normalize_log1p,
    pseudobulk,
    tfidf,
)
from service.data.conditions import combo_genes, parse_condition_key
from service.data.splits import MIN_VAL_CONDITIONS, MODEL_FILES, perturbation_targets, write_fold

SINGLES = tuple(f"G{i}" for i in range(10))
COMBOS = ("G0+G1", "G2+G3", "G4+G5", "G0+G6", "G1+G7", "G3+G5", "G6+G7", "G2+G4", "G1+G5", "G0+G2", "G8+G9",
          "G7+G9")


def _dataset(make_adata, scheme):
    if scheme == "combo":
        return make_adata(perturbations=SINGLES + COMBOS, perturbation_key="condition", control_label="ctrl")
    if scheme in ("unseen-drug", "unseen-dose"):
        return make_adata(perturbations=("dA", "dB", "dC", "dD", "dE"), perturbation_key="drug", control_label="DMSO",
                          doses=[0.1, 1.0, 10.0, 100.0], contexts=["A549", "MCF7"], cells_per_condition=6)
    if scheme == "unseen-context":
        return make_adata(contexts=["A", "B", "C"])
    return make_adata()


ALL = ("unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context")


@pytest.fixture(scope="module")
def splits(tmp_path_factory, make_adata):
    """Every scheme split once (module-scoped: the files are read by many tests)."""
    root = tmp_path_factory.mktemp("splits")
    out = {}
    for scheme in ALL:
        adata = _dataset(make_adata, scheme)
        make_split(adata, scheme, 3, root / scheme)
        out[scheme] = (adata, load_split(root / scheme))
    return out


@pytest.mark.parametrize("scheme", ALL)
def test_parts_are_disjoint_in_conditions_and_cells(splits, scheme):
    _, s = splits[scheme]
    conds = {k: set(v) for k, v in s.info.conditions.items()}
    assert conds["train"] and conds["test"]
    # Validation either holds out enough conditions to decide, or grouped folds over train replace it.
    if s.info.validation == "holdout":
        assert len(conds["val"]) >= MIN_VAL_CONDITIONS and not s.info.folds
    else:
        assert not conds["val"] and len(s.info.folds) >= 2
    assert not (conds["train"] & conds["val"]) and not (conds["train"] & conds["test"])
    assert not (conds["val"] & conds["test"])
    train_obs, val_obs, truth_obs = s.train.obs, s.val_truth.obs, s.test_truth.obs
    assert set(train_obs.loc[~train_obs["is_control"], "condition"]) == conds["train"]
    assert set(val_obs["condition"]) == conds["val"]
    assert set(truth_obs["condition"]) == conds["test"]
    names = [set(a.obs_names) for a in (s.train, s.val_truth, s.test_truth)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert s.info.n_cells == {"train": s.train.n_obs, "val_inputs": s.val_inputs.n_obs, "val_truth": s.val_truth.n_obs,
                              "test_inputs": s.test_inputs.n_obs, "test_truth": s.test_truth.n_obs}


@pytest.mark.parametrize("scheme", ALL)
def test_model_files_hold_no_cell_of_a_condition_to_predict(splits, scheme):
    """What a sandbox sees (train, val_inputs, test_inputs) has no perturbed cell of a val or test condition."""
    _, s = splits[scheme]
    held = set(s.info.conditions["val"]) | set(s.info.conditions["test"])
    for name in MODEL_FILES:
        part = getattr(s, name.removesuffix(".h5ad"))
        perturbed = part.obs.loc[~part.obs["is_control"].astype(bool), "condition"]
        assert not set(perturbed) & held, name
    for fold in s.info.folds:  # a fold is held out of the training data it is predicted from
        assert set(fold) <= set(s.info.conditions["train"])


@pytest.mark.parametrize("scheme", ALL)
def test_inputs_hold_only_controls_and_the_list_to_predict(splits, scheme):
    _, s = splits[scheme]
    for which in ("val", "test"):
        inputs, truth = s.inputs(which), s.truth(which)
        assert inputs.obs["is_control"].all()
        assert not set(inputs.obs_names) & set(truth.obs_names)
        assert not set(inputs.obs["condition"]) & set(s.info.conditions[which])
        assert set(inputs.uns) == {"predict", "split"}
        assert inputs.uns["split"] == {"scheme": scheme, "group_by": s.info.group_by}
        predict = s.predict_of(which)
        assert sorted(predict["condition"]) == s.info.conditions[which]
        # Controls of exactly the contexts that have something to predict.
        assert set(inputs.obs["context"]) == set(predict["context"])
        for cond, pert, dose, ctx in predict.itertuples(index=False):
            p, d, c = parse_condition_key(cond)
            assert (p, c) == (pert, ctx) and (np.isnan(d) and np.isnan(dose) or d == dose)


@pytest.mark.parametrize("scheme", ALL)
def test_truth_matches_source_expression(splits, scheme):
    adata, s = splits[scheme]
    truth = s.test_truth
    src = adata[truth.obs_names].X.toarray()
    expected = np.log1p(src / src.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(truth.X.toarray(), expected, rtol=1e-5, atol=1e-5)
    assert sp.issparse(s.train.X) and s.train.X.dtype == np.float32
    assert list(s.train.var_names) == s.info.genes == list(truth.var_names) == list(s.test_inputs.var_names)


def test_seeds_reproduce_and_differ(make_adata, tmp_path):
    adata = make_adata(perturbations=tuple(f"G{i}" for i in range(20)))
    a = make_split(adata, "unseen-perturbation", 7, tmp_path / "a")
    b = make_split(adata, "unseen-perturbation", 7, tmp_path / "b")
    c = make_split(adata, "unseen-perturbation", 8, tmp_path / "c")
    assert a.conditions == b.conditions
    assert a.conditions != c.conditions
    assert json.loads((tmp_path / "a" / "split.json").read_text())["conditions"] == a.conditions


def test_unseen_perturbation_holds_out_whole_perturbations(make_adata, tmp_path):
    info = make_split(make_adata(contexts=["X", "Y"]), "unseen-perturbation", 0, tmp_path)
    perts = {k: {parse_condition_key(c)[0] for c in v} for k, v in info.conditions.items()}
    assert not perts["test"] & perts["train"] and not perts["val"] & perts["train"]


def test_combo_categories(splits):
    _, s = splits["combo"]
    cats = s.info.categories
    test = s.info.conditions["test"]
    assert set(test) <= set(cats)
    train_singles = {parse_condition_key(c)[0] for c in s.info.conditions["train"] if "+" not in c}
    for cond in test:
        pert = parse_condition_key(cond)[0]
        if "+" in pert:
            k = sum(g in train_singles for g in combo_genes(pert))
            assert cats[cond] == f"seen{k}"
        else:
            assert cats[cond] == "unseen_single" and pert not in train_singles
    assert any(cats[c].startswith("seen") for c in test)


def test_combo_categories_cover_all_levels_on_larger_data(make_adata, tmp_path):
    singles = tuple(f"G{i}" for i in range(20))
    combos = tuple(f"G{i}+G{j}" for i in range(20) for j in range(i + 1, 20) if (i * 7 + j) % 5 == 0)
    info = make_split(make_adata(perturbations=singles + combos, cells_per_condition=5, n_control=20),
                      "combo", 1, tmp_path)
    assert {"seen0", "seen1", "seen2", "unseen_single"} <= {info.categories[c] for c in info.conditions["test"]}
    assert any("+" in c for c in info.conditions["train"])


def test_unseen_drug_holds_out_every_dose(splits):
    _, s = splits["unseen-drug"]
    drugs = {k: {parse_condition_key(c)[0] for c in v} for k, v in s.info.conditions.items()}
    assert not drugs["test"] & drugs["train"] and not drugs["val"] & drugs["train"]
    assert len({parse_condition_key(c)[1] for c in s.info.conditions["test"]}) == 4


def test_unseen_dose_keeps_the_drug_in_train(splits):
    _, s = splits["unseen-dose"]
    train = {(parse_condition_key(c)[0], parse_condition_key(c)[1]) for c in s.info.conditions["train"]}
    for cond in s.info.conditions["test"]:
        drug, dose, _ = parse_condition_key(cond)
        assert (drug, dose) not in train
        assert any(d == drug for d, _ in train)
        assert s.info.categories[cond] in ("interpolation", "extrapolation")


def test_unseen_context_zero_and_few_shot(make_adata, tmp_path):
    adata = make_adata(contexts=["A", "B", "C"])
    zero = make_split(adata, "unseen-context", 0, tmp_path / "zero", context="B")
    assert zero.held_out_context == "B"
    assert {parse_condition_key(c)[2] for c in zero.conditions["test"]} == {"B"}
    assert "B" not in {parse_condition_key(c)[2] for c in zero.conditions["train"] + zero.conditions["val"]}
    # Three cell types: one for test leaves two, too few to hold one out for val; train holds both, and
    # selection is leave-one-cell-type-out over them.
    assert zero.validation == "cv" and zero.group_by == "context" and not zero.conditions["val"]
    assert [{parse_condition_key(c)[2] for c in fold} for fold in zero.folds] in ([{"A"}, {"C"}], [{"C"}, {"A"}])
    assert sorted(c for fold in zero.folds for c in fold) == zero.conditions["train"]
    few = make_split(adata, "unseen-context", 0, tmp_path / "few", context="B", few_shot_k=3)
    in_train = [c for c in few.conditions["train"] if c.endswith("|B")]
    assert len(in_train) == 3 and len(few.conditions["test"]) == 7
    assert set(few.categories.values()) == {"few_shot"}
    s = load_split(tmp_path / "few")
    assert set(s.test_inputs.obs["context"]) == {"B"}


def test_n_genes_keeps_perturbed_genes_and_blocks(make_adata, tmp_path):
    adata = make_adata(n_genes=200, feature_types={"Antibody Capture": 4, "Peaks": 6})
    info = make_split(adata, "unseen-perturbation", 0, tmp_path, n_genes=30)
    s = load_split(tmp_path)
    assert info.feature_types == {"Gene Expression": 30, "Antibody Capture": 4, "Peaks": 6}
    assert {f"G{i}" for i in range(10)} <= set(info.genes)
    assert list(s.train.var["feature_types"].unique()) == ["Gene Expression", "Antibody Capture", "Peaks"]
    peaks = s.train[:, s.train.var["feature_types"] == "Peaks"].X
    assert set(np.unique(peaks.toarray())) <= {0.0, 1.0}
    prot = s.train[:, s.train.var["feature_types"] == "Antibody Capture"].X.toarray()
    np.testing.assert_allclose(prot.mean(axis=1), 0, atol=1e-5)  # CLR is centred per cell within its own block


def test_lognorm_input_is_kept(make_adata, tmp_path):
    adata = make_adata(counts=False)
    make_split(adata, "unseen-perturbation", 0, tmp_path)
    s = load_split(tmp_path)
    np.testing.assert_allclose(s.train.X.toarray(), adata[s.train.obs_names].X.toarray(), rtol=1e-6)


@pytest.mark.parametrize(
    ("scheme", "kwargs", "message"),
    [
        ("leave-one-out", {}, "unknown split scheme 'leave-one-out'"),
        ("combo", {}, r"needs combinations written 'A\+B'"),
        ("unseen-dose", {}, "needs a dose column"),
        ("unseen-context", {}, "needs 2 or more contexts"),
    ],
)
def test_split_errors(make_adata, tmp_path, scheme, kwargs, message):
    with pytest.raises(SplitError, match=message):
        make_split(make_adata(), scheme, 0, tmp_path, **kwargs)


def test_unseen_context_unknown_context(make_adata, tmp_path):
    with pytest.raises(SplitError, match="'Z' cannot be held out"):
        make_split(make_adata(contexts=["A", "B"]), "unseen-context", 0, tmp_path, context="Z")


def test_cells_without_a_cell_type_are_never_drawn_as_the_held_out_one(make_adata, tmp_path):
    """Cells whose cell type is missing (doublets, unannotated cells) form the context `unknown`: no cell type
    a scientist asks about. A drawn held-out context is never it, whatever the seed; named, it can be."""
    adata = make_adata(contexts=["A", "B", "unannotated"])
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object).where(adata.obs["cell_type"] != "unannotated")
    drawn = {make_split(adata, "unseen-context", seed, tmp_path / str(seed)).held_out_context for seed in range(8)}
    assert drawn == {"A", "B"}
    assert make_split(adata, "unseen-context", 0, tmp_path / "named", context="unknown").held_out_context == "unknown"


def test_load_split_errors(splits, tmp_path):
    with pytest.raises(SplitDirectoryError, match="missing 'train.h5ad'"):
        load_split(tmp_path)
    _, s = splits["unseen-perturbation"]
    for f in MODEL_FILES:
        (tmp_path / f).write_bytes((s.path / f).read_bytes())
    (tmp_path / "split.json").write_text('{"scheme": 1}')
    with pytest.raises(SplitDirectoryError, match="split.json: malformed"):
        load_split(tmp_path)
    # A folder of model files opens (baselines need no truth); asking it for truth says what is missing.
    (tmp_path / "split.json").write_bytes((s.path / "split.json").read_bytes())
    with pytest.raises(SplitDirectoryError, match="val_truth.h5ad: missing"):
        _ = load_split(tmp_path).val_truth


def test_old_split_directories_fail_with_a_clear_message(splits, tmp_path):
    """Before val_inputs/val_truth a split held val.h5ad, truth included, which reached sandboxes."""
    _, s = splits["unseen-perturbation"]
    for f in ("train.h5ad", "test_inputs.h5ad", "test_truth.h5ad", "split.json"):
        (tmp_path / f).write_bytes((s.path / f).read_bytes())
    (tmp_path / "val.h5ad").write_bytes((s.path / "val_truth.h5ad").read_bytes())
    with pytest.raises(SplitDirectoryError, match="older CellForge.*cellforge data split"):
        load_split(tmp_path)


def test_cli_split_json(make_adata, h5ad_path, tmp_path):
    path = h5ad_path(make_adata(perturbations=SINGLES + COMBOS, perturbation_key="condition", control_label="ctrl"))
    result = CliRunner().invoke(app, ["data", "split", str(path), "--scheme", "combo", "--seed", "5",
                                      "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["ok"] and payload["scheme"] == "combo" and payload["seed"] == 5
    assert payload["validation"] == "cv" and payload["group_by"] == "perturbation" and len(payload["folds"]) == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "split.json", "test_inputs.h5ad", "test_truth.h5ad", "train.h5ad", "val_inputs.h5ad", "val_truth.h5ad"]


def test_cli_split_error_is_one_json_line(make_adata, h5ad_path, tmp_path):
    path = h5ad_path(make_adata())
    result = CliRunner().invoke(app, ["data", "split", str(path), "--scheme", "unseen-drug",
                                      "--out", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload == {"ok": False, "error": "SplitError", "message": payload["message"]}
    assert "needs a dose column" in payload["message"]


# --- preprocessing the split writer relies on --------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False])
def test_normalize_log1p_matches_scanpy(make_adata, sparse):
    sc = pytest.importorskip("scanpy")
    adata = make_adata(sparse=sparse)
    before = adata.X.copy()
    ours = normalize_log1p(adata.X)
    ref = adata.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    def dense(m):
        return m.toarray() if sp.issparse(m) else m

    np.testing.assert_allclose(dense(ours), dense(ref.X), rtol=1e-5, atol=1e-6)
    assert sp.issparse(ours) == sparse and ours.dtype == np.float32
    np.testing.assert_array_equal(dense(adata.X), dense(before))  # not in place unless asked


def test_normalize_in_place_reuses_buffer(make_adata):
    X = make_adata().X.astype(np.float32)
    expected = normalize_log1p(X).toarray()
    out = normalize_log1p(X, in_place=True)
    assert out.data is X.data
    np.testing.assert_allclose(out.toarray(), expected)


def test_highly_variable_genes_keep_perturbed(make_adata):
    adata = make_adata(n_genes=100)
    X = normalize_log1p(adata.X).toarray()
    X[:, 50] = np.where(np.arange(X.shape[0]) % 2, 9.0, 0.0)  # a gene that varies enormously
    X[:, 3] = 1.0  # constant gene that we force in
    idx = highly_variable_genes(sp.csr_matrix(X), adata.var_names, 10, keep=["G3", "NOT_A_GENE"])
    assert len(idx) == 10 and 50 in idx and 3 in idx and list(idx) == sorted(idx)


def test_pseudobulk_and_modality_transforms(make_adata):
    adata = make_adata(feature_types={"Antibody Capture": 4, "Peaks": 6})
    pb = pseudobulk(adata.X, adata.obs["perturbation"].to_numpy())
    X = adata.X.toarray()
    np.testing.assert_allclose(pb.loc["G3"].to_numpy(), X[adata.obs["perturbation"].to_numpy() == "G3"].mean(0))
    prot = clr(X[:, 60:64])
    np.testing.assert_allclose(prot.mean(1), 0, atol=1e-5)
    peaks = binarize(sp.csr_matrix(X[:, 64:]))
    assert set(np.unique(peaks.toarray())) <= {0.0, 1.0}
    tf = tfidf(sp.csr_matrix(X[:, 64:]))
    assert tf.shape == (adata.n_obs, 6) and np.isfinite(tf.toarray()).all() and (tf.toarray() >= 0).all()


def test_backed_split_equals_in_memory(make_adata, h5ad_path, tmp_path):
    path = h5ad_path(make_adata(n_genes=80))
    on_disk = make_split(path, "unseen-perturbation", 2, tmp_path / "disk", n_genes=30, backed=True)
    in_mem = make_split(path, "unseen-perturbation", 2, tmp_path / "mem", n_genes=30, backed=False)
    assert on_disk.conditions == in_mem.conditions and on_disk.genes == in_mem.genes
    a, b = load_split(tmp_path / "disk"), load_split(tmp_path / "mem")
    np.testing.assert_array_equal(a.train.X.toarray(), b.train.X.toarray())
    np.testing.assert_array_equal(a.test_truth.X.toarray(), b.test_truth.X.toarray())


def test_split_error_names_the_file(make_adata, h5ad_path, tmp_path):
    path = h5ad_path(make_adata(perturbations=("G1",)))
    with pytest.raises(SplitError, match=r"data\.h5ad: need at least 2 distinct perturbations"):
        make_split(path, "unseen-perturbation", 0, tmp_path / "out")


def test_mean_var_sparse_matches_dense(make_adata):
    X = normalize_log1p(make_adata().X)
    mean, var = mean_var(X)
    dense = X.toarray().astype(np.float64)
    np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-6)
    np.testing.assert_allclose(var, dense.var(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(mean_var(dense)[1], dense.var(0), rtol=1e-6, atol=1e-9)


def test_cli_split_table(make_adata, h5ad_path, tmp_path):
    path = h5ad_path(make_adata(contexts=["A", "B"]))
    result = CliRunner().invoke(app, ["data", "split", str(path), "--scheme", "unseen-context", "--context", "A",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "held-out context 'A'" in result.stdout and "zero_shot 10" in result.stdout
    assert load_split(tmp_path / "out").info.held_out_context == "A"


def test_atac_tfidf_uses_training_idf(make_adata, tmp_path):
    adata = make_adata(feature_types={"Peaks": 12})
    info = make_split(adata, "unseen-perturbation", 0, tmp_path, atac="tfidf")
    assert info.atac_transform == "tfidf"
    s = load_split(tmp_path)
    peaks = (s.train.var["feature_types"] == "Peaks").to_numpy()
    raw_train = adata[s.train.obs_names].X[:, 60:]
    raw_truth = adata[s.test_truth.obs_names].X[:, 60:]
    idf = inverse_document_frequency(raw_train)
    np.testing.assert_allclose(s.test_truth.X[:, peaks].toarray(), tfidf(raw_truth, idf).toarray(), rtol=1e-5)
    with pytest.raises(SplitError, match="atac transform 'lsi'"):
        make_split(adata, "unseen-perturbation", 0, tmp_path / "x", atac="lsi")


def test_drug_targets_travel_as_inputs_in_the_model_facing_parts(make_adata, tmp_path):
    targets = {"dA": "G1;G2", "dB": "G3", "dC": "G4;G5", "dD": "G6", "dE": "G7;G55"}
    adata = make_adata(perturbations=tuple(targets), perturbation_key="drug", control_label="DMSO",
                       doses=[0.1, 1.0, 10.0], cells_per_condition=6, n_genes=60)
    adata.obs["targets"] = [targets.get(p, "") for p in adata.obs["drug"].astype(str)]
    info = make_split(adata, "unseen-drug", 0, tmp_path / "s", n_genes=20)
    s = load_split(tmp_path / "s")
    assert info.annotation_key == "targets"
    assert {"G1", "G2", "G3", "G4", "G5", "G6", "G7", "G55"} <= set(info.genes)  # annotated targets kept
    drugs = {k: {parse_condition_key(c)[0] for c in v} for k, v in info.conditions.items()}
    for part, name in ((s.train, "train"), (s.val_inputs, "val"), (s.test_inputs, "test")):
        table = part.uns["perturbation_targets"]
        assert set(table) == {"perturbation", "targets"}  # nothing about the response
        # Exactly the part's own perturbations, each with its annotation string.
        assert dict(zip(table["perturbation"], table["targets"], strict=True)) == {d: targets[d] for d in drugs[name]}
    assert set(s.test_inputs.uns) == {"predict", "perturbation_targets", "split"}
    assert "perturbation_targets" not in s.test_truth.uns
    assert perturbation_targets(s) == {d: targets[d].split(";") for d in targets}


def test_split_without_annotations_has_no_target_table(splits):
    _, s = splits["unseen-drug"]
    assert s.info.annotation_key is None and perturbation_targets(s) == {}
    assert all("perturbation_targets" not in p.uns for p in (s.train, s.val_inputs, s.test_inputs))


def test_target_table_keeps_perturbation_names_with_slashes(make_adata, tmp_path):
    adata = make_adata(perturbations=("dA/x", "dB", "dC", "dD", "dE"), perturbation_key="drug",
                       control_label="DMSO", doses=[1.0, 10.0], cells_per_condition=6)
    adata.obs["targets"] = ["" if p == "DMSO" else f"G{len(p)}" for p in adata.obs["drug"].astype(str)]
    make_split(adata, "unseen-drug", 0, tmp_path / "s")
    assert perturbation_targets(load_split(tmp_path / "s"))["dA/x"] == ["G4"]


# --- validation mirrors the test ------------------------------------------------------------------------


def test_unseen_context_validation_holds_out_whole_cell_types(make_adata, tmp_path):
    """Twelve cell types: one for test, five whole ones for val, six stay in train; no val condition lies in
    a training context (it would measure the wrong skill)."""
    contexts = [chr(ord("A") + i) for i in range(12)]
    adata = make_adata(contexts=contexts)
    info = make_split(adata, "unseen-context", 0, tmp_path, context="A")
    assert info.validation == "holdout" and info.group_by == "context"
    ctx = {part: {parse_condition_key(c)[2] for c in conds} for part, conds in info.conditions.items()}
    assert ctx["test"] == {"A"} and len(ctx["val"]) == 5 and len(ctx["train"]) == 6
    assert not ctx["val"] & ctx["train"]
    for part in ("val", "train"):  # every condition of a val context is in val
        assert all(parse_condition_key(c)[2] in ctx[part] for c in info.conditions[part])
    assert len(info.conditions["val"]) == 50
    s = load_split(tmp_path)
    assert set(s.val_inputs.obs["context"]) == ctx["val"] and s.val_inputs.obs["is_control"].all()


def test_few_cell_types_are_validated_by_folds_of_whole_training_cell_types(make_adata, tmp_path):
    """Six cell types: a validation fold of two would measure those two, and keep them out of the test model's
    training; every non-test cell type trains the test model, and leave-one-cell-type-out folds select, each
    trained on all training cell types but one, as the test model is on all of them."""
    adata = make_adata(contexts=["A", "B", "C", "D", "E", "F"])
    info = make_split(adata, "unseen-context", 0, tmp_path, context="A")
    assert info.validation == "cv" and info.group_by == "context" and not info.conditions["val"]
    assert {parse_condition_key(c)[2] for c in info.conditions["train"]} == {"B", "C", "D", "E", "F"}
    fold_contexts = [{parse_condition_key(c)[2] for c in fold} for fold in info.folds]
    assert sorted(map(sorted, fold_contexts)) == [["B"], ["C"], ["D"], ["E"], ["F"]]


def test_many_training_cell_types_are_validated_by_three_folds(make_adata, tmp_path):
    """Past eight training cell types leaving each out in turn costs more fits than it tells: 3 folds."""
    contexts = [f"T{i}" for i in range(10)]
    info = make_split(make_adata(contexts=contexts), "unseen-context", 0, tmp_path, context="T0", val_fraction=0.0)
    fold_contexts = [{parse_condition_key(c)[2] for c in fold} for fold in info.folds]
    assert info.validation == "cv" and len(fold_contexts) == 3
    assert set().union(*fold_contexts) == set(contexts[1:])
    assert all(not a & b for i, a in enumerate(fold_contexts) for b in fold_contexts[i + 1:])


def test_unseen_perturbation_validation_holds_out_whole_genes(make_adata, tmp_path):
    adata = make_adata(perturbations=tuple(f"G{i}" for i in range(20)), contexts=["X", "Y"])
    info = make_split(adata, "unseen-perturbation", 0, tmp_path, val_fraction=0.25)
    genes = {k: {parse_condition_key(c)[0] for c in v} for k, v in info.conditions.items()}
    assert info.validation == "holdout" and len(genes["val"]) == 5
    assert not genes["val"] & genes["train"] and not genes["val"] & genes["test"]
    assert len(info.conditions["val"]) == 10  # both contexts of each val gene


def test_small_validation_becomes_grouped_folds_over_training_genes(make_adata, tmp_path):
    """Ten genes, one context: val would hold one gene, too few to decide; its gene goes back to train and
    three folds of whole genes cover every training condition exactly once."""
    info = make_split(make_adata(contexts=["X", "Y"]), "unseen-perturbation", 0, tmp_path)
    assert info.validation == "cv" and info.group_by == "perturbation" and not info.conditions["val"]
    assert len(info.folds) == 3
    assert sorted(c for fold in info.folds for c in fold) == info.conditions["train"]
    fold_genes = [{parse_condition_key(c)[0] for c in fold} for fold in info.folds]
    for i, genes in enumerate(fold_genes):
        assert all(not genes & other for j, other in enumerate(fold_genes) if j != i)  # whole genes
        fold = info.folds[i]
        assert all(f"{g}||{ctx}" in fold for g in genes for ctx in ("X", "Y"))


def test_dose_folds_hold_out_whole_doses_and_keep_each_drug(make_adata, tmp_path):
    adata = make_adata(perturbations=("dA", "dB", "dC"), perturbation_key="drug", control_label="DMSO",
                       doses=[0.1, 1.0, 10.0, 100.0], contexts=["A549", "MCF7"], cells_per_condition=6)
    info = make_split(adata, "unseen-dose", 0, tmp_path)
    assert info.validation == "cv" and info.group_by == "dose" and len(info.folds) >= 2
    train = info.conditions["train"]
    for fold in info.folds:
        held = {(parse_condition_key(c)[0], parse_condition_key(c)[1]) for c in fold}
        assert all(c in fold for c in train if (parse_condition_key(c)[0], parse_condition_key(c)[1]) in held)
        for drug in {d for d, _ in held}:  # the drug keeps a training dose in the fold's training data
            assert any(parse_condition_key(c)[0] == drug and c not in fold for c in train)
        assert len({d for d, _ in held}) == len(held)  # one dose per drug per fold


def test_write_fold_holds_the_fold_out_of_its_training_data(splits, tmp_path):
    _, s = splits["unseen-context"]
    fold = write_fold(s, 0, tmp_path / "fold")
    held = set(s.info.folds[0])
    assert sorted(p.name for p in (tmp_path / "fold").iterdir()) == sorted([*MODEL_FILES, "val_truth.h5ad",
                                                                            "split.json"])
    train = fold.train.obs
    assert not set(train.loc[~train["is_control"], "condition"]) & held
    assert set(fold.val_truth.obs["condition"]) == held and fold.val_inputs.obs["is_control"].all()
    assert sorted(fold.predict_of("val")["condition"]) == sorted(held)
    assert fold.info.validation == "holdout" and fold.info.conditions["val"] == sorted(held)
    assert fold.train.n_obs + fold.val_truth.n_obs == s.train.n_obs
    # The fold's model files say how many contexts the run's test model trains on (the fold trains on fewer).
    run_contexts = len({parse_condition_key(c)[2] for c in s.info.conditions["train"]})
    assert len(set(train.loc[~train["is_control"], "context"])) < run_contexts
    for part in (fold.train, fold.val_inputs):
        assert part.uns["split"]["run_contexts"] == run_contexts
    with pytest.raises(SplitDirectoryError, match="test_truth.h5ad: missing"):
        _ = fold.test_truth
    with pytest.raises(SplitError, match="fold 9 does not exist"):
        write_fold(s, 9, tmp_path / "nine")
