"""Train the generated model: `python train.py --data DIR --out DIR --config config.json`.

Reads DIR/train.h5ad, DIR/val.h5ad, DIR/test_inputs.h5ad; writes predictions.h5ad (test conditions),
val_predictions.h5ad, model.pt, val_metrics.json and train_log.jsonl (one line per epoch) to --out.
Epoch 0 is the closed-form base alone; the residual network is kept only where it lowers the
stopping loss on the validation conditions, so it never makes that worse.
"""

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from model import (ConditionSet, PerturbationModel, annotate, centroid_delta, control_means, delta_loss, dense,
                   pick_device, write_h5ad)

MIN_STOP_CONDITIONS = 5  # fewer validation conditions than this cannot steer early stopping alone


def read_part(data: Path, name: str) -> ad.AnnData:
    path = data / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: expected train.h5ad, val.h5ad and test_inputs.h5ad in {data}")
    return ad.read_h5ad(path)


def targets_of(test_inputs: ad.AnnData) -> pd.DataFrame:
    predict = test_inputs.uns["predict"]
    table = pd.DataFrame({k: list(predict[k]) for k in ("condition", "perturbation", "dose", "context")})
    return annotate(table.astype({"condition": str, "perturbation": str, "context": str, "dose": float}),
                    test_inputs.uns)


