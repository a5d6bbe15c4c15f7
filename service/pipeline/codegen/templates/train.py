"""Train the generated model: `python train.py --data DIR --out DIR --config config.json`.

Reads DIR/train.h5ad, DIR/val_inputs.h5ad and DIR/test_inputs.h5ad: training cells, and for the val and
test conditions only what to predict and their contexts' control cells. No truth of a condition to
predict is there; the service scores val_predictions.h5ad and predictions.h5ad itself. For a large screen
the parts are samples of their cells and DIR/pseudobulk.h5ad gives every training condition's mean over all
of its cells: condition and control means come from it. Writes val_predictions.h5ad, predictions.h5ad,
model.pt (`PerturbationModel.load` reads it back and predicts without the training data),
val_metrics.json and train_log.jsonl (one line per epoch; one line, the closed-form base's, when no
network is trained) to --out.

Early stopping therefore holds out training conditions of its own, in whole groups as the split holds
out its test (uns["split"]["group_by"]: cell types, perturbations or doses). Phase 1 fits everything
without them and picks the number of epochs on them: epoch 0 is the closed-form base alone, and the
residual network is kept only where it lowers that stopping loss. Phase 2 refits on every training
condition for that many epochs.
"""

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from components import centroid_delta
from config import Config
from data import (ConditionSet, cell_sample, control_means, read_part, read_pseudobulk, targets_of,
                  write_h5ad)
from model import PerturbationModel, delta_loss, pick_device

STOP_FRACTION = 0.2  # share of the training groups held out to stop on
MIN_STOP_GROUPS = 3  # fewer groups than this: hold out whole perturbations instead; fewer still, no network


def group_keys(table: pd.DataFrame, group_by: str) -> np.ndarray:
    """The unit each condition is held out with: its context, its perturbation, or its perturbation and dose."""
    if group_by == "context":
        return table["context"].astype(str).to_numpy()
    if group_by == "dose":
        return (table["perturbation"].astype(str) + "@" + table["dose"].astype(str)).to_numpy()
    return table["perturbation"].astype(str).to_numpy()


def stop_rows(table: pd.DataFrame, group_by: str, seed: int) -> tuple[np.ndarray, str]:
    """Boolean mask of the training conditions held out for early stopping, and the grouping used:
    STOP_FRACTION of the groups (at least one), grouped like the split (by perturbation when the split's
    groups are too few to spare one); none when even those are too few."""
    if len(set(group_keys(table, group_by))) < MIN_STOP_GROUPS:
        group_by = "perturbation"
    keys = group_keys(table, group_by)
    groups = sorted(set(keys))
    if len(groups) < MIN_STOP_GROUPS:
        return np.zeros(len(table), dtype=bool), group_by
    rng = np.random.default_rng(seed)
    held = rng.choice(groups, size=max(1, round(STOP_FRACTION * len(groups))), replace=False)
    return np.isin(keys, held), group_by


def base_line(model: PerturbationModel, train: ConditionSet, config: Config, log) -> dict:
    """No residual network is trained: the log's one line is the closed-form base's out-of-fold loss on the
    training conditions (epoch 0, as in `train_network`), so every run's log shows what was fitted."""
    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    base = model.base.out_of_fold(train, model.features(train))
    loss = float(delta_loss(as_t(base), as_t(train.delta), config.loss, as_t(centroid_delta(train, train))))
    log.write(json.dumps({"epoch": 0, "train_loss": loss, "val_loss": None, "phase": "base"}) + "\n")
    print(f"closed-form base only: train_loss={loss:.6f}", flush=True)
    return {"epoch": 0, "train_loss": loss, "val_loss": float("nan")}


