"""Integrity of selection, through real Docker sandboxes: a generated bundle that hunts for validation
truth finds none, and when the designed model loses, the run delivers the winning baseline (or stack)
with code that reproduces it, and says so everywhere.

The run: cytokine responses in an unseen cell type (three cell types: one for test, two left, so
validation is leave-one-cell-type-out over them). The "designed" bundle is hostile: its train.py keeps the
vetted functions the service's contract tests call (so they pass: the contract tests are the service's and
no generated bundle may replace them), but run as `python train.py` it walks every file the sandbox can
read, opens every .h5ad and looks for a perturbed cell of any condition it was asked to predict; then it
predicts each context's control plus the pooled training Δ (a weak model)."""

from __future__ import annotations

import json
import textwrap

import pytest

from service.data import simulate
from service.pipeline import pipeline_handlers, run_design
from service.pipeline.codegen.request import CODEGEN, GeneratedBundle
from service.pipeline.rundir import SANDBOX_FILES
from service.pipeline.selection import better

# Every test reads one whole design run through Docker sandboxes.
pytestmark = pytest.mark.slow

HOSTILE_TRAIN = r'''
import argparse, json, os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

parser = argparse.ArgumentParser()
for flag in ("--data", "--out", "--config"):
    parser.add_argument(flag, required=True)
args = parser.parse_args()
data, out = Path(args.data), Path(args.out)
out.mkdir(parents=True, exist_ok=True)
inputs = {w: ad.read_h5ad(data / f"{w}_inputs.h5ad") for w in ("val", "test")}
targets = {w: [str(c) for c in inputs[w].uns["predict"]["condition"]] for w in inputs}
wanted = set(targets["val"]) | set(targets["test"])

found, scanned, names = [], [], []
for root, dirs, files in os.walk("/", onerror=lambda e: None):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    for name in files:
        path = os.path.join(root, name)
        system = path.startswith(("/opt/", "/usr/", "/lib", "/etc/"))  # the image's own packages
        if not system and ("truth" in name or name in ("val.h5ad", "split.json")):
            names.append(path)
        if not name.endswith(".h5ad"):
            continue
        scanned.append(path)
        try:
            obs = ad.read_h5ad(path, backed="r").obs
        except Exception:
            continue
        if {"condition", "is_control"} <= set(obs.columns):
            hit = set(obs.loc[~obs["is_control"].astype(bool), "condition"].astype(str)) & wanted
            if hit:
                found.append({"path": path, "conditions": sorted(hit)[:5]})
(out / "search_report.json").write_text(json.dumps(
    {"found": found, "names": names, "scanned": scanned, "wanted": len(wanted)}))

train = ad.read_h5ad(data / "train.h5ad")
X = train.X.toarray() if hasattr(train.X, "toarray") else np.asarray(train.X)
ctrl = train.obs["is_control"].astype(bool).to_numpy()
contexts = train.obs["context"].astype(str).to_numpy()
shift = X[~ctrl].mean(axis=0) - X[ctrl].mean(axis=0)
for which, file in (("val", "val_predictions.h5ad"), ("test", "predictions.h5ad")):
    p = inputs[which].uns["predict"]
    table = pd.DataFrame({k: list(p[k]) for k in ("condition", "perturbation", "dose", "context")})
    table = table.astype({"condition": str, "perturbation": str, "context": str, "dose": float})
    rows = [X[ctrl & (contexts == c)].mean(axis=0) + shift for c in table["context"]]
    pred = ad.AnnData(X=np.asarray(rows, dtype=np.float32).reshape(len(table), train.n_vars),
                      obs=table.set_index(table["condition"].to_numpy()),
                      var=pd.DataFrame(index=train.var_names.astype(str)))
    pred.write_h5ad(out / file)
(out / "model.pt").write_bytes(b"weights")
(out / "train_log.jsonl").write_text(json.dumps({"epoch": 0, "train_loss": 0.0, "val_loss": None}) + "\n")
(out / "val_metrics.json").write_text("{}")
'''


MAIN = 'if __name__ == "__main__":\n    main()\n'


