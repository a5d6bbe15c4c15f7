"""The design search's pieces without a sandbox: the offline rules read the validation table, a change is
applied to plan and bundle, and the journal keeps a node only when validation improves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.agents import Loss, ProfileFacts, analyse_task, run_discussion
from service.llm import OfflineBackend
from service.pipeline import Change, PatchError, SearchTree, offline_improve, pipeline_handlers, render_bundle
from service.pipeline.compete import Entry, merit_against
from service.pipeline.search import Node, apply_change, improve_context, validation_table
from service.pipeline.selection import PooledScore
from service.pipeline.validate import Validation

FACTS = dict(modalities=["rna_counts"], n_cells=20000, n_genes=2000, n_perturbations=120, n_conditions=120,
             n_control_cells=3000, cells_per_condition_median=150.0, cells_per_condition_min=40.0, n_contexts=1,
             n_doses=0, n_combos=0, de_top20_fraction=0.4, perturbation_kind="genetic",
             target_genes_measured_fraction=0.97, recommended_split="unseen-perturbation")
PRIMARY = "pearson_delta_pert"
MSE = "mse_top20_de"


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    facts = ProfileFacts.model_validate(FACTS)
    llm = OfflineBackend(pipeline_handlers())
    return run_discussion(analyse_task(facts, "Predict unseen CRISPR knockouts", llm), facts, llm,
                          tmp_path_factory.mktemp("discussion")).plan


def _node(id_, plan, score, parent=None, kind="draft", ok=True) -> Node:
    node = Node(id=id_, parent=parent, kind=kind, label=f"n{id_}", candidate=1, plan=plan, bundle=render_bundle(plan))
    node.validation = Validation(ok, [], PRIMARY, score)
    return node


def _table(model: dict, baselines: dict) -> dict:
    rows = [{"condition": "a||x", PRIMARY: model[PRIMARY]}]
    return validation_table(PRIMARY, model, baselines, rows,
                            {n: [{"condition": "a||x", PRIMARY: s[PRIMARY]}] for n, s in baselines.items()}, "holdout")


def _context(plan, table, history=(), scheme="unseen-perturbation") -> dict:
    tree = SearchTree(PRIMARY, [_node(1, plan, table["model"][PRIMARY])])
    context = improve_context(tree.nodes[0], tree, table, scheme)
    context["history"] += list(history)
    return context


def test_rules_follow_the_baseline_that_beats_the_model(plan):
    plan = plan.model_copy(deep=True)
    plan.architecture.gene_embedding_source = "pca"
    plan.loss.pearson_weight = Loss.DEFAULT_PEARSON_WEIGHT  # below the cap: a Pearson step can raise it
    table = _table({PRIMARY: 0.2, "mse_top20_de": 0.5},
                   {"gene_similarity": {PRIMARY: 0.4, "mse_top20_de": 0.6}, "mean_delta": {PRIMARY: 0.0,
                                                                                         "mse_top20_de": 0.9}})
    assert table["beaten_by"][PRIMARY] == ["gene_similarity"] and table["beaten_by"]["mse_top20_de"] == []
    assert table["conditions_lost_to_best_baseline"][0]["gene_similarity"] == 0.4
    change = offline_improve(_context(plan, table))
    assert change.label == "co-expression gene embedding" and "gene_similarity" in change.rationale
    assert change.plan_updates == {"architecture.gene_embedding_source": "coexpression"}
    # Tried already: the next rule (the model loses on Pearson but not on top-DE MSE: a Pearson term).
    again = offline_improve(_context(plan, table, [{"label": change.label}]))
    assert again.label == "Pearson Δ loss term" and again.plan_updates["loss.kind"] == "mse_pearson_delta"
    assert again.plan_updates["loss.pearson_weight"] == pytest.approx(2 * plan.loss.pearson_weight)
    # At the schema's cap the term cannot grow: no step is spent proposing the plan as it is.
    capped = plan.model_copy(deep=True)
    capped.loss.kind, capped.loss.pearson_weight = "mse_pearson_delta", Loss.MAX_PEARSON_WEIGHT
    assert offline_improve(_context(capped, table, [{"label": change.label}])).label != "Pearson Δ loss term"


def test_losing_to_the_control_asks_for_regularisation(plan):
    table = _table({PRIMARY: 0.1, "mse_top20_de": 0.9}, {"control": {PRIMARY: 0.3, "mse_top20_de": 0.7}})
    labels = []
    for _ in range(4):
        change = offline_improve(_context(plan, table, [{"label": label} for label in labels]))
        labels.append(change.label)
    assert labels == ["stronger ridge regularisation", "closed-form base only", "more dropout and weight decay",
                      "heavier top-DE loss weight"]


def test_unseen_cell_type_validation_gets_no_change_to_the_network_alone(plan):
    """Validation holds out whole cell types, where the residual network is never applied: the rules propose
    only changes that reach the closed-form base (its λs, its loss, its gene embedding), then stop."""
    table = _table({PRIMARY: 0.1, "mse_top20_de": 0.9}, {"control": {PRIMARY: 0.3, "mse_top20_de": 0.7}})
    labels: list[str] = []
    while not (change := offline_improve(_context(plan, table, [{"label": x} for x in labels], "unseen-context"))).stop:
        labels.append(change.label)
    assert labels == ["stronger ridge regularisation", "heavier top-DE loss weight", "PCA gene embedding"]


def test_rules_run_out_with_a_stop(plan):
    table = _table({PRIMARY: 0.5, "mse_top20_de": 0.1}, {"mean_delta": {PRIMARY: 0.0, "mse_top20_de": 0.9}})
    labels: list[str] = []
    while True:
        change = offline_improve(_context(plan, table, [{"label": label} for label in labels]))
        if change.stop:
            break
        labels.append(change.label)
    assert labels == ["lower learning rate", "wider and deeper residual network", "longer training",
                      "PCA gene embedding"]


def test_a_change_renders_the_plan_again_and_keeps_the_parents_fixes(plan):
    bundle = render_bundle(plan)
    fixed = json.loads(bundle.files["config.json"])
    fixed["lr"] = 1e-4  # a debugger's fix
    bundle = bundle.model_copy(update={"files": {**bundle.files, "config.json": json.dumps(fixed)}})
    new_plan, new_bundle = apply_change(plan, bundle, Change(
        label="deeper", rationale="r", plan_updates={"architecture.depth": plan.architecture.depth + 1},
        config_changes={"batch_size": 16}))
    config = new_bundle.config()
    assert new_plan.architecture.depth == plan.architecture.depth + 1 == config["depth"]
    assert config["lr"] == 1e-4 and config["batch_size"] == 16
    with pytest.raises(PatchError, match="no field"):
        apply_change(plan, bundle, Change(label="x", rationale="r", plan_updates={"architecture.wings": 2}))
    with pytest.raises(PatchError, match="rejected"):
        apply_change(plan, bundle, Change(label="x", rationale="r", plan_updates={"architecture.depth": 99}))


def test_the_journal_keeps_a_node_only_when_validation_improves(plan):
    tree = SearchTree(PRIMARY)
    scores = [0.30, 0.25, None, 0.35, 0.35, 0.40]
    for i, score in enumerate(scores, 1):
        node = tree.add(_node(i, plan, score, parent=None if i == 1 else 1, kind="draft" if i == 1 else "improve",
                              ok=score is not None))
        tree.judge(node)
    assert [n.status for n in tree.nodes] == ["kept", "discarded", "buggy", "kept", "discarded", "kept"]
    assert tree.best().id == 6 and tree.path_to(tree.best()) == [1, 6]
    journal = tree.to_json("designed")
    assert journal["best"] == 6 and journal["kept_path"] == [1, 6] and len(journal["nodes"]) == 6
    mse = SearchTree("mse")  # lower is better
    for i, score in enumerate([0.5, 0.4, 0.6], 1):
        mse.judge(mse.add(_node(i, plan, score)))
    assert [n.status for n in mse.nodes] == ["kept", "kept", "discarded"]


def _pooled(primary: float, mse: float, n: int = 12) -> PooledScore:
    """Validation scores of `n` conditions in as many held-out groups, spread ±0.01 around the given means."""
    spread = np.linspace(-0.01, 0.01, n)
    rows = [{"fold": "val", "condition": f"g{i}||x", "group": f"g{i}", PRIMARY: primary + d, MSE: mse + d}
            for i, d in enumerate(spread)]
    return PooledScore({PRIMARY: primary, MSE: mse}, rows, n, {})


def test_the_search_keeps_what_the_delivery_rule_would_deliver(plan):
    """The journal judges nodes as the delivery ranks candidates: a change that lifts the primary metric by
    trading top-20-DE MSE well past the best baseline's is discarded; one that brings top-20-DE MSE back to
    the best baseline's is kept though its primary score is a little lower, since only that node can be
    delivered; among nodes no worse on both, the mean relative gain over both decides."""
    baselines = [Entry("baseline", "ridge", _pooled(0.30, 1.00), {})]
    scores = {1: _pooled(0.35, 1.20), 2: _pooled(0.40, 1.40), 3: _pooled(0.33, 0.98), 4: _pooled(0.34, 1.30),
              5: _pooled(0.36, 0.99)}
    merit = merit_against(baselines, PRIMARY)
    tree = SearchTree(PRIMARY, merit=lambda node: merit(scores[node.id]))
    for i in scores:
        tree.judge(tree.add(_node(i, plan, scores[i].summary[PRIMARY], parent=None if i == 1 else 1,
                                  kind="draft" if i == 1 else "improve")))
    assert [n.status for n in tree.nodes] == ["kept", "discarded", "kept", "discarded", "kept"]
    assert tree.best().id == 5
    # By the primary metric alone node 2 (0.40) would have been kept and delivered nothing better than ridge.
    assert SearchTree(PRIMARY, list(tree.nodes)).best().id == 2


def test_changes_that_leave_validation_unchanged_stop_the_search(plan):
    """Unseen cell types: the residual network is not used for them, so network knobs cannot move
    validation; after two such changes the rules stop rather than spend the budget."""
    table = _table({PRIMARY: 0.1, "mse_top20_de": 0.9}, {"control": {PRIMARY: 0.3, "mse_top20_de": 0.7}})
    same = [{"id": 2, "parent": 1, "kind": "improve", "label": "a", "val": 0.1},
            {"id": 3, "parent": 1, "kind": "improve", "label": "b", "val": 0.1}]
    assert offline_improve(_context(plan, table, same[:1])).stop is False
    stop = offline_improve(_context(plan, table, same))
    assert stop.stop and "unchanged" in stop.rationale
    moved = [*same[:1], {**same[1], "val": 0.12}]
    assert offline_improve(_context(plan, table, moved)).stop is False
