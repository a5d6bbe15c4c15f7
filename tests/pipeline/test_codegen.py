"""Code generation from plans of different kinds, and the candidate plans."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from service.agents import ProfileFacts, analyse_task, run_discussion
from service.llm import OfflineBackend
from service.pipeline import config_from_plan, pipeline_handlers, render_bundle
from service.pipeline.candidates import candidate_plans

_BASE = dict(modalities=["rna_counts"], n_cells=20000, n_genes=2000, n_perturbations=120, n_conditions=120,
             n_control_cells=3000, cells_per_condition_median=150.0, cells_per_condition_min=40.0, n_contexts=1,
             n_doses=0, n_combos=0, de_top20_fraction=0.4)
FACTS = {
    "knockout": (dict(perturbation_kind="genetic", target_genes_measured_fraction=0.97,
                      recommended_split="unseen-perturbation"), "Predict unseen CRISPR knockouts"),
    "drug": (dict(perturbation_kind="chemical", n_perturbations=30, n_conditions=360, n_doses=4, n_contexts=3,
                  recommended_split="unseen-drug"), "Predict responses to unseen drugs at several doses"),
    # The data profile reports the share of annotated drug targets that are measured genes.
    "annotated_drug": (dict(perturbation_kind="chemical", n_perturbations=30, n_conditions=360, n_doses=4,
                            n_contexts=3, target_genes_measured_fraction=0.9, recommended_split="unseen-drug"),
                       "Predict responses to unseen drugs at several doses"),
}


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = {}
    for name, (overrides, task) in FACTS.items():
        facts = ProfileFacts.model_validate({**_BASE, **overrides})
        llm = OfflineBackend(pipeline_handlers())
        analysis = analyse_task(facts, task, llm)
        out[name] = run_discussion(analysis, facts, llm, tmp_path_factory.mktemp(name)).plan
    return out


def test_bundle_follows_the_plan_and_is_deterministic(plans):
    for plan in plans.values():
        bundle = render_bundle(plan)
        assert sorted(bundle.files) == ["components.py", "config.json", "config.py", "data.py", "model.py", "state.py",
                                        "test_model.py", "train.py"]
        assert bundle == render_bundle(plan)
        assert bundle.config() == json.loads(json.dumps(config_from_plan(plan)))
        for name, text in bundle.files.items():
            if name.endswith(".py"):
                compile(text, name, "exec")


def test_different_kinds_get_different_components(plans):
    knockout, drug = (render_bundle(plans[k]).files["components.py"] for k in ("knockout", "drug"))
    assert "gene embedding learnt from training cells" in knockout and "def dose_features" not in knockout
    assert "def dose_features" in drug and "Drug identity × dose" in drug
    assert "class SelfEffect" in knockout  # every bundle carries the knock-down term class...
    assert render_bundle(plans["knockout"]).config()["self_knockdown"] is True  # ...only genetic plans use it
    assert render_bundle(plans["drug"]).config()["self_knockdown"] is False


def test_annotated_unseen_drugs_get_the_target_encoder(plans):
    annotated, plain = plans["annotated_drug"], plans["drug"]
    assert annotated.architecture.perturbation_encoder == "drug_target_dose"
    assert plain.architecture.perturbation_encoder == "drug_embedding_dose"  # no annotations: no target encoder
    assert "drug_target_ridge" in annotated.evaluation.baselines
    assert "drug_target_ridge" not in plain.evaluation.baselines
    model = render_bundle(annotated).files["components.py"]
    assert "annotated target genes" in model and "def dose_features" in model
    assert annotated.architecture.base_predictor == "linear_ridge" and annotated.architecture.residual_delta


@pytest.mark.slow
def test_target_encoder_bundle_passes_its_own_tests(plans, tmp_path):
    """The generated test suite of the annotated-drug bundle (a small split with target annotations:
    shapes, forward pass, one-batch overfit, a short training run) passes on the host."""
    plan = plans["annotated_drug"].model_copy(deep=True)
    plan.training.epochs = 3
    code = render_bundle(plan).write(tmp_path / "code")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_model.py"],
                          cwd=code, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_candidate_plans_are_valid_distinct_variants(plans):
    for plan in plans.values():
        candidates = candidate_plans(plan, 5)
        assert candidates[0] == ("discussion plan", plan) and len(candidates) == 5
        rendered = {render_bundle(p).files["config.json"] + render_bundle(p).files["components.py"] for _, p in candidates}
        assert len(rendered) == 5
    assert candidate_plans(plans["knockout"], 1) == [("discussion plan", plans["knockout"])]
