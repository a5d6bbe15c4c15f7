"""`cellforge.design`: the whole design pipeline on an AnnData or an .h5ad file, and what a run hands back."""

from __future__ import annotations

import html
import json
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import pandas as pd

from .predictions import user_predictions

if TYPE_CHECKING:
    from service.llm import LLMConfig
    from service.pipeline import ProgressEvent

INPUT_FILE = "input.h5ad"  # an in-memory AnnData, written into the run directory (replayable from there)
# Options named as the command line names them, where DesignSettings' name differs.
ALIASES = {"context": "held_out_context"}
# The metrics of the `metrics` table, in this order when present.
TABLE_METRICS = ("pearson_delta_pert", "mse_top20_de", "pearson_delta", "mse", "pearson_delta_top20_de", "r2_delta",
                 "discrimination_l1", "de_overlap")


@dataclass(frozen=True)
class Report:
    """The run's report.html: a link in Jupyter, a path everywhere (`os.fspath(run.report)`)."""

    path: Path

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def _repr_html_(self) -> str:
        uri = self.path.resolve().as_uri()
        return (f'<a href="{html.escape(uri)}" target="_blank">{html.escape(self.path.name)}</a> '
                f"<code>{html.escape(str(self.path))}</code>")

    def open(self) -> bool:
        """Open the report in the default browser."""
        return webbrowser.open(self.path.resolve().as_uri())


@dataclass
class DesignRun:
    """One finished design run: its directory and what it found."""

    run_dir: Path
    status: str  # "validated" (a designed model trained and validated) or "failed"
    record: dict[str, Any] = field(repr=False)  # metrics.json as written
    data: ad.AnnData | Path = field(repr=False)

    @property
    def verdict(self) -> dict[str, Any]:
        """Does the designed model beat the best baseline, by how much, what was delivered and why."""
        return self.record.get("verdict") or {}

    @property
    def report(self) -> Report:
        return Report(self.run_dir / "report.html")

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Test scores, one row per predictor: the designed model, the delivered predictor (when another),
        every baseline and the data ceiling; columns are metrics."""
        rows: dict[str, dict[str, float]] = {}
        if "model" in self.record:
            rows["designed model"] = self.record["model"]
        delivered = self.record.get("delivered") or {}
        if delivered and delivered.get("kind") != "designed":
            rows[f"delivered: {delivered['key']}"] = delivered.get("test", {})
        rows.update(self.record.get("baselines", {}))
        rows["data ceiling"] = self.record.get("ceiling", {})
        table = pd.DataFrame.from_dict(rows, orient="index")
        first = [m for m in TABLE_METRICS if m in table.columns]
        return table[first + sorted(c for c in table.columns if c not in first)]

    @cached_property
    def per_condition(self) -> pd.DataFrame:
        """The designed model's test scores per condition (empty when no model trained)."""
        return pd.DataFrame(self.record.get("per_condition", []))

    @cached_property
    def predictions(self) -> ad.AnnData:
        """The delivered test predictions, one row per condition, in the data's own obs column names and
        labels; `uns["cellforge"]` holds the provenance (version, run id, task, plan, split, verdict)."""
        return user_predictions(ad.read_h5ad(self.run_dir / "predictions.h5ad"), self.data, self.run_dir)

    def _repr_html_(self) -> str:
        summary = html.escape(str(self.verdict.get("summary", "")))
        return (f"<p><b>CellForge run</b> <code>{html.escape(str(self.run_dir))}</code>: "
                f"<b>{html.escape(self.status)}</b>. {summary}</p>"
                f"{self.metrics.to_html(float_format=lambda v: f'{v:.4f}')}<p>report: {self.report._repr_html_()}</p>")


def _settings(data: Path, task: str, out: Path, options: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from service.pipeline import DesignSettings
    from service.protocol.errors import problems

    options = {ALIASES.get(k, k): v for k, v in options.items()}
    known = set(DesignSettings.model_fields) - {"data", "task", "out", "tenant"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"design() got unknown option(s) {', '.join(unknown)}; options are: "
                        f"{', '.join(sorted(known | set(ALIASES)))}")
    try:
        return DesignSettings(data=data, task=task, out=out, **options)
    except ValidationError as exc:  # in one line, without pydantic's URLs
        raise ValueError(f"design options: {problems(exc)}") from None


def _default_out(data: ad.AnnData | str | Path) -> Path:
    stem = Path(data).stem if not isinstance(data, ad.AnnData) else "anndata"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def design(data: ad.AnnData | str | Path, task: str, *, out: str | Path | None = None,
           llm: LLMConfig | dict[str, Any] | None = None, quiet: bool = False,
           on_progress: Callable[[ProgressEvent], None] | None = None, **options: Any) -> DesignRun:
    """Design, train and score a model for `data` (an AnnData or an .h5ad path) and `task` (plain words).

    `out`: the run directory (default `runs/<name>-<time>`); an in-memory AnnData is written there as
    input.h5ad. `llm`: an `LLMConfig` or its fields as a dict (default: from the environment, else the
    offline rules). `quiet`: no progress bar; `on_progress` receives every event instead.

    `options` are the command line's: perturbation_key, control, context_key (``"none"`` pools every cell),
    dose_key, split (a directory from `cellforge data split`), scheme, context (the cell type to hold
    out), sandbox (``"docker"`` or ``"local"``), memory, cpus, gpus, runtime, seed, max_attempts,
    max_minutes, candidates, max_nodes, max_genes, val_fraction, cv_folds, image.

    Raises for what stops the run itself (Docker unreachable, bad options, unusable data); a model that
    fails to train is a run with status ``"failed"``, its report explaining why.
    """
    from service.llm import LLMConfig
    from service.pipeline import run_design
    from service.pipeline.run import preflight

    run_dir = Path(out) if out is not None else _default_out(data)
    if isinstance(data, ad.AnnData):
        path = run_dir / INPUT_FILE
        settings = _settings(path, task, run_dir, options)
        preflight(settings)  # options, Docker and the image checked before the data is written
        run_dir.mkdir(parents=True, exist_ok=True)
        data.write_h5ad(path)
    else:
        path = Path(data)
        settings = _settings(path, task, run_dir, options)
    config = llm if isinstance(llm, LLMConfig) else LLMConfig.resolve(llm or {})
    if on_progress is not None or quiet:
        result = run_design(settings, config, on_progress=on_progress)
    else:
        from .progress import PhaseBar

        with PhaseBar() as bar:
            result = run_design(settings, config, on_progress=bar)
    record = json.loads((result.run_dir / "metrics.json").read_text())
    return DesignRun(result.run_dir, result.status, record, data if isinstance(data, ad.AnnData) else path)
