"""report.html: failures and their cause first (out of memory → the --memory hint), then the verdict (does the
designed model beat the best baseline, what is delivered), the test metrics of every predictor (direction
arrows, best in each column starred, "—" with the reason where a metric is undefined), cell-eval's scores,
one row per test condition, predicted-vs-true Δ for the best, median and worst condition, the validation
competition, the search tree (SVG, the kept path highlighted), the training curve with the kept epoch,
plan and discussion (folded) and a metric glossary. Plots are embedded PNGs (matplotlib Agg); the page
is self-contained and has no scripts."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from service.agents import DiscussionResult, Plan, TaskAnalysis  # noqa: E402
from service.data.celleval import CORE_METRICS as CELL_EVAL_CORE  # noqa: E402
from service.data.celleval import GLOSSARY as CELL_EVAL_GLOSSARY  # noqa: E402
from service.data.celleval import LOWER_IS_BETTER as CELL_EVAL_LOWER  # noqa: E402
from service.data.load import read_h5ad  # noqa: E402
from service.data.metrics import group_means  # noqa: E402
from service.pipeline.codegen.manifest import (CHOICES, CONFIG_FIELDS, CUSTOM_FIELD, implemented,  # noqa: E402
                                               plan_value)
from service.pipeline.debugger import OUT_OF_MEMORY  # noqa: E402
from service.pipeline.rundir import RunDir  # noqa: E402
from service.pipeline.search import SearchTree  # noqa: E402
from service.pipeline.selection import LOWER_IS_BETTER, better, finite  # noqa: E402
from service.pipeline.verdict import STATUS_MEANING, Verdict, verdict_lines  # noqa: E402

TABLE_METRICS = ("pearson_delta_pert", "mse_top20_de", "pearson_delta", "mse", "direction_acc_top20_de",
                 "discrimination_l1", "de_overlap")
PER_CONDITION_METRICS = ("mse_top20_de", "pearson_delta", "de_overlap", "cell-eval mae", "cell-eval overlap_at_N")
STATUS_COLOUR = {"kept": "#2e7d32", "discarded": "#9e9e9e", "buggy": "#c62828", "rejected": "#ef6c00"}
# metric -> what it measures; the direction comes from `lower_is_better`.
GLOSSARY = {
    "pearson_delta_pert": "Pearson correlation of predicted and true change from the mean training perturbed "
                          "profile (Systema): credit only for what is specific to the perturbation",
    "pearson_delta": "Pearson correlation of predicted and true change from the context's control (Δ), all genes",
    "pearson_delta_top20_de": "the same on the 20 genes most changed by the perturbation (Welch t against control)",
    "pearson": "Pearson correlation of predicted and true mean profiles (high for any model: shared expression)",
    "mse": "mean squared error of the mean profile, all genes",
    "mse_top20_de": "mean squared error on the 20 genes most changed by the perturbation",
    "r2_delta": "share of the variance of the true Δ explained by the predicted Δ",
    "direction_acc_top20_de": "share of the top-20 changed genes whose predicted change has the right sign",
    "discrimination_l1": "how well each true profile picks out its own prediction among all (L1 distance, target "
                         "genes left out); 0.5 is chance",
    "de_overlap": "share of the truly significant genes (Wilcoxon, BH 5%) among the prediction's largest |Δ|",
    **{f"cell-eval {m}": text for m, text in CELL_EVAL_GLOSSARY.items()},
}
WHY_EMPTY = ("— : not defined for this row. A predictor of no change (the <i>control</i> baseline) has a constant "
             "Δ, so correlations of Δ and the DE ranking are undefined; a condition with fewer than 20 cells has no "
             "DE test; one condition alone cannot be discriminated.")
PLOT_RULE = ("Conditions plotted: the best, the median and the worst of the delivered predictions on the primary "
             "metric (per-condition test scores), so the plots show the range rather than a lucky pick.")


def lower_is_better(metric: str) -> bool:
    if metric.startswith("cell-eval "):
        return metric.removeprefix("cell-eval ") in CELL_EVAL_LOWER
    return metric.removeprefix("protein_") in LOWER_IS_BETTER


def _arrow(metric: str) -> str:
    return "↓" if lower_is_better(metric) else "↑"


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _log_rows(train_log: Path) -> list[dict[str, Any]]:
    """train_log.jsonl as generated code wrote it: lines that are not JSON objects, rows without `epoch`
    (their position stands in) or without `val_loss` are read as far as they go, never a reason to fail."""
    rows = []
    for line in train_log.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rows = [r for r in rows if isinstance(r, dict) and r.get("phase", "select") == "select"
            and finite(r.get("train_loss"))]
    for i, row in enumerate(rows):
        epoch = row.get("epoch")
        row["epoch"] = float(epoch) if finite(epoch) else float(i)
    return rows


def kept_epoch(root: Path, rows: list[dict[str, Any]]) -> int | None:
    """The epoch the delivered model was refit to: `best_epoch` of val_metrics.json, else the lowest
    early-stopping loss of the log."""
    stored = root / "val_metrics.json"
    if stored.is_file():
        try:
            best = json.loads(stored.read_text()).get("best_epoch")
            if isinstance(best, int):
                return best
        except (OSError, ValueError, AttributeError):
            pass
    stop = [r for r in rows if finite(r.get("val_loss"))]
    return int(min(stop, key=lambda r: r["val_loss"])["epoch"]) if stop else None


def _curves(rd: RunDir) -> str:
    if not rd.train_log.is_file():
        return "<p>No training log.</p>"
    rows = _log_rows(rd.train_log)
    if not rows:
        return "<p>The delivered predictor has no training loop (closed form).</p>"
    fig, ax = plt.subplots(figsize=(6.5, 3.5), layout="constrained")
    ax.plot([r["epoch"] for r in rows], [float(r["train_loss"]) for r in rows], label="train")
    stop = [(r["epoch"], float(r["val_loss"])) for r in rows if finite(r.get("val_loss"))]
    if stop:
        ax.plot(*zip(*stop, strict=True), label="held-out training groups (early stopping)")
    kept = kept_epoch(rd.root, rows)
    if kept is not None:
        ax.axvline(kept, color="#2e7d32", ls="--", lw=1.2, label=f"kept epoch ({kept})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    note = (f"<p>Dashed line: epoch {kept}, where the early-stopping loss was lowest; the delivered model was "
            f"refit on every training condition for that many epochs.</p>" if kept is not None else "")
    return _png(fig) + note


def plotted_conditions(rows: list[dict[str, Any]], metric: str) -> list[tuple[str, str]]:
    """(label, condition) of the best, median and worst rows on `metric` (rows without a score left out)."""
    scored = sorted((r for r in rows if finite(r.get(metric))), key=lambda r: r[metric],
                    reverse=not lower_is_better(metric))
    if not scored:
        return []
    picks = [("best", scored[0]), ("median", scored[(len(scored) - 1) // 2]), ("worst", scored[-1])]
    seen: dict[str, str] = {}
    for label, row in picks:
        seen.setdefault(row["condition"], f"{label}: {metric} {row[metric]:.3f}")
    return [(label, condition) for condition, label in seen.items()]


def delta_points(rd: RunDir, picks: list[tuple[str, str]]) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(label, condition, true Δ, predicted Δ) of each picked condition the predictions and the test truth
    hold, on its top-20 genes by |true Δ|: Δ against the context's control mean (test inputs' control cells).
    The truth and inputs are read a row chunk at a time (backed when large), and only the means the picks
    need are summed, so memory stays flat in the number of cells."""
    # The delivered predictions may be generated code's output: read through the checked opener, as the split is.
    pred = read_h5ad(rd.predictions, backed=False)  # one row per condition: small at any number of cells
    names = pred.obs["condition"].astype(str).to_numpy()
    truth, inputs = (read_h5ad(rd.split / name) for name in ("test_truth.h5ad", "test_inputs.h5ad"))
    try:
        present = set(truth.obs["condition"].astype(str))
        picks = [(label, c) for label, c in picks if c in present and c in set(names)]
        if not picks:
            return []
        rows = [int(np.flatnonzero(names == c)[0]) for _, c in picks]
        contexts = [str(pred.obs["context"].iloc[r]) for r in rows]
        true_means = group_means(truth.X, truth.obs["condition"].astype(str).to_numpy(),
                                 np.array([c for _, c in picks]))
        is_control = inputs.obs["is_control"].astype(bool).to_numpy()
        control_labels = np.where(is_control, inputs.obs["context"].astype(str).to_numpy(), "")
        groups = np.array(sorted(set(contexts)))
        control_means = group_means(inputs.X, control_labels, groups)
        controls = {c: control_means[i] for i, c in enumerate(groups)}
        position = {g: i for i, g in enumerate(truth.var_names.astype(str))}
        order = [position[g] for g in pred.var_names.astype(str)]
    finally:
        for part in (truth, inputs):
            if part.isbacked:
                part.file.close()
    points = []
    for i, ((label, condition), row, context) in enumerate(zip(picks, rows, contexts, strict=True)):
        true_delta = (true_means[i] - controls[context])[order]
        pred_delta = np.asarray(pred.X[row], dtype=np.float64).ravel() - controls[context][order]
        top = np.argsort(-np.abs(true_delta))[:20]
        points.append((label, condition, true_delta[top], pred_delta[top]))
    return points


