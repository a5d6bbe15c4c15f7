"""The plan ↔ code check: generated code declares in config.json which plan fields it implements, the
service checks the declaration against the plan, the report shows what ran; a training log without
`val_loss` is read as far as it goes."""

from __future__ import annotations

import json

import pytest

from service.agents import ProfileFacts, analyse_task, run_discussion
from service.llm import OfflineBackend
from service.pipeline import Bundle, pipeline_handlers, render_bundle
from service.pipeline.candidates import candidate_plans
from service.pipeline.codegen.manifest import IMPLEMENTS, check_implements, implemented, plan_following
from service.pipeline.progress import epoch_event
from service.pipeline.report import _curves
from service.pipeline.rundir import RunDir

FACTS = dict(modalities=["rna_counts"], n_cells=20000, n_genes=2000, n_perturbations=120, n_conditions=120,
             n_control_cells=3000, cells_per_condition_median=150.0, cells_per_condition_min=40.0, n_contexts=1,
             n_doses=0, n_combos=0, de_top20_fraction=0.4, perturbation_kind="genetic",
             target_genes_measured_fraction=0.97, recommended_split="unseen-perturbation")


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    facts = ProfileFacts.model_validate(FACTS)
    llm = OfflineBackend(pipeline_handlers())
    analysis = analyse_task(facts, "Predict unseen CRISPR knockouts", llm)
    return run_discussion(analysis, facts, llm, tmp_path_factory.mktemp("plan")).plan


def _with_config(bundle: Bundle, **changes) -> Bundle:
    config = {**bundle.config(), **changes}
    return Bundle(files={**bundle.files, "config.json": json.dumps(config)})


def test_the_vetted_bundle_of_every_candidate_declares_its_plan(plan):
    for _, candidate in candidate_plans(plan, 5):
        bundle = render_bundle(candidate)
        assert check_implements(candidate, bundle.files) == []
        declared = implemented(bundle.files)
        assert declared["loss.kind"] == candidate.loss.kind and declared["training.lr"] == candidate.training.lr
        assert declared["architecture.base_predictor"] == candidate.architecture.base_predictor


def test_code_that_runs_another_loss_than_the_plan_is_a_mismatch(plan):
    vetted = render_bundle(plan)
    other = "mse" if plan.loss.kind == "mse_pearson_delta" else "mse_pearson_delta"
    loss = {**vetted.config()["loss"], "kind": other}
    problems = check_implements(plan, _with_config(vetted, loss=loss).files)
    assert problems == [f"plan loss.kind is {plan.loss.kind!r} but config.json loss.kind is {other!r}"]


def test_code_without_a_declaration_or_with_a_lying_one_is_a_mismatch(plan):
    vetted = render_bundle(plan)
    config = {k: v for k, v in vetted.config().items() if k != IMPLEMENTS}
    undeclared = check_implements(plan, {**vetted.files, "config.json": json.dumps(config)})
    assert len(undeclared) == 1 and "lacks the `implements` block" in undeclared[0]
    block = vetted.config()[IMPLEMENTS]
    lying = {"choices": {**block["choices"], "architecture.base_predictor": "none"},
             "config_keys": {**block["config_keys"], "training.lr": "learning_rate"}}
    bundle = _with_config(vetted, learning_rate=plan.training.lr, implements=lying)
    problems = check_implements(plan, bundle.files)
    if plan.architecture.base_predictor != "none":
        assert f"plan architecture.base_predictor is {plan.architecture.base_predictor!r} but the code declares " \
               "'none'" in problems
    # The declared key holds the plan's value, but no code reads it: the declaration is not what runs.
    assert "training.lr: config.json key 'learning_rate' is declared but no module of the bundle " \
           "reads it" in problems
    reads = bundle.files["train.py"] + '\nlearning_rate = json.loads(open("config.json").read())["learning_rate"]\n'
    assert not any("training.lr" in p for p in check_implements(plan, {**bundle.files, "train.py": reads}))


def test_an_unparseable_config_is_reported_not_raised(plan):
    files = {**render_bundle(plan).files, "config.json": "{ // no\n}"}
    assert check_implements(plan, files)[0].startswith("config.json is not valid JSON (line 1")


def test_config_changes_carry_the_plan_along(plan):
    bundle = _with_config(render_bundle(plan), lr=plan.training.lr / 10, ridge_lambdas=[1.0])
    followed = plan_following(plan, bundle.files, {"lr", "ridge_lambdas"})
    assert followed.training.lr == pytest.approx(plan.training.lr / 10)
    assert check_implements(followed, bundle.files) == []
    assert plan_following(plan, bundle.files, set()) == plan  # a file edit changes no plan field
    out_of_range = _with_config(render_bundle(plan), lr=1e9)
    assert plan_following(plan, out_of_range.files, {"lr"}) == plan  # stays; the check reports it


def test_a_training_log_without_val_loss_or_epoch_still_makes_a_curve(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join([json.dumps({"train_loss": 1.0}), json.dumps({"step": 2, "train_loss": 0.5}),
                              "not json", json.dumps([1, 2]), json.dumps({"epoch": 3, "train_loss": "nan?"})]))
    assert _curves(RunDir(tmp_path)).startswith("<img")
    assert epoch_event("epoch=3 train_loss=0.5 val_loss=None", 1) is None
    assert epoch_event("epoch=3 train_loss=0.5 val_loss=0.25", 1).val_loss == 0.25
