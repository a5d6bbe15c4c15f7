"""report.html: the verdict first (does the designed model beat the best baseline, what is delivered),
then the test metrics against every baseline, the validation competition, the search tree (SVG, the kept
path highlighted), the plan and discussion summary, training curves and predicted-vs-true Δ plots as
embedded PNGs (matplotlib Agg). Self-contained."""

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
from service.data.load import read_h5ad  # noqa: E402
from service.pipeline.codegen.manifest import CHOICES, CONFIG_FIELDS, implemented, plan_value  # noqa: E402
from service.pipeline.rundir import RunDir  # noqa: E402
from service.pipeline.search import SearchTree  # noqa: E402
from service.pipeline.verdict import STATUS_MEANING, Verdict, verdict_lines  # noqa: E402

TABLE_METRICS = ("pearson_delta_pert", "mse_top20_de", "pearson_delta", "mse", "direction_acc_top20_de")
STATUS_COLOUR = {"kept": "#2e7d32", "discarded": "#9e9e9e", "buggy": "#c62828", "rejected": "#ef6c00"}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
    return float(value) if ok else None


def _curves(train_log: Path) -> str:
    """The training curve from train_log.jsonl as generated code wrote it: lines that are not JSON
    objects, rows without `epoch` (their position stands in) or without `val_loss` are read as far as
    they go, never a reason to fail the report."""
    if not train_log.is_file():
        return "<p>No training log.</p>"
    rows = []
    for line in train_log.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rows = [r for r in rows if isinstance(r, dict) and r.get("phase", "select") == "select"
            and _number(r.get("train_loss")) is not None]
    if not rows:
        return "<p>The delivered predictor has no training loop (closed form).</p>"
    epochs = [_number(r.get("epoch")) for r in rows]
    x = [e if e is not None else float(i) for i, e in enumerate(epochs)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, [float(r["train_loss"]) for r in rows], label="train")
    stop = [(xi, _number(r.get("val_loss"))) for xi, r in zip(x, rows, strict=True)
            if _number(r.get("val_loss")) is not None]
    if stop:
        ax.plot(*zip(*stop, strict=True), label="held-out training groups (early stopping)")
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
    # The delivered predictions may be generated code's output: read through the checked opener, as the split is.
    pred, truth, inputs = (read_h5ad(p, backed=False) for p in
                           (rd.predictions, rd.split / "test_truth.h5ad", rd.split / "test_inputs.h5ad"))
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


def _cell(value: Any) -> str:
    return f"<td>{value:.4f}</td>" if isinstance(value, (int, float)) and value == value else "<td></td>"


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows: dict[str, dict[str, float]] = {}
    if "model" in metrics:
        rows["designed model"] = metrics["model"]
    delivered = metrics.get("delivered") or {}
    if delivered and delivered.get("kind") != "designed":
        rows[f"delivered: {delivered['key']}"] = delivered.get("test", {})
    rows.update(metrics.get("baselines", {}))
    if not rows:
        return "<p>Nothing was scored; see attempts/.</p>"
    head = "".join(f"<th>{m}</th>" for m in TABLE_METRICS)
    body = "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(_cell(s.get(m)) for m in TABLE_METRICS) + "</tr>"
                   for name, s in rows.items())
    ceiling = metrics.get("ceiling", {})
    body += "<tr><td><i>data ceiling</i></td>" + "".join(_cell(ceiling.get(m)) for m in TABLE_METRICS) + "</tr>"
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _validation_table(metrics: dict[str, Any]) -> str:
    val = metrics.get("val") or {}
    candidates = val.get("candidates") or {}
    if not candidates:
        return "<p>No validation scores.</p>"
    names = list(next(iter(candidates.values())))
    delivered = (metrics.get("delivered") or {}).get("key")
    head = "".join(f"<th>{html.escape(m)}</th>" for m in names)
    bold = ' style="font-weight:bold"'
    body = "".join(
        f"<tr{bold if key == delivered else ''}><td>{html.escape(key)}{' (delivered)' if key == delivered else ''}"
        "</td>" + "".join(_cell(scores.get(m)) for m in names) + "</tr>" for key, scores in candidates.items())
    return (f"<p>{html.escape(val.get('description', ''))}; best first.</p>"
            f"<table><tr><th>candidate</th>{head}</tr>{body}</table>")


