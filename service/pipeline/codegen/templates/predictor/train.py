"""The delivered predictor: `python train.py --data DIR --out DIR --config config.json`.

Reads DIR/train.h5ad, DIR/val_inputs.h5ad and DIR/test_inputs.h5ad (no truth) and writes
predictions.h5ad (test conditions), val_predictions.h5ad, model.pt (the weights: with the training data
they are all a prediction needs), val_metrics.json and train_log.jsonl. Baselines have no training
loop: the log's one line says so.
"""

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cellforge_baselines.baselines import inputs_task
from model import DESIGNED, predict, train_designed


def empty_predictions(train: ad.AnnData) -> ad.AnnData:
    obs = pd.DataFrame({k: pd.Series([], dtype=t) for k, t in
                        (("condition", str), ("perturbation", str), ("dose", float), ("context", str))})
    return ad.AnnData(X=np.zeros((0, train.n_vars), np.float32), obs=obs,
                      var=pd.DataFrame(index=train.var_names.astype(str)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    started = time.time()
    config = json.loads(args.config.read_text())
    weights = {str(k): float(v) for k, v in config["weights"].items()}
    args.out.mkdir(parents=True, exist_ok=True)
    designed_out = train_designed(args.data, args.out / DESIGNED) if DESIGNED in weights else None
    for which, name in (("val", "val_predictions.h5ad"), ("test", "predictions.h5ad")):
        listed = ad.read_h5ad(args.data / f"{which}_inputs.h5ad").uns["predict"]["condition"]
        if len(listed):
            pred = predict(inputs_task(args.data, which), weights, designed_out)
        else:  # no val conditions (a cross-validated split): nothing to predict
            pred = empty_predictions(ad.read_h5ad(args.data / "train.h5ad"))
        pred.write_h5ad(args.out / name)
    torch.save({"weights": weights, "kind": config.get("kind"), "description": config.get("description")},
               args.out / "model.pt")
    (args.out / "train_log.jsonl").write_text(json.dumps(
        {"epoch": 0, "train_loss": None, "val_loss": None, "closed_form": True}) + "\n")
    (args.out / "val_metrics.json").write_text(json.dumps(
        {"weights": weights, "seconds": round(time.time() - started, 2)}, indent=1))
    print(f"done {config.get('kind')} {weights}", flush=True)


if __name__ == "__main__":
    main()
