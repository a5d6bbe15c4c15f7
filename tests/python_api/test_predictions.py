"""`import cellforge`: a run's predictions come back in the user's obs column names and category labels,
with provenance in uns, and `cellforge.score` takes them back. A real split of real simulated data; the run
directory holds what a design run writes (its predictions here are a real baseline's)."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellforge
from service.data import make_split, profile_dataset, simulate
from service.data.baselines import run_baselines
from service.data.conditions import parse_condition_key
from service.data.evaluate import Evaluator
from service.pipeline import DesignSettings

TASK = "Predict expression after knockout of unseen genes"


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> ad.AnnData:
    """A knockout screen as a lab names it: `guide_target` and `celltype_fine`, categories in its own order."""
    adata = simulate("knockout", 0, n_cells=1500, n_genes=100, n_perturbations=10)
    obs = adata.obs.rename(columns={"perturbation": "guide_target", "cell_type": "celltype_fine"})
    for column in ("guide_target", "celltype_fine"):
        obs[column] = pd.Categorical(obs[column].astype(str),
                                     categories=sorted(obs[column].astype(str).unique(), reverse=True))
    adata.obs = obs
    return adata


@pytest.fixture(scope="module")
def run(screen, tmp_path_factory) -> cellforge.DesignRun:
    """A run directory as run_design leaves it: run.json, split/, plan.json, metrics.json, predictions.h5ad."""
    run_dir = tmp_path_factory.mktemp("run")
    data = run_dir / "input.h5ad"
    screen.write_h5ad(data)
    make_split(data, "unseen-perturbation", 0, run_dir / "split", perturbation_key="guide_target",
               context_key="celltype_fine")
    settings = DesignSettings(data=data, task=TASK, out=run_dir, context_key="celltype_fine")
    (run_dir / "run.json").write_text(json.dumps({"settings": json.loads(settings.model_dump_json()),
                                                  "llm": {"backend": "offline"}}))
    (run_dir / "plan.json").write_text(json.dumps({"architecture": {"perturbation_encoder": "gene_embedding",
                                                                    "embedding_dim": 32}}))
    evaluator = Evaluator(run_dir / "split", "test")
    predictions = run_baselines(run_dir / "split")
    reports = {name: evaluator.score(p) for name, p in predictions.items()}
    predictions["mean_delta"].write_h5ad(run_dir / "predictions.h5ad")
    record = {"status": "validated", "primary_metric": "pearson_delta_pert",
              "verdict": {"summary": "mean_delta delivered", "beats_baselines": False},
              "delivered": {"kind": "baseline", "key": "mean_delta", "test": reports["mean_delta"].summary},
              "baselines": {n: r.summary for n, r in reports.items()}, "ceiling": evaluator.ceiling}
    (run_dir / "metrics.json").write_text(json.dumps(record))
    return cellforge.DesignRun(run_dir, "validated", record, data)


def test_predictions_keep_the_users_columns_and_labels(run, screen):
    pred = run.predictions
    assert list(pred.obs.columns) == ["guide_target", "celltype_fine", "cellforge_condition"]
    for column in ("guide_target", "celltype_fine"):
        assert list(pred.obs[column].cat.categories) == list(screen.obs[column].cat.categories)
    assert not any("|" in name for name in pred.obs_names)  # readable names, not condition keys
    for (_, row), name in zip(pred.obs.iterrows(), pred.obs_names, strict=True):
        perturbation, _, context = parse_condition_key(row["cellforge_condition"])
        assert (row["guide_target"], row["celltype_fine"]) == (perturbation, context)
        assert name == f"{perturbation}_{context}"
    standard = ad.read_h5ad(run.run_dir / "predictions.h5ad")
    np.testing.assert_array_equal(pred.X, standard.X)
    assert list(pred.var_names) == list(standard.var_names)


def test_predictions_carry_provenance_through_h5ad(run, tmp_path):
    run.predictions.write_h5ad(tmp_path / "pred.h5ad")
    uns = ad.read_h5ad(tmp_path / "pred.h5ad").uns[cellforge.PROVENANCE_KEY]
    assert uns["version"] == cellforge.__version__ and re.fullmatch(r"[0-9a-f]{16}", uns["run_id"])
    assert uns["task"] == TASK and uns["status"] == "validated"
    assert uns["split"]["scheme"] == "unseen-perturbation" and uns["split"]["context_key"] == "celltype_fine"
    assert uns["split"]["n_test_conditions"] == run.predictions.n_obs
    assert uns["verdict"]["delivered"] == "mean_delta" and uns["verdict"]["summary"] == "mean_delta delivered"
    assert uns["plan"]["perturbation_encoder"] == "gene_embedding"


def test_score_takes_the_users_predictions_back(run):
    report = cellforge.score(run.run_dir / "split", run.predictions)
    assert report.summary == pytest.approx(run.record["delivered"]["test"], nan_ok=True)
    table = cellforge.baselines(run.run_dir / "split")
    assert "mean_delta" in table.index and "data ceiling" in table.index
    assert table.loc["mean_delta", "pearson_delta"] == pytest.approx(run.record["baselines"]["mean_delta"]
                                                                     ["pearson_delta"])


def test_metrics_table_has_every_predictor(run):
    table = run.metrics
    assert list(table.index) == ["delivered: mean_delta", *run.record["baselines"], "data ceiling"]
    assert table.columns[0] == "pearson_delta_pert"
    assert "<table" in run._repr_html_() and run.report._repr_html_().startswith("<a href=\"file://")


def test_a_renamed_cell_type_column_is_pointed_out_not_pooled(screen, tmp_path):
    path = tmp_path / "renamed.h5ad"
    screen.write_h5ad(path)
    profile = profile_dataset(path, perturbation_key="guide_target")
    assert profile.context_key is None and profile.context_candidates == ["celltype_fine"]
    assert any("--context-key celltype_fine" in note for note in profile.notes)
    pooled = profile_dataset(path, perturbation_key="guide_target", context_key="none")
    assert pooled.context_key is None and pooled.context_candidates == [] and pooled.n_contexts <= 1


def test_unknown_and_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*bogus"):
        cellforge.design(tmp_path / "x.h5ad", TASK, out=tmp_path / "run", bogus=1)
    with pytest.raises(ValueError, match=r"memory: .*'lots'") as info:
        cellforge.design(tmp_path / "x.h5ad", TASK, out=tmp_path / "run", memory="lots")
    assert "errors.pydantic.dev" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_prepared_split_is_checked_before_any_work_and_lends_its_columns(run, tmp_path):
    import shutil

    from service.pipeline import PipelineError
    from service.pipeline.run import _data_keys, preflight

    split = run.run_dir / "split"
    settings = DesignSettings(data=run.data, task=TASK, out=tmp_path / "run", sandbox="local", split=split)
    prepared = preflight(settings)
    assert prepared is not None and prepared.info.scheme == "unseen-perturbation"
    keys = _data_keys(settings, prepared)
    assert (keys["perturbation_key"], keys["context_key"], keys["dose_key"]) == ("guide_target", "celltype_fine", None)
    with pytest.raises(PipelineError, match="contradicts the prepared split's scheme unseen-perturbation"):
        preflight(settings.model_copy(update={"scheme": "unseen-context"}))
    inputs_only = tmp_path / "inputs-only"
    shutil.copytree(split, inputs_only, ignore=shutil.ignore_patterns("*_truth.h5ad"))
    with pytest.raises(PipelineError, match="without its truth files"):
        preflight(settings.model_copy(update={"split": inputs_only}))
    assert not (tmp_path / "run").exists()