def search_svg(tree: dict[str, Any]) -> str:
    """The search tree as inline SVG: one box per node (id, change, validation score, status colour),
    edges to parents, the kept path (root to the best node) drawn thick."""
    nodes = tree.get("nodes") or []
    if not nodes:
        return "<p>No search node ran.</p>"
    children: dict[Any, list[dict]] = {}
    for node in nodes:
        children.setdefault(node["parent"], []).append(node)
    position: dict[int, tuple[float, int]] = {}
    column = [0]

    def place(node: dict, depth: int) -> float:
        kids = children.get(node["id"], [])
        if kids:
            xs = [place(k, depth + 1) for k in kids]
            x = sum(xs) / len(xs)
        else:
            x = column[0]
            column[0] += 1
        position[node["id"]] = (x, depth)
        return x

    for root in children.get(None, []):
        place(root, 0)
    width, height, box_w, box_h = 170, 70, 158, 46
    kept = set(tree.get("kept_path") or [])
    parts = []
    for node in nodes:
        if node["parent"] is not None and node["parent"] in position:
            (x1, y1), (x2, y2) = position[node["parent"]], position[node["id"]]
            thick = node["id"] in kept and node["parent"] in kept
            parts.append(f'<line x1="{x1 * width + box_w / 2 + 5}" y1="{y1 * height + box_h + 5}" '
                         f'x2="{x2 * width + box_w / 2 + 5}" y2="{y2 * height + 5}" stroke="#555" '
                         f'stroke-width="{4 if thick else 1}"/>')
    for node in nodes:
        x, y = position.get(node["id"], (0, 0))
        score = (node.get("val") or {}).get("primary")
        colour = STATUS_COLOUR.get(node["status"], "#9e9e9e")
        label = html.escape(str(node["label"])[:18])
        text = f"{score:.4f}" if isinstance(score, (int, float)) else node["status"]
        parts.append(
            f'<g><rect x="{x * width + 5}" y="{y * height + 5}" width="{box_w}" height="{box_h}" rx="6" '
            f'fill="white" stroke="{colour}" stroke-width="{4 if node["id"] in kept else 2}"/>'
            f'<text x="{x * width + 12}" y="{y * height + 22}" font-size="11">#{node["id"]} {node["kind"]}: '
            f'{label}</text><text x="{x * width + 12}" y="{y * height + 40}" font-size="11" fill="{colour}">'
            f'{html.escape(text)} ({node["status"]})</text><title>{html.escape(json.dumps(node.get("change")))[:600]}'
            f'</title></g>')
    w = max(1, column[0]) * width + 10
    h = (max(d for _, d in position.values()) + 1) * height + 10 if position else height
    legend = " ".join(f'<span style="color:{c}">■ {s}</span>' for s, c in STATUS_COLOUR.items())
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="search-tree">'
            f'{"".join(parts)}</svg><p>{legend}; thick: the kept path to the best designed node '
            f'(#{tree.get("best")}); primary metric {html.escape(str(tree.get("primary_metric")))}.</p>')


