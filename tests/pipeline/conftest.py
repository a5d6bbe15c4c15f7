"""Fixtures of the pipeline tests: a small simulated knockout screen and one offline design run in Docker."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.data import simulate
from service.pipeline import DesignResult, DesignSettings, run_design

TASK = "Predict expression after CRISPR knockout of unseen genes"


@pytest.fixture(scope="session")
def knockout_data(tmp_path_factory) -> Path:
    """21 knocked-down genes in 3 cell types: with val_fraction 0.25, five whole genes (15 conditions) are
    held out for validation, enough to decide without cross-validation (one sandbox run per node)."""
    path = tmp_path_factory.mktemp("data") / "knockout.h5ad"
    simulate("knockout", 0, n_cells=6000, n_genes=300, n_perturbations=40).write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def design_settings(knockout_data, docker_image):
    """Settings of a small, quick design run; override fields per test."""
    def make(out: Path, **overrides) -> DesignSettings:
        values = dict(data=knockout_data, task=TASK, out=out, image=docker_image, memory="2g", cpus=1.0,
                      max_minutes=8, max_attempts=3, max_nodes=0, val_fraction=0.25)
        values.update(overrides)
        return DesignSettings(**values)
    return make


@pytest.fixture(scope="session")
def offline_run(design_settings, tmp_path_factory) -> DesignResult:
    """One draft, then one improve step of the search."""
    events = []
    result = run_design(design_settings(tmp_path_factory.mktemp("runs") / "offline", max_nodes=1, max_minutes=15),
                        on_progress=events.append)
    result.events = events
    return result


@pytest.fixture(scope="session")
def knockout_plan(tmp_path_factory):
    """The offline discussion's plan for a knockout screen's profile (no data, no sandbox)."""
    from agent_profiles import KNOCKOUT
    from service.agents import analyse_task, run_discussion
    from service.llm import OfflineBackend
    from service.pipeline import pipeline_handlers

    llm = OfflineBackend(pipeline_handlers())
    analysis = analyse_task(KNOCKOUT, "Predict unseen CRISPR knockouts", llm)
    return run_discussion(analysis, KNOCKOUT, llm, tmp_path_factory.mktemp("plan")).plan


@pytest.fixture(scope="session")
def knockout_bundle(knockout_plan, tmp_path_factory):
    """`knockout_bundle(epochs)`: the folder of the knockout plan's rendered bundle, set to train for
    `epochs` (each value rendered once per session; the shared plan itself is left as it is)."""
    from service.pipeline import render_bundle

    folders: dict[int, Path] = {}

    def bundle(epochs: int) -> Path:
        if epochs not in folders:
            plan = knockout_plan.model_copy(deep=True)
            plan.training.epochs = epochs
            folders[epochs] = render_bundle(plan).write(tmp_path_factory.mktemp(f"knockout_code_{epochs}"))
        return folders[epochs]

    return bundle