def _delta_plots(rd: RunDir, rows: list[dict[str, Any]], metric: str) -> str:
    """True Δ (test truth pseudobulk − context control) vs predicted Δ on each plotted condition's top-20 genes."""
    if not rd.predictions.is_file():
        return "<p>No predictions.</p>"
    picks = plotted_conditions(rows, metric)
    if not picks:
        return "<p>No per-condition test scores to choose conditions by.</p>"
    points = delta_points(rd, picks)
    if not points:
        return "<p>No test condition to plot.</p>"
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 4.0), squeeze=False, layout="constrained")
    for ax, (label, condition, true_delta, pred_delta) in zip(axes[0], points, strict=True):
        ax.scatter(true_delta, pred_delta, s=14)
        lim = float(np.max(np.abs(np.concatenate([true_delta, pred_delta])))) * 1.1 or 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.set_title(f"{condition}\n{label}", fontsize=9)
        ax.set_xlabel("true Δ")
        ax.set_ylabel("predicted Δ")
    return f"<p>{PLOT_RULE}</p>" + _png(fig)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if finite(value) else "—"


def _best_in(metric: str, values: list[Any]) -> float | None:
    scores = [v for v in values if finite(v)]
    if not scores:
        return None
    return min(scores) if lower_is_better(metric) else max(scores)