def _nodes(tree: dict[str, Any]) -> str:
    items = []
    for n in tree.get("nodes") or []:
        score = (n.get("val") or {}).get("primary")
        state = f"{score:.4f}" if isinstance(score, (int, float)) else (n.get("failure") or "not run")
        patch = f"; <b>{html.escape(n['patch_error'])}</b>" if n.get("patch_error") else ""
        items.append(f"<li>#{n['id']} {n['kind']} <b>{html.escape(n['label'])}</b> (parent {n['parent']}, "
                     f"{n['seconds']:.0f}s): {html.escape(str(state))} — {n['status']}{patch}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def _verdict_box(metrics: dict[str, Any]) -> str:
    if "verdict" not in metrics:
        return ""
    verdict = Verdict.model_validate(metrics["verdict"])
    colour = "#2e7d32" if verdict.beats_baselines else "#c62828"
    lines = verdict_lines(verdict)
    body = "".join(f"<li>{html.escape(line)}</li>" for line in lines[1:])
    return (f'<div class="verdict" style="border:3px solid {colour};padding:8px 14px;margin:1em 0">'
            f'<h2 style="margin:0.2em 0">Verdict: {"beats" if verdict.beats_baselines else "does not beat"} the '
            f'best baseline</h2><p><b>{html.escape(lines[0])}</b></p><ul>{body}</ul>'
            f'<p>Status <b>{html.escape(verdict.status)}</b> ({STATUS_MEANING.get(verdict.status, "")}); '
            f'beats_baselines = <b>{str(verdict.beats_baselines).lower()}</b>.</p></div>')


def _what_ran(plan: Plan, tree: SearchTree) -> str:
    """The plan fields the best node's code declares it implements, beside the plan's values."""
    best = tree.best()
    if best is None:
        return "<p>No designed model ran to the end.</p>"
    declared = implemented(best.bundle.files)
    if not declared:
        return "<p>The code declares no plan fields (no <code>implements</code> block in config.json).</p>"
    rows = "".join(f"<tr><td>{html.escape(path)}</td><td>{html.escape(str(plan_value(plan, path)))}</td>"
                   f"<td>{html.escape(str(declared.get(path, '—')))}</td></tr>"
                   for path in (*CHOICES, *CONFIG_FIELDS))
    return (f"<p>Node #{best.id}'s config.json declares what its code implements; the service checked it "
            f"against the plan.</p><table><tr><th>plan field</th><th>plan</th><th>code</th></tr>{rows}</table>")


def write_report(rd: RunDir, plan: Plan, analysis: TaskAnalysis, discussion: DiscussionResult,
                 metrics: dict[str, Any], tree: SearchTree) -> Path:
    a = plan.architecture
    provenance = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v.expert)} (round {v.round}) — "
                         f"{html.escape(v.summary[:200])}</li>" for k, v in sorted(plan.provenance.items()))
    rounds = "".join(f"<li>round {r.round}: consensus={r.consensus}; changes: "
                     f"{html.escape('; '.join(r.changes) or 'none')}</li>" for r in discussion.rounds)
    journal = tree.to_json((metrics.get("delivered") or {}).get("key"))
    check = (metrics.get("delivered") or {}).get("code_check") or {}
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>CellForge design report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>CellForge design report</h1>
{_verdict_box(metrics)}
<p>Primary metric {html.escape(str(metrics.get('primary_metric')))}; search nodes: {metrics.get('attempts')};
best designed node: {metrics.get('chosen_attempt')}; delivered code checked in a sandbox:
{html.escape(json.dumps({k: v for k, v in check.items() if k != 'out'}))}.</p>
<h2>Metrics on the test split</h2>{_metrics_table(metrics)}
<h2>Validation: every candidate</h2>{_validation_table(metrics)}
<h2>Design search</h2>{search_svg(journal)}{_nodes(journal)}
<h2>Task</h2><p>{html.escape(analysis.problem_definition)}</p>
<p>Kind {analysis.perturbation_kind}; split {analysis.split_scheme}; cited:
{html.escape(', '.join(c.card_id for c in analysis.cited_cards))}</p>
<h2>Plan</h2><p>{html.escape(a.perturbation_encoder)} encoder (dim {a.embedding_dim}),
base {html.escape(a.base_predictor)},
residual MLP {a.depth}×{a.hidden_width}, dropout {a.dropout}; loss {html.escape(plan.loss.kind)};
{html.escape(plan.training.optimizer)} lr {plan.training.lr:g}, {plan.training.epochs} epochs.</p>
<h3>What ran</h3>{_what_ran(plan, tree)}
<h3>Discussion</h3><ul>{rounds}</ul><h3>Which argument set which choice</h3><ul>{provenance}</ul>
<h2>Training curve (delivered predictor)</h2>{_curves(rd.train_log)}
<h2>Predicted vs true Δ (top-20 DE genes, delivered predictions)</h2>{_delta_plots(rd)}
</body></html>"""
    rd.report.write_text(page)
    return rd.report
