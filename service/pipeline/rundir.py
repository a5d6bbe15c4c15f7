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

    def __getattr__(self, name: str) -> Path:
        files = {"task_analysis": "task_analysis.json", "plan": "plan.json", "metrics": "metrics.json",
                 "predictions": "predictions.h5ad", "weights": "model.pt", "report": "report.html",
                 "run_json": "run.json", "llm_calls": "llm_calls.jsonl", "profile": "profile.json",
                 "discussion": "discussion", "code": "code", "split": "split", "sandbox_data": "sandbox_data",
                 "attempts": "attempts", "val_predictions": "val_predictions.h5ad", "train_log": "train_log.jsonl"}
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)

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