def hostile_codegen(context: dict) -> GeneratedBundle:
    # The vetted train.py, config.json and model code stay (the contract tests and the plan check pass, so the
    # run is scored); only what `python train.py` runs is the hunt: what it does in the sandbox is the point.
    vetted = context["vetted_bundle"]["train.py"]
    assert vetted.endswith(MAIN)
    hunt = "def hunt() -> None:\n" + textwrap.indent(HOSTILE_TRAIN, "    ")
    return GeneratedBundle(edits=[{"path": "train.py", "search": MAIN,
                                   "replace": f'{hunt}\n\nif __name__ == "__main__":\n    hunt()\n'}])


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, docker_image):
    from service.pipeline import DesignSettings

    root = tmp_path_factory.mktemp("hostile")
    data = root / "cytokine.h5ad"
    simulate("cytokine", 0, n_cells=3000, n_genes=200).write_h5ad(data)
    settings = DesignSettings(data=data, task="Predict cytokine stimulation responses in an unseen cell type",
                              out=root / "run", image=docker_image, memory="2g", cpus=1.0, max_minutes=10,
                              max_attempts=1, max_nodes=0)
    return run_design(settings, handlers={**pipeline_handlers(), CODEGEN: hostile_codegen})


def test_validation_is_leave_one_cell_type_out(hostile_run):
    val = hostile_run.metrics["val"]
    assert val["mode"] == "cv" and val["group_by"] == "context" and val["folds"] == ["fold1", "fold2"]
    for k in (1, 2):
        split = json.loads((hostile_run.run_dir / "folds" / f"fold{k}" / "split" / "split.json").read_text())
        assert len({c.split("|")[2] for c in split["conditions"]["val"]}) == 1  # one whole cell type
    # Each fold trains on one cell type while the test model trains on two: the verdict says selection is weak.
    warnings = hostile_run.metrics["verdict"]["warnings"]
    assert any("single context while the test model trains on 2" in w for w in warnings)


def test_a_bundle_searching_for_validation_truth_finds_none(hostile_run):
    runs = sorted((hostile_run.run_dir / "attempts" / "01" / "runs").iterdir())
    assert [r.name for r in runs] == ["fold1", "fold2", "main"]
    for run in runs:
        assert json.loads((run / "outcome.json").read_text())["data_listing"] == sorted(SANDBOX_FILES)
        report = json.loads((run / "out" / "search_report.json").read_text())
        assert report["wanted"] > 0 and {f"/data/{n}" for n in SANDBOX_FILES} <= set(report["scanned"])
        assert report["found"] == [], run.name  # no readable file holds a cell of a condition to predict
        assert report["names"] == [], run.name  # nor any truth file, old val.h5ad or split.json


def test_a_losing_model_delivers_the_winner_with_checked_code(hostile_run):
    metrics = hostile_run.metrics
    verdict, delivered = metrics["verdict"], metrics["delivered"]
    assert hostile_run.status == "validated" and verdict["beats_baselines"] is False
    assert delivered["kind"] in ("baseline", "stack") and verdict["delivered"] == delivered["key"]
    primary = metrics["primary_metric"]
    candidates = metrics["val"]["candidates"]
    assert not any(better(primary, s[primary], candidates[delivered["key"]][primary]) for s in candidates.values())
    code = hostile_run.run_dir / "code"
    config = json.loads((code / "config.json").read_text())
    assert config["kind"] == delivered["kind"] and (code / "cellforge_baselines" / "baselines.py").is_file()
    if delivered["kind"] == "baseline":
        assert config["weights"] == {delivered["name"]: 1.0}
    else:
        assert config["weights"] == {k: v for k, v in delivered["weights"].items() if v > 0}
    check = delivered["code_check"]
    assert check["ran"] and check["matches"] and check["max_abs_diff"] <= 1e-3, check


def test_the_loss_is_stated_in_cli_json_metrics_and_report(hostile_run, capsys):
    from service.cli.design_cmd import _finish

    _finish(hostile_run, json_out=True)
    printed = capsys.readouterr()
    # --json: the verdict leads what a person reads (stderr); stdout is one JSON document for scripts.
    assert printed.err.lstrip().startswith("verdict:") and "does NOT beat the best baseline" in printed.err
    summary = json.loads(printed.out)
    assert summary["verdict"]["beats_baselines"] is False and summary["status"] == "validated"
    assert summary["delivered"]["kind"] in ("baseline", "stack")
    on_disk = json.loads((hostile_run.run_dir / "metrics.json").read_text())
    assert on_disk["verdict"] == summary["verdict"]
    page = (hostile_run.run_dir / "report.html").read_text()
    assert "Verdict: does not beat the best baseline" in page and "does NOT beat" in page