def _table(rows: dict[str, dict[str, Any]], columns: list[str], extra: dict[str, dict[str, Any]] | None = None,
           first: str = "") -> str:
    """Rows × metric columns; the best value of each column (not counting `extra` rows) in bold with ★."""
    head = "".join(f'<th title="{html.escape(GLOSSARY.get(m, ""))}">{html.escape(m)} {_arrow(m)}</th>'
                   for m in columns)
    best = {m: _best_in(m, [r.get(m) for r in rows.values()]) for m in columns}

    def cell(m: str, value: Any, mark: bool) -> str:
        if not finite(value):
            return '<td class="na" title="not defined for this row">—</td>'
        top = best[m]
        if mark and len(rows) > 1 and top is not None and abs(value - top) <= 1e-12:
            return f'<td class="best">★ {value:.4f}</td>'
        return f"<td>{value:.4f}</td>"

    body = "".join(f"<tr><td class=name>{html.escape(name)}</td>" + "".join(cell(m, r.get(m), True) for m in columns)
                   + "</tr>" for name, r in rows.items())
    body += "".join(f"<tr><td class=name><i>{html.escape(name)}</i></td>"
                    + "".join(cell(m, r.get(m), False) for m in columns) + "</tr>" for name, r in (extra or {}).items())
    return f"<table><tr><th>{html.escape(first)}</th>{head}</tr>{body}</table>"


