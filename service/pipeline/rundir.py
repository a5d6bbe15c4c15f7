"""The run directory: where every artefact of a design run lives, by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.data.sandbox_data import write_sandbox_data
from service.data.splits import MODEL_FILES

SANDBOX_FILES = MODEL_FILES  # training cells and the val/test inputs: never a truth file


def link_model_files(split_dir: Path, target: Path) -> Path:
    """The folder a sandbox mounts at /data: the model files of a split folder (hard links, copies across
    file systems), a bounded sample of the training cells plus their pseudobulks for a large split
    (`service.data.sandbox_data`). The split folder itself, with the truth, is never mounted."""
    return write_sandbox_data(split_dir, target)


class RunDir:
    """Paths of one run: task_analysis.json, discussion/, plan.json, code/, attempts/N/ (one per search
    node), search.json (the search tree), split/, folds/ (cross-validation folds), sandbox_data/ (what
    /data shows), model.pt, predictions.h5ad, metrics.json, llm_calls.jsonl, report.html, run.json (the
    arguments, for replay)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def create(self) -> RunDir:
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def task_analysis(self) -> Path:
        return self.root / "task_analysis.json"

    @property
    def profile(self) -> Path:
        return self.root / "profile.json"

    @property
    def discussion(self) -> Path:
        return self.root / "discussion"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def split(self) -> Path:
        return self.root / "split"

    @property
    def sandbox_data(self) -> Path:
        return self.root / "sandbox_data"

    @property
    def folds(self) -> Path:
        return self.root / "folds"

    @property
    def search(self) -> Path:
        return self.root / "search.json"

    @property
    def code(self) -> Path:
        return self.root / "code"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts"

    @property
    def weights(self) -> Path:
        return self.root / "model.pt"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.h5ad"

    @property
    def val_predictions(self) -> Path:
        return self.root / "val_predictions.h5ad"

    @property
    def train_log(self) -> Path:
        return self.root / "train_log.jsonl"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def llm_calls(self) -> Path:
        return self.root / "llm_calls.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    def attempt(self, n: int) -> Path:
        path = self.attempts / f"{n:02d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_json(self, path: Path, value: Any) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str) + "\n")
        return path

    def prepare_sandbox_data(self) -> Path:
        """`sandbox_data/`: the split's model files only; the split folder, with the truth, is never mounted."""
        return link_model_files(self.split, self.sandbox_data)
