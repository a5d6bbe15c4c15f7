"""report.html: the plan and discussion summary, training curves, the metrics table against baselines
and predicted-vs-true Δ plots of top DE genes, as embedded PNGs (matplotlib Agg). Self-contained."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.agents import DiscussionResult, Plan, TaskAnalysis  # noqa: E402
from service.pipeline.rundir import RunDir  # noqa: E402

TABLE_METRICS = ("pearson_delta_pert", "mse_top20_de", "pearson_delta", "mse", "direction_acc_top20_de")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _curves(train_log: Path) -> str:
    if not train_log.is_file():
        return "<p>No training log.</p>"
    rows = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax.plot(epochs, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    return _png(fig)


def _group_means(adata: ad.AnnData, key: str) -> dict[str, np.ndarray]:
    labels = adata.obs[key].astype(str).to_numpy()
    X = adata.X
    return {lab: np.asarray(X[labels == lab].mean(axis=0)).ravel() for lab in np.unique(labels)}


def _delta_plots(rd: RunDir, limit: int = 4) -> str:
    """True Δ (test truth pseudobulk − context control) vs predicted Δ on each condition's top-20 genes."""
    if not rd.predictions.is_file():
        return "<p>No predictions.</p>"
    pred = ad.read_h5ad(rd.predictions)
    truth = ad.read_h5ad(rd.split / "test_truth.h5ad")
    inputs = ad.read_h5ad(rd.split / "test_inputs.h5ad")
    controls = _group_means(inputs[inputs.obs["is_control"].astype(bool).to_numpy()], "context")
    true_means = _group_means(truth, "condition")
    genes = list(truth.var_names)
    order = [genes.index(g) for g in pred.var_names.astype(str)]
    conditions = [c for c in pred.obs["condition"].astype(str) if c in true_means][:limit]
    if not conditions:
        return "<p>No test condition to plot.</p>"
    fig, axes = plt.subplots(1, len(conditions), figsize=(3.2 * len(conditions), 3.2), squeeze=False)
    for ax, condition in zip(axes[0], conditions, strict=False):
        row = int(np.flatnonzero(pred.obs["condition"].astype(str).to_numpy() == condition)[0])
        context = str(pred.obs["context"].iloc[row])
        true_delta = (true_means[condition] - controls[context])[order]
        pred_delta = np.asarray(pred.X[row]).ravel() - controls[context][order]
        top = np.argsort(-np.abs(true_delta))[:20]
        ax.scatter(true_delta[top], pred_delta[top], s=12)
        lim = float(np.max(np.abs(np.concatenate([true_delta[top], pred_delta[top]])))) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set_title(condition, fontsize=8)
        ax.set_xlabel("true Δ")
        ax.set_ylabel("predicted Δ")
    return _png(fig)


def _metrics_table(metrics: dict[str, Any]) -> str:
    if "model" not in metrics:
        return "<p>No model was trained; see attempts/.</p>"
    rows = {"model": metrics["model"], **metrics.get("baselines", {})}
    head = "".join(f"<th>{m}</th>" for m in TABLE_METRICS)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{scores.get(m, float('nan')):.4f}</td>"
                                                     for m in TABLE_METRICS) + "</tr>"
        for name, scores in rows.items())
    ceiling = metrics.get("ceiling", {})
    body += "<tr><td><i>data ceiling</i></td>" + "".join(
        f"<td>{ceiling[m]:.4f}</td>" if m in ceiling else "<td></td>" for m in TABLE_METRICS) + "</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _attempts(records) -> str:
    items = []
    for r in records:
        v = r.validation
        state = r.failure or ("validated" if v and v.ok else "; ".join(v.problems) if v else "not run")
        fix = f" → <b>{html.escape(r.patch.failure_class)}</b>: {html.escape(r.patch.diagnosis)}" if r.patch else ""
        items.append(f"<li>attempt {r.number} ({r.seconds:.0f}s): {html.escape(state)}{fix}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def write_report(rd: RunDir, plan: Plan, analysis: TaskAnalysis, discussion: DiscussionResult,
                 metrics: dict[str, Any], records) -> Path:
    a = plan.architecture
    provenance = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v.expert)} (round {v.round}) — "
                         f"{html.escape(v.summary[:200])}</li>" for k, v in sorted(plan.provenance.items()))
    rounds = "".join(f"<li>round {r.round}: consensus={r.consensus}; changes: "
                     f"{html.escape('; '.join(r.changes) or 'none')}</li>" for r in discussion.rounds)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>CellForge design report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>CellForge design report</h1>
<p>Status: <b>{html.escape(str(metrics.get('status')))}</b>;
primary metric {html.escape(plan.evaluation.primary_metric)};
attempts: {metrics.get('attempts')}; chosen attempt: {metrics.get('chosen_attempt')}.</p>
<h2>Task</h2><p>{html.escape(analysis.problem_definition)}</p>
<p>Kind {analysis.perturbation_kind}; split {analysis.split_scheme}; cited:
{html.escape(', '.join(c.card_id for c in analysis.cited_cards))}</p>
<h2>Plan</h2><p>{html.escape(a.perturbation_encoder)} encoder (dim {a.embedding_dim}),
base {html.escape(a.base_predictor)},
residual MLP {a.depth}×{a.hidden_width}, dropout {a.dropout}; loss {html.escape(plan.loss.kind)};
{html.escape(plan.training.optimizer)} lr {plan.training.lr:g}, {plan.training.epochs} epochs.</p>
<h3>Discussion</h3><ul>{rounds}</ul><h3>Which argument set which choice</h3><ul>{provenance}</ul>
<h2>Metrics on the test split</h2>{_metrics_table(metrics)}
<h2>Training curve</h2>{_curves(rd.train_log)}
<h2>Predicted vs true Δ (top-20 DE genes)</h2>{_delta_plots(rd)}
<h2>Attempts</h2>{_attempts(records)}
</body></html>"""
    rd.report.write_text(page)
    return rd.report