def predictor_rows(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Display name -> test summary of the designed model, the delivered predictor (when it is not the
    designed model) and every baseline."""
    rows: dict[str, dict[str, Any]] = {}
    if "model" in metrics:
        rows["designed model"] = metrics["model"]
    delivered = metrics.get("delivered") or {}
    if delivered and delivered.get("kind") != "designed":
        rows[f"delivered: {delivered['key']}"] = delivered.get("test", {})
    rows.update(metrics.get("baselines") or {})
    return rows


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = predictor_rows(metrics)
    if not rows:
        return "<p>Nothing was scored; see attempts/.</p>"
    columns = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
    ceiling = {"data ceiling": metrics.get("ceiling", {})}
    empty = any(not finite(r.get(m)) for r in rows.values() for m in columns)
    return (_table(rows, columns, ceiling, "predictor") + "<p class=note>★ best in its column (↑ higher is better, "
            "↓ lower is better); the data ceiling is what the noise of the real cells allows, not a predictor."
            + (f" {WHY_EMPTY}" if empty else "") + "</p>")


def _cell_eval_table(metrics: dict[str, Any]) -> str:
    """cell-eval's scores of the same predictions (metrics.json `cell_eval`), when the run computed them."""
    block = metrics.get("cell_eval") or {}
    scores = block.get("scores") or {}
    if block.get("error"):
        return f"<h2>cell-eval</h2><p>cell-eval could not score this run: {html.escape(block['error'])}</p>"
    if not scores:
        return ""
    rows = {name: {f"cell-eval {m}": v for m, v in s.items()} for name, s in scores.items()}
    columns = [f"cell-eval {m}" for m in ("vcc_score", *CELL_EVAL_CORE) if any(f"cell-eval {m}" in r for r in rows.values())]
    return (f"<h2>cell-eval (Virtual Cell Challenge metrics; cell-eval {html.escape(str(block.get('version')))}, "
            f"{block.get('seconds', 0):.0f} s)</h2>" + _table(rows, columns, first="predictor")
            + "<p class=note>Computed by Arc Institute's <code>cell-eval</code> on cells made from each predicted "
              "mean profile (see the glossary); <code>vcc_score</code> is its VCC profile (mae, "
              "discrimination_score_l1, overlap_at_N) against the <code>context_mean</code> baseline: 0 = no "
              "better, 1 = perfect.</p>")


def _per_condition_table(metrics: dict[str, Any]) -> str:
    """The delivered predictions per test condition, beside the best test baseline on the primary metric."""
    delivered = metrics.get("delivered") or {}
    rows = delivered.get("per_condition") or metrics.get("per_condition") or []
    if not rows:
        return "<p>No per-condition scores.</p>"
    primary = metrics.get("primary_metric") or "pearson_delta_pert"
    verdict = (metrics.get("verdict") or {}).get("metrics", {}).get(primary, {})
    best = verdict.get("best_baseline_test")
    base_rows = {r["condition"]: r for r in (metrics.get("baselines_per_condition") or {}).get(best) or []}
    columns = [m for m in dict.fromkeys((primary, *PER_CONDITION_METRICS)) if any(m in r for r in rows)]
    head = "".join(f'<th title="{html.escape(GLOSSARY.get(m, ""))}">{html.escape(m)} {_arrow(m)}</th>' for m in columns)
    if best:
        head += f"<th>{html.escape(best)}: {html.escape(primary)} {_arrow(primary)}</th><th>delivered better?</th>"
    body = []
    sign = 1.0 if lower_is_better(primary) else -1.0
    for r in sorted(rows, key=lambda r: (not finite(r.get(primary)), sign * (r.get(primary) or 0.0))):
        cells = "".join(f"<td>{_fmt(r.get(m))}</td>" for m in columns)
        if best:
            other = (base_rows.get(r["condition"]) or {}).get(primary)
            win = "—" if not (finite(other) and finite(r.get(primary))) else (
                "yes" if better(primary, r[primary], other) else "no")
            cells += f"<td>{_fmt(other)}</td><td>{win}</td>"
        body.append(f"<tr><td class=name>{html.escape(str(r['condition']))}</td><td>{r.get('n_cells', '')}</td>"
                    f"{cells}</tr>")
    subject = delivered.get("key") or "designed"
    return (f"<p>The delivered predictor ({html.escape(str(subject))}) on each test condition, best first by "
            f"{html.escape(primary)}; {len(rows)} conditions.</p><div class=wide><table><tr><th>condition</th>"
            f"<th>cells</th>{head}</tr>" + "".join(body) + f"</table></div><p class=note>{WHY_EMPTY}</p>")


def _glossary() -> str:
    items = "".join(f"<tr><td class=name><code>{html.escape(m)}</code></td><td>{_arrow(m)} "
                    f"{'lower' if lower_is_better(m) else 'higher'} is better</td><td class=text>{html.escape(text)}"
                    "</td></tr>" for m, text in GLOSSARY.items())
    return f"<table class=glossary><tr><th>metric</th><th>direction</th><th>meaning</th></tr>{items}</table>"


OOM_HINT = "out of memory at {limit}; try --memory with more (e.g. --memory {more})"


def failure_notes(metrics: dict[str, Any], tree: dict[str, Any], memory: str | None) -> list[str]:
    """Why the designed model failed or fell short, with the cause first: one line per distinct cause."""
    notes: list[str] = []
    failures = [n.get("failure") for n in tree.get("nodes") or [] if n.get("failure")]
    failures += [w for w in (metrics.get("verdict") or {}).get("warnings", []) if "did not run" in w]
    if any(OUT_OF_MEMORY.search(str(f)) for f in failures):
        notes.append(OOM_HINT.format(limit=_gb(memory), more=_more(memory)))
    for f in dict.fromkeys(str(f) for f in failures if not OUT_OF_MEMORY.search(str(f))):
        notes.append(f[:400])
    if metrics.get("status") == "failed" and not notes:
        notes.append("no designed model trained; see attempts/ for each node's logs")
    return notes


def _gb(memory: str | None) -> str:
    if not memory:
        return "the sandbox's memory limit"
    value = memory.strip().lower().rstrip("b")
    units = {"k": 1 / 1024**2, "m": 1 / 1024, "g": 1.0, "t": 1024.0}
    try:
        return f"{float(value[:-1]) * units[value[-1]]:g} GB" if value[-1] in units else f"{float(value) / 1024**3:g} GB"
    except (ValueError, IndexError):
        return memory


def _more(memory: str | None) -> str:
    gb = _gb(memory).removesuffix(" GB")
    try:
        return f"{2 * float(gb):g}g"
    except ValueError:
        return "8g"


def _failure_box(metrics: dict[str, Any], tree: dict[str, Any], memory: str | None) -> str:
    notes = failure_notes(metrics, tree, memory)
    if not notes:
        return ""
    title = "The designed model failed" if metrics.get("status") == "failed" else "Failures during the search"
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    baselines = (" The baselines below were still scored on the test split." if metrics.get("baselines") else "")
    return (f'<div class="failure"><h2>{title}</h2><ul>{items}</ul><p>{baselines.strip()}</p></div>')


def _validation_table(metrics: dict[str, Any]) -> str:
    val = metrics.get("val") or {}
    candidates = val.get("candidates") or {}
    if not candidates:
        return "<p>No validation scores.</p>"
    names = list(next(iter(candidates.values())))
    delivered = (metrics.get("delivered") or {}).get("key")
    rows = {f"{key} (delivered)" if key == delivered else key: scores for key, scores in candidates.items()}
    return f"<p>{html.escape(val.get('description', ''))}; best first.</p>" + _table(rows, names, first="candidate")


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


def _search_end(tree: dict[str, Any]) -> str:
    """Why the improve loop ended, and the steps the time budget did not start (with their projections)."""
    stopped = tree.get("stopped") or {}
    out = (f"<p class=\"note\">Search stopped ({html.escape(str(stopped.get('reason')))}): "
           f"{html.escape(str(stopped.get('detail')))}.</p>") if stopped else ""
    skipped = tree.get("skipped") or []
    if skipped:
        items = "".join(f"<li>after node #{s.get('after_node')}: {html.escape(str(s.get('detail')))}</li>"
                        for s in skipped)
        out += f"<p>Steps not started (time budget):</p><ul>{items}</ul>"
    return out


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
    components = best.plan.architecture.custom_components
    code_custom = declared.get(CUSTOM_FIELD)
    rows += (f"<tr><td>{CUSTOM_FIELD}</td><td>{html.escape(', '.join(c.name for c in components) or 'none')}</td>"
             f"<td>{html.escape(', '.join(code_custom) if code_custom else 'none' if code_custom == [] else '—')}"
             f"</td></tr>")
    custom = ""
    if components:
        items = "".join(f"<li><b>{html.escape(c.name)}</b> ({html.escape(c.role)}): {html.escape(c.description)} "
                        f"<i>Interfaces:</i> {html.escape(c.interfaces)}</li>" for c in components)
        custom = (f"<p>Components outside the vetted design space, designed by the LLM experts and implemented by "
                  f"the code generator (the contract tests, the plan check and validation accepted them):</p>"
                  f"<ul>{items}</ul>")
    return (f"<p>Node #{best.id}'s config.json declares what its code implements; the service checked it "
            f"against the plan.</p><table><tr><th>plan field</th><th>plan</th><th>code</th></tr>{rows}</table>"
            f"{custom}")


def _memory(rd: RunDir) -> str | None:
    try:
        return json.loads(rd.run_json.read_text())["settings"]["memory"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


STYLE = """body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td.name,td.text{text-align:left}td.best{font-weight:bold;background:#e8f5e9}
td.na{color:#888;text-align:center}p.note{font-size:90%;color:#555}
.failure{border:3px solid #c62828;background:#fff5f5;padding:6px 14px;margin:1em 0}
details{margin:.5em 0}img{max-width:100%}div.wide{overflow-x:auto}table.glossary td:nth-child(2){white-space:nowrap}"""


def write_report(rd: RunDir, plan: Plan, analysis: TaskAnalysis, discussion: DiscussionResult,
                 metrics: dict[str, Any], tree: SearchTree) -> Path:
    a = plan.architecture
    provenance = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v.expert)} (round {v.round}) — "
                         f"{html.escape(v.summary[:200])}</li>" for k, v in sorted(plan.provenance.items()))
    rounds = "".join(f"<li>round {r.round}: consensus={r.consensus}; changes: "
                     f"{html.escape('; '.join(r.changes) or 'none')}</li>" for r in discussion.rounds)
    journal = tree.to_json((metrics.get("delivered") or {}).get("key"))
    check = (metrics.get("delivered") or {}).get("code_check") or {}
    primary = str(metrics.get("primary_metric"))
    rows = (metrics.get("delivered") or {}).get("per_condition") or metrics.get("per_condition") or []
    best = metrics.get("chosen_attempt")
    designed = (f"best designed node: #{best}" if best is not None
                else "no designed node trained (the delivered predictor is a baseline)")
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>CellForge design report</title>
<style>{STYLE}</style></head><body>
<h1>CellForge design report</h1>
{_failure_box(metrics, journal, _memory(rd))}
{_verdict_box(metrics)}
<p>Primary metric <b>{html.escape(primary)}</b> {_arrow(primary)}; search nodes: {metrics.get('attempts')};
{designed}; delivered code checked in a sandbox:
{html.escape(json.dumps({k: v for k, v in check.items() if k != 'out'}))}.</p>
<h2>Metrics on the test split</h2>{_metrics_table(metrics)}
{_cell_eval_table(metrics)}
<h2>Per test condition</h2>{_per_condition_table(metrics)}
<h2>Predicted vs true Δ (top-20 DE genes, delivered predictions)</h2>{_delta_plots(rd, rows, primary)}
<h2>Validation: every candidate</h2>{_validation_table(metrics)}
<h2>Design search</h2>{search_svg(journal)}{_nodes(journal)}{_search_end(journal)}
<h2>Training curve (delivered predictor)</h2>{_curves(rd)}
<h2>Task</h2><p>{html.escape(analysis.problem_definition)}</p>
<p>Kind {analysis.perturbation_kind}; split {analysis.split_scheme}; cited:
{html.escape(', '.join(c.card_id for c in analysis.cited_cards))}</p>
<h2>Plan</h2><p>{html.escape(a.perturbation_encoder)} encoder (dim {a.embedding_dim}),
base {html.escape(a.base_predictor)},
residual MLP {a.depth}×{a.hidden_width}, dropout {a.dropout}; loss {html.escape(plan.loss.kind)};
{html.escape(plan.training.optimizer)} lr {plan.training.lr:g}, {plan.training.epochs} epochs.</p>
<h3>What ran</h3>{_what_ran(plan, tree)}
<details><summary>Discussion: {len(discussion.rounds)} round(s)</summary><ul>{rounds}</ul></details>
<details><summary>Which argument set which choice ({len(plan.provenance)} fields)</summary><ul>{provenance}</ul></details>
<h2>Metric glossary</h2>{_glossary()}
</body></html>"""
    rd.report.write_text(page)
    return rd.report