def train_network(model: PerturbationModel, train: ConditionSet, stop: ConditionSet, config: Config,
                  device: torch.device, log, epochs: int | None = None) -> dict:
    """Train the residual network on `train`. With `stop` conditions (held out of every fit), keep the epoch
    with the lowest stopping loss on them (early stopping with patience); with none, train `epochs` epochs
    (the refit). Returns the kept epoch's numbers."""
    refit = epochs is not None
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model.set_input_scaling(train)
    base_train = model.base.out_of_fold(train, model.features(train))
    net = model.build_net(model.net_input(train).shape[1]).to(device)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    opt = optimizers[config.optimizer](net.parameters(), lr=config.lr,
                                          weight_decay=config.weight_decay)
    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=device)  # noqa: E731
    y_train, b_train, r_train = as_t(train.delta), as_t(base_train), as_t(centroid_delta(train, train))
    if len(stop):
        y_stop, b_stop = as_t(stop.delta), as_t(model.base.predict(stop, model.features(stop)))
        r_stop, x_stop = as_t(centroid_delta(train, stop)), as_t(model.net_input(stop))

    def stop_loss() -> float:
        if not len(stop):
            return float("nan")
        net.eval()
        with torch.no_grad():
            return float(delta_loss(b_stop + net(x_stop), y_stop, config.loss, r_stop))

    tag = "refit_epoch" if refit else "epoch"
    best = {"epoch": 0, "val_loss": stop_loss(), "train_loss": float(delta_loss(b_train, y_train, config.loss, r_train))}
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def record(line: dict) -> None:
        finite = {k: (v if not isinstance(v, float) or np.isfinite(v) else None) for k, v in line.items()}
        log.write(json.dumps({**finite, "phase": "refit" if refit else "select"}) + "\n")
        log.flush()
        print(f"{tag}={line['epoch']} train_loss={line['train_loss']:.6f} val_loss={line['val_loss']:.6f}",
              flush=True)

    record(best)
    n_epochs = config.epochs if epochs is None else int(epochs)
    if not config.residual_delta or not (len(stop) or refit):
        return best
    batch = config.batch_size
    stale = 0
    for epoch in range(1, n_epochs + 1):
        net.train()
        x_train = as_t(model.net_input(train, rng))
        order = torch.as_tensor(rng.permutation(len(train)), device=device)
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            loss = delta_loss(b_train[idx] + net(x_train[idx]), y_train[idx], config.loss, r_train[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss at epoch {epoch} (lr={config.lr}, "
                    f"grad_clip={config.grad_clip}): training diverged")
            opt.zero_grad()
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        current = stop_loss()
        line = {"epoch": epoch, "train_loss": total / len(order), "val_loss": current}
        record(line)
        if refit:
            best, best_state = line, None
            continue
        if not np.isfinite(current):
            raise FloatingPointError(f"non-finite stopping loss at epoch {epoch} (lr={config.lr})")
        if current < best["val_loss"] - 1e-9:
            best = line
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            stale = 0
        else:
            stale += 1
            if stale >= config.early_stopping_patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    return best


def fitted_model(config: Config, genes: list[str], controls: dict[str, np.ndarray], train_cells: ad.AnnData,
                 train: ConditionSet, stop: ConditionSet, seed: int) -> PerturbationModel:
    """The closed-form part fitted on `train` (its conditions' cells only; `stop` is what it may tune on)."""
    model = PerturbationModel(config, genes, controls)
    keep = train_cells.obs["is_control"].astype(bool).to_numpy() | \
        train_cells.obs["condition"].astype(str).isin(set(train.table["condition"])).to_numpy()
    # Indices first: a view's X (`train_cells[keep].X`) would copy the matrix of every kept cell (~100k at scale).
    cells, contexts, is_control = cell_sample(train_cells, config.cell_sample, seed, rows=np.flatnonzero(keep))
    # A cross-validation fold's files say how many contexts the run's test model trains on (`run_contexts`).
    run_contexts = dict(train_cells.uns.get("split", {})).get("run_contexts")
    model.fit_closed_form(train, stop, cells, contexts, is_control,
                          run_contexts=None if run_contexts is None else int(run_contexts))
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--config", required=True, type=Path)
    args = parser.parse_args(argv)
    started = time.time()
    config = Config.load(args.config)
    np.random.seed(config.seed)
    device = pick_device(config)
    args.out.mkdir(parents=True, exist_ok=True)

    train_cells, val_inputs, test_inputs = (read_part(args.data, n) for n in
                                            ("train.h5ad", "val_inputs.h5ad", "test_inputs.h5ad"))
    genes = list(train_cells.var_names)
    bulk = read_pseudobulk(args.data)  # the parts are samples: condition and control means over all cells
    controls = control_means(train_cells, bulk)
    train = ConditionSet.from_cells(train_cells, controls, bulk)
    seed = config.seed
    group_by = dict(train_cells.uns.get("split", {})).get("group_by", "perturbation")
    held, group_by = stop_rows(train.table, group_by, seed)
    print(f"device={device} genes={len(genes)} train_conditions={len(train)} stop_conditions={int(held.sum())} "
          f"(whole {group_by} groups) val_conditions={len(val_inputs.uns['predict']['condition'])} "
          f"test_conditions={len(test_inputs.uns['predict']['condition'])}", flush=True)

    none = train.subset(np.zeros(len(train), dtype=bool))
    # The residual is applied only to contexts seen in training (`predict_delta`): when every condition asked
    # for lies in an unseen context (an unseen-cell-type task), the network would never be used, so neither
    # phase trains it.
    asked = set(targets_of(val_inputs)["context"]) | set(targets_of(test_inputs)["context"])
    network = config.residual_delta and bool(asked & set(train.table["context"]))
    if config.residual_delta and not network:
        print("residual network not trained: every condition to predict lies in a context absent from training, "
              "where only the closed-form base predicts", flush=True)
    selected = {"epoch": 0, "val_loss": float("nan"), "train_loss": float("nan")}
    with (args.out / "train_log.jsonl").open("w") as log:
        if held.any() and network:  # phase 1: how many epochs, on groups no part of the model saw
            fit_part, stop = train.subset(~held), train.subset(held)
            selected = train_network(fitted_model(config, genes, controls, train_cells, fit_part, stop, seed),
                                     fit_part, stop, config, device, log)
        # phase 2: every training condition, that many epochs
        model = fitted_model(config, genes, controls, train_cells, train, none, seed)
        final = train_network(model, train, none, config, device, log, epochs=selected["epoch"]) if network \
            else base_line(model, train, config, log)

    write_h5ad(model.predict(val_inputs), args.out / "val_predictions.h5ad")
    write_h5ad(model.predict(test_inputs), args.out / "predictions.h5ad")
    model.save(args.out / "model.pt")
    metrics = {"best_epoch": selected["epoch"], "stop_loss": selected["val_loss"], "train_loss": final["train_loss"],
               "stop_conditions": int(held.sum()), "stop_group_by": group_by, "base": model.base.chosen,
               "device": str(device), "seconds": round(time.time() - started, 2)}
    (args.out / "val_metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    print(f"done best_epoch={selected['epoch']} stop_loss={selected['val_loss']:.6f}", flush=True)


if __name__ == "__main__":
    main()