def val_controls(val: ad.AnnData, train_controls: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Val controls of a context when val has any, else the training controls of that context."""
    own = control_means(val) if val.obs["is_control"].astype(bool).any() else {}
    return {**train_controls, **own}


def write_predictions(path: Path, conditions: ConditionSet, delta: np.ndarray, genes) -> None:
    obs = conditions.table.loc[:, ["condition", "perturbation", "dose", "context"]].copy()
    obs.index = obs["condition"].to_numpy()
    X = (conditions.control + delta).astype(np.float32)
    write_h5ad(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes])), path)


def cell_sample(train: ad.AnnData, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense sample of training cells with their contexts and control flags (controls always kept
    up to half the sample, so the expression input has enough of them)."""
    rng = np.random.default_rng(seed)
    is_ctrl = train.obs["is_control"].astype(bool).to_numpy()
    ctrl, other = np.flatnonzero(is_ctrl), np.flatnonzero(~is_ctrl)
    take_ctrl = rng.choice(ctrl, size=min(limit // 2, len(ctrl)), replace=False)
    take_other = rng.choice(other, size=min(limit - len(take_ctrl), len(other)), replace=False)
    pick = np.sort(np.concatenate([take_ctrl, take_other]))
    return (dense(train.X[pick]).astype(np.float64), train.obs["context"].astype(str).to_numpy()[pick],
            is_ctrl[pick])


def fit(model: PerturbationModel, train: ConditionSet, val: ConditionSet, config: dict, device: torch.device,
        log_path: Path) -> dict:
    """Train the residual network with early stopping; returns the best epoch's numbers.

    The stopping loss is taken on the validation conditions: perturbations the model never saw, like the
    test ones. Training conditions would flatter the network even when held out from its batches, since
    they shaped the encoder's response embedding and the base; only with fewer than MIN_STOP_CONDITIONS
    validation conditions is every fifth training condition held out and pooled with them."""
    rng = np.random.default_rng(int(config["seed"]))
    torch.manual_seed(int(config["seed"]))
    model.set_input_scaling(train)
    base_train = model.base.out_of_fold(train, model.features(train))
    base_val = model.base.predict(val, model.features(val))
    net = model.build_net(model.net_input(train).shape[1]).to(device)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    opt = optimizers[config["optimizer"]](net.parameters(), lr=float(config["lr"]),
                                          weight_decay=float(config["weight_decay"]))
    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
    few = len(val) < MIN_STOP_CONDITIONS and len(train) >= 10
    inner = rng.permutation(len(train))[::5] if few else np.array([], dtype=int)
    fit_rows = np.setdiff1d(np.arange(len(train)), inner)
    y_train, b_train, r_train = as_t(train.delta), as_t(base_train), as_t(centroid_delta(train, train))
    y_stop = torch.cat([as_t(val.delta), y_train[inner]])
    b_stop = torch.cat([as_t(base_val), b_train[inner]])
    r_stop = torch.cat([as_t(centroid_delta(train, val)), r_train[inner]])
    x_stop_val = as_t(model.net_input(val)) if len(val) else as_t(np.zeros((0, model.x_mean.shape[0])))

    def stop_loss(x_train: torch.Tensor) -> float:
        if not len(y_stop):
            return float("nan")
        net.eval()
        with torch.no_grad():
            x = torch.cat([x_stop_val, x_train[inner]])
            return float(delta_loss(b_stop + net(x), y_stop, config["loss"], r_stop))

    x_plain = as_t(model.net_input(train))
    best = {"epoch": 0, "val_loss": stop_loss(x_plain),
            "train_loss": float(delta_loss(b_train[fit_rows], y_train[fit_rows], config["loss"], r_train[fit_rows]))}
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with log_path.open("w") as log:
        log.write(json.dumps({"epoch": 0, "train_loss": best["train_loss"], "val_loss": best["val_loss"]}) + "\n")
        print(f"epoch=0 train_loss={best['train_loss']:.6f} val_loss={best['val_loss']:.6f}", flush=True)
        if not config["residual_delta"]:
            return best
        batch = int(config["batch_size"])
        stale = 0
        for epoch in range(1, int(config["epochs"]) + 1):
            net.train()
            x_train = as_t(model.net_input(train, rng))
            order = torch.as_tensor(rng.permutation(fit_rows), device=device)
            total = 0.0
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                loss = delta_loss(b_train[idx] + net(x_train[idx]), y_train[idx], config["loss"], r_train[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite training loss at epoch {epoch} (lr={config['lr']}, "
                        f"grad_clip={config.get('grad_clip')}): training diverged")
                opt.zero_grad()
                loss.backward()
                if config.get("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(net.parameters(), float(config["grad_clip"]))
                opt.step()
                total += float(loss.detach()) * len(idx)
            current = stop_loss(x_plain)
            line = {"epoch": epoch, "train_loss": total / len(order), "val_loss": current}
            log.write(json.dumps(line) + "\n")
            log.flush()
            print(f"epoch={epoch} train_loss={line['train_loss']:.6f} val_loss={current:.6f}", flush=True)
            if not np.isfinite(current):
                raise FloatingPointError(f"non-finite validation loss at epoch {epoch} (lr={config['lr']})")
            if current < best["val_loss"] - 1e-9:
                best = {"epoch": epoch, "val_loss": current, "train_loss": line["train_loss"]}
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                stale = 0
            else:
                stale += 1
                if stale >= int(config["early_stopping_patience"]):
                    break
    net.load_state_dict(best_state)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    started = time.time()
    config = json.loads(args.config.read_text())
    np.random.seed(int(config["seed"]))
    device = pick_device(config)
    args.out.mkdir(parents=True, exist_ok=True)

    train_cells, val_cells, test_inputs = (read_part(args.data, n) for n in
                                           ("train.h5ad", "val.h5ad", "test_inputs.h5ad"))
    genes = list(train_cells.var_names)
    controls = control_means(train_cells)
    train = ConditionSet.from_cells(train_cells, controls)
    val = ConditionSet.from_cells(val_cells, val_controls(val_cells, controls))
    test = ConditionSet(targets_of(test_inputs), {**controls, **control_means(test_inputs)})
    print(f"device={device} genes={len(genes)} train_conditions={len(train)} val_conditions={len(val)} "
          f"test_conditions={len(test)}", flush=True)

    model = PerturbationModel(config, genes)
    cells, contexts, is_control = cell_sample(train_cells, int(config["cell_sample"]), int(config["seed"]))
    model.fit_closed_form(train, val, cells, contexts, is_control)
    best = fit(model, train, val, config, device, args.out / "train_log.jsonl")

    val_delta = model.predict_delta(val, device)
    write_predictions(args.out / "val_predictions.h5ad", val, val_delta, genes)
    write_predictions(args.out / "predictions.h5ad", test, model.predict_delta(test, device), genes)
    torch.save({"config": config, "genes": genes, "state_dict": model.net.state_dict(),
                "base": model.base.chosen, "self_knockdown_fraction": getattr(model.self_effect, "fraction", None)},
               args.out / "model.pt")
    metrics = {"best_epoch": best["epoch"], "val_loss": best["val_loss"], "train_loss": best["train_loss"],
               "val_mse": float(np.mean((val_delta - val.delta) ** 2)) if len(val) else None,
               "base": model.base.chosen, "device": str(device), "seconds": round(time.time() - started, 2)}
    (args.out / "val_metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    print(f"done best_epoch={best['epoch']} val_loss={best['val_loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
