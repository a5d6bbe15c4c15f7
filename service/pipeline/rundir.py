"""The run directory: where every artefact of a design run lives, by name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

SANDBOX_FILES = ("train.h5ad", "val.h5ad", "test_inputs.h5ad")


class RunDir:
    """Paths of one run: task_analysis.json, discussion/, plan.json, code/, attempts/N/, split/,
    sandbox_data/ (what /data shows), model.pt, predictions.h5ad, metrics.json, llm_calls.jsonl,
    report.html, run.json (the arguments, for replay)."""

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
        """A folder holding only the three files a sandbox may see (hard links to the split's files,
        copies across file systems); the split folder itself, with test_truth.h5ad, is never mounted."""
        target = self.sandbox_data
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for name in SANDBOX_FILES:
            try:
                os.link(self.split / name, target / name)
            except OSError:
                shutil.copy2(self.split / name, target / name)
        return target
