"""The Plan schema rejects invalid values at the boundary, with messages naming the field."""

from typing import get_args

import pytest
from pydantic import ValidationError

from service.agents import Plan, PlanFieldError, TaskAnalysis, analyse_task, run_discussion
from service.agents.plan import SplitScheme, plan_field_paths, validate_field_value
from service.data.splits import SCHEMES

from agent_profiles import KNOCKOUT, TASKS


@pytest.fixture(scope="module")
def plan_dict(tmp_path_factory) -> dict:
    from service.agents import handlers
    from service.llm import OfflineBackend

    llm = OfflineBackend(handlers())
    analysis = analyse_task(KNOCKOUT, TASKS["knockout"][1], llm)
    return run_discussion(analysis, KNOCKOUT, llm, tmp_path_factory.mktemp("run")).plan.model_dump()


def _with(plan: dict, path: str, value) -> dict:
    section, _, name = path.partition(".")
    return {**plan, section: {**plan[section], name: value}}


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("architecture.dropout", 0.95, "less than or equal to 0.8"),
        ("architecture.hidden_width", 3, "greater than or equal to 8"),
        ("architecture.perturbation_encoder", "transformer", "perturbation_encoder"),
        ("training.lr", 0.0, "greater than 0"),
        ("training.optimizer", "lion", "optimizer"),
        ("loss.kind", "l1", "kind"),
        ("evaluation.split_scheme", "random", "split_scheme"),
        ("preprocessing.modalities", [], "at least 1"),
    ],
)
def test_out_of_range_or_unknown_values_are_rejected(plan_dict, path, value, message):
    with pytest.raises(ValidationError, match=message):
        Plan.model_validate(_with(plan_dict, path, value))
    with pytest.raises(PlanFieldError, match=path.replace(".", r"\.")):
        validate_field_value(path, value)


def test_cross_field_rules(plan_dict):
    with pytest.raises(ValidationError, match="needs combo_aggregation"):
        Plan.model_validate(_with(plan_dict, "architecture.perturbation_encoder", "gene_set"))
    drug = _with(plan_dict, "architecture.perturbation_encoder", "drug_onehot_dose")
    with pytest.raises(ValidationError, match="needs dose_encoding"):
        Plan.model_validate(_with(drug, "architecture.gene_embedding_source", None))
    with pytest.raises(ValidationError, match="pearson_weight must be 0"):
        Plan.model_validate(_with(_with(plan_dict, "loss.kind", "mse"), "loss.pearson_weight", 0.5))
    with pytest.raises(ValidationError, match="primary_metric 'r2_delta' is not among"):
        Plan.model_validate(_with(_with(plan_dict, "evaluation.metrics", ["mse"]), "evaluation.primary_metric",
                                  "r2_delta"))
    with pytest.raises(ValidationError, match="chemical perturbation needs a drug_"):
        Plan.model_validate({**plan_dict, "perturbation_kind": "chemical"})


def test_unknown_fields_and_provenance_keys_are_rejected(plan_dict):
    with pytest.raises(ValidationError, match="extra"):
        Plan.model_validate({**plan_dict, "architecture": {**plan_dict["architecture"], "heads": 8}})
    bad_ref = {"round": 1, "expert": "critic", "message_id": "m", "summary": "s"}
    with pytest.raises(ValidationError, match="names no plan field"):
        Plan.model_validate({**plan_dict, "provenance": {"architecture.heads": bad_ref}})
    with pytest.raises(PlanFieldError, match="unknown plan field 'loss.focal'"):
        validate_field_value("loss.focal", 1.0)


def test_valid_plan_round_trips_through_json(plan_dict):
    plan = Plan.model_validate(plan_dict)
    assert Plan.model_validate_json(plan.model_dump_json()) == plan
    assert set(plan_field_paths()) == set(plan.provenance)


def test_split_schemes_are_the_data_layers():
    assert set(get_args(SplitScheme)) == set(SCHEMES)


def test_task_analysis_rejects_unknown_metric():
    with pytest.raises(ValidationError, match="metrics"):
        TaskAnalysis.model_validate({"metrics": ["accuracy"]})
