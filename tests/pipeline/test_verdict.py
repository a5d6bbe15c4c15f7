"""The verdict on crafted scores: the best baseline, margins, who beats the model, spread, warnings."""

from __future__ import annotations

import pytest

from service.pipeline import build_verdict, verdict_lines
from service.pipeline.verdict import Verdict, beats, headline, margin, metric_verdict

PRIMARY = "pearson_delta_pert"


def _rows(values: dict[str, tuple[float, float]]) -> list[dict]:
    return [{"condition": c, PRIMARY: p, "mse_top20_de": m} for c, (p, m) in values.items()]


@pytest.fixture
def losing():
    """The model beats linear_pca_ridge but gene_similarity beats it on validation and on test (Pearson),
    while on top-20-DE MSE it beats every baseline; six test conditions."""
    model_rows = _rows({f"c{i}": (0.30 + 0.01 * i, 0.5) for i in range(6)})
    return build_verdict(
        status="validated", primary=PRIMARY, delivered="baseline:gene_similarity",
        delivered_reason="best on validation", model_val={PRIMARY: 0.30, "mse_top20_de": 0.50},
        model_test={PRIMARY: 0.325, "mse_top20_de": 0.50},
        baselines_val={"gene_similarity": {PRIMARY: 0.40, "mse_top20_de": 0.70},
                       "linear_pca_ridge": {PRIMARY: 0.20, "mse_top20_de": 0.60},
                       "mean_delta": {PRIMARY: 0.0, "mse_top20_de": 0.9}},
        baselines_test={"gene_similarity": {PRIMARY: 0.45, "mse_top20_de": 0.80},
                        "linear_pca_ridge": {PRIMARY: 0.325, "mse_top20_de": 0.55},
                        "mean_delta": {PRIMARY: 0.01, "mse_top20_de": 0.95}},
        model_rows=model_rows,
        baseline_rows={"gene_similarity": _rows({f"c{i}": (0.45, 0.8) for i in range(6)}),
                       "linear_pca_ridge": _rows({f"c{i}": (0.325, 0.55) for i in range(6)})},
        delivered_val={PRIMARY: 0.40, "mse_top20_de": 0.70},
        delivered_test={PRIMARY: 0.45, "mse_top20_de": 0.80}, validation="held-out validation", n_val_conditions=12,
        n_test_conditions=6, not_competing=["linear_context_ridge"])


def test_a_baseline_that_beats_the_model_is_named_with_the_margins(losing):
    p = losing.metrics[PRIMARY]
    assert losing.beats_baselines is False and losing.status == "validated"
    assert (p.best_baseline_val, p.best_baseline_val_score) == ("gene_similarity", 0.40)
    assert (p.best_baseline_test, p.best_baseline_test_score) == ("gene_similarity", 0.45)
    assert p.margin_val == pytest.approx(-0.10) and p.relative_margin_val == pytest.approx(-0.25)
    assert p.margin_test == pytest.approx(-0.125) and p.beats_val is False and p.beats_test is False
    # A tie is no win: linear_pca_ridge equals the model on test, so it is listed as not beaten.
    assert p.baselines_beating_model_val == ["gene_similarity"]
    assert p.baselines_beating_model_test == ["gene_similarity", "linear_pca_ridge"]
    assert p.spread_test.n == 6
    assert (p.spread_test.min, p.spread_test.max) == (pytest.approx(0.30), pytest.approx(0.35))
    assert p.paired_test.baseline == "gene_similarity" and p.paired_test.win_fraction == 0.0
    assert p.paired_test.ci95[1] < 0  # every condition lost: the interval excludes zero


def test_lower_is_better_metrics_are_signed_so_positive_means_better(losing):
    m = losing.metrics["mse_top20_de"]
    assert m.higher_is_better is False
    assert (m.best_baseline_val, m.best_baseline_test) == ("linear_pca_ridge", "linear_pca_ridge")
    assert m.margin_val == pytest.approx(0.10) and m.beats_val and m.beats_test
    assert m.baselines_beating_model_val == [] and m.baselines_beating_model_test == []
    assert margin("mse", 1.0, 2.0) == 1.0 and margin("pearson", 1.0, 2.0) == -1.0
    assert beats("pearson", 0.5, 0.5) is False and beats("pearson", None, 0.1) is None


def test_warnings_and_plain_lines(losing):
    text = "\n".join(verdict_lines(losing))
    assert any("6 condition(s), fewer than 10" in w for w in losing.warnings)
    assert any("linear_context_ridge" in w and "could not compete" in w for w in losing.warnings)
    assert losing.summary.startswith("Designed model: does NOT beat the best baseline on pearson_delta_pert")
    # The headline states the other verdict metric too, each way: here the model wins top-20-DE MSE.
    assert ("; on mse_top20_de it BEATS it (validation +0.1000 vs linear_pca_ridge, test +0.0500 vs "
            "linear_pca_ridge)") in losing.summary
    assert "Delivered baseline:gene_similarity (best on validation)" in losing.summary
    assert "gene_similarity" in text and "95% CI" in text and "IQR" in text


def test_the_delivered_predictor_is_compared_with_the_best_baseline(losing):
    """What the user gets is stated against the best baseline on both splits, on every verdict metric: here
    the delivered baseline is the best one (a tie on the primary metric), and linear_pca_ridge beats it on
    top-20-DE MSE."""
    d = losing.delivered_metrics
    assert (d[PRIMARY].model_val, d[PRIMARY].model_test) == (0.40, 0.45)
    assert d[PRIMARY].margin_test == 0.0 and d[PRIMARY].beats_test is False
    assert d["mse_top20_de"].beats_val is False and d["mse_top20_de"].best_baseline_test == "linear_pca_ridge"
    assert ("Delivered baseline:gene_similarity (best on validation) on pearson_delta_pert: validation 0.4000 vs "
            "best baseline gene_similarity 0.4000 (+0.0000, tie); test 0.4500 vs best baseline gene_similarity "
            "0.4500 (+0.0000, tie).") in losing.summary
    lines = verdict_lines(losing)
    assert ("delivered baseline:gene_similarity, mse_top20_de: val 0.7000 vs best baseline linear_pca_ridge "
            "0.6000 (-0.1000, worse); test 0.8000 vs best baseline linear_pca_ridge 0.5500 (-0.2500, worse)") in lines


def test_a_model_without_a_test_score_is_not_called_a_loser():
    """The designed model won validation but its whole-split run failed: the headline says so, and says how
    the delivered stack fares on test."""
    v = build_verdict(status="validated", primary=PRIMARY, delivered="stack", delivered_reason="best",
                      model_val={PRIMARY: 0.5}, model_test=None,
                      baselines_val={"b": {PRIMARY: 0.3}}, baselines_test={"b": {PRIMARY: 0.3}},
                      model_rows=None, baseline_rows={}, delivered_val={PRIMARY: 0.4}, delivered_test={PRIMARY: 0.35},
                      validation="", n_val_conditions=20, n_test_conditions=30)
    assert v.beats_baselines is False
    assert v.summary.startswith("Designed model: beats the best baseline on pearson_delta_pert on validation "
                                "(validation +0.2000 vs b) but has no test score.")
    assert "test 0.3500 vs best baseline b 0.3000 (+0.0500, better)" in v.summary


def test_the_report_box_states_what_the_status_means():
    """A failed run is not called 'trained and checked' in the report."""
    from service.pipeline.report import _verdict_box

    failed = build_verdict(status="failed", primary=PRIMARY, delivered="baseline:b", delivered_reason="best",
                           model_val=None, model_test=None, baselines_val={"b": {PRIMARY: 0.3}},
                           baselines_test={"b": {PRIMARY: 0.3}}, model_rows=None, baseline_rows={},
                           delivered_val={PRIMARY: 0.3}, delivered_test={PRIMARY: 0.3}, validation="",
                           n_val_conditions=20, n_test_conditions=30)
    box = _verdict_box({"verdict": failed.model_dump(mode="json")})
    assert failed.summary.startswith("No designed model trained. Delivered baseline:b (best)")
    assert "(no designed model trained)" in box and "trained and checked" not in box


def test_a_model_that_wins_only_on_validation_is_flagged():
    v = build_verdict(status="validated", primary=PRIMARY, delivered="designed", delivered_reason="best",
                      model_val={PRIMARY: 0.5}, model_test={PRIMARY: 0.2},
                      baselines_val={"b": {PRIMARY: 0.3}}, baselines_test={"b": {PRIMARY: 0.3}},
                      model_rows=None, baseline_rows={}, delivered_val={PRIMARY: 0.5}, delivered_test={PRIMARY: 0.2},
                      validation="", n_val_conditions=20, n_test_conditions=30)
    assert v.beats_baselines is False and v.metrics[PRIMARY].beats_val and not v.metrics[PRIMARY].beats_test
    assert any("did not carry over" in w for w in v.warnings) and not any("fewer than" in w for w in v.warnings)
    # The headline names the split it wins on: neither a plain loss nor a win.
    assert v.summary.startswith("Designed model: beats the best baseline on pearson_delta_pert on validation but "
                                "NOT on test (validation +0.2000 vs b, test -0.1000 vs b).")
    test_only = build_verdict(status="validated", primary=PRIMARY, delivered="baseline:b", delivered_reason="best",
                              model_val={PRIMARY: 0.2}, model_test={PRIMARY: 0.5},
                              baselines_val={"b": {PRIMARY: 0.3}}, baselines_test={"b": {PRIMARY: 0.3}},
                              model_rows=None, baseline_rows={}, delivered_val={PRIMARY: 0.3},
                              delivered_test={PRIMARY: 0.3}, validation="", n_val_conditions=20,
                              n_test_conditions=30)
    assert test_only.beats_baselines is False
    assert test_only.summary.startswith("Designed model: does NOT beat the best baseline on pearson_delta_pert on "
                                        "validation, only on test (validation -0.1000 vs b, test +0.2000 vs b)")
    won = build_verdict(status="validated", primary=PRIMARY, delivered="designed", delivered_reason="best",
                        model_val={PRIMARY: 0.5}, model_test={PRIMARY: 0.5},
                        baselines_val={"b": {PRIMARY: 0.3}}, baselines_test={"b": {PRIMARY: 0.3}},
                        model_rows=None, baseline_rows={}, delivered_val={PRIMARY: 0.5}, delivered_test={PRIMARY: 0.5},
                        validation="", n_val_conditions=20, n_test_conditions=30)
    assert won.beats_baselines is True and "BEATS" in won.summary


def test_many_conditions_of_few_held_out_units_are_flagged():
    """24 test conditions that are two compounds at four doses in three cell lines: too few units to decide,
    though enough conditions; 24 conditions of 12 compounds are not flagged."""
    def verdict(groups: int):
        return build_verdict(status="validated", primary=PRIMARY, delivered="designed", delivered_reason="best",
                             model_val={PRIMARY: 0.5}, model_test={PRIMARY: 0.5},
                             baselines_val={"b": {PRIMARY: 0.3}}, baselines_test={"b": {PRIMARY: 0.3}},
                             model_rows=None, baseline_rows={}, delivered_val={PRIMARY: 0.5},
                             delivered_test={PRIMARY: 0.5}, validation="", n_val_conditions=20, n_test_conditions=24,
                             test_groups=("perturbation", groups))

    few = verdict(2)
    assert (few.n_test_groups, few.test_group_by) == (2, "perturbation")
    assert any("2 held-out perturbation group(s), fewer than 5" in w for w in few.warnings)
    assert not any("fewer than" in w for w in verdict(12).warnings)


def test_the_headline_says_when_the_model_wins_the_primary_metric_but_not_top20_de_mse():
    """As in the README demo's seed 1: ahead of `control` on the primary metric on both splits, behind
    `gene_similarity` on top-20-DE MSE on test; the one-line summary must not read as a win on both."""
    v = build_verdict(
        status="validated", primary=PRIMARY, delivered="designed", delivered_reason="best on validation",
        model_val={PRIMARY: 0.34, "mse_top20_de": 0.50}, model_test={PRIMARY: 0.39, "mse_top20_de": 0.20},
        baselines_val={"control": {PRIMARY: 0.27, "mse_top20_de": 0.80},
                       "gene_similarity": {PRIMARY: 0.20, "mse_top20_de": 0.57}},
        baselines_test={"control": {PRIMARY: 0.33, "mse_top20_de": 0.40},
                        "gene_similarity": {PRIMARY: 0.30, "mse_top20_de": 0.18}},
        model_rows=None, baseline_rows={}, delivered_val=None, delivered_test=None,
        validation="held-out validation", n_val_conditions=12, n_test_conditions=15)
    assert v.beats_baselines is True
    assert v.summary.startswith("Designed model: BEATS the best baseline on pearson_delta_pert")
    assert ("; on mse_top20_de it beats it on validation but NOT on test (validation +0.0700 vs gene_similarity, "
            "test -0.0200 vs gene_similarity)") in v.summary


def test_scored_predictions_are_judged_on_the_one_split_scored():
    """`cellforge score` scores one split: a win there on a secondary metric reads as a win, not as 'does NOT
    beat' for want of the other split's score."""
    metrics = {m: metric_verdict(m, None, mine, {}, {"b": theirs})
               for m, mine, theirs in ((PRIMARY, 0.5, 0.3), ("mse_top20_de", 0.2, 0.4))}
    v = Verdict(status="scored", primary_metric=PRIMARY, beats_baselines=True, subject="predictions (p.h5ad)",
                metrics=metrics)
    assert headline(v) == ("Predictions (p.h5ad): BEATS the best baseline on pearson_delta_pert (test +0.2000 vs b); "
                           "on mse_top20_de it BEATS it (test +0.2000 vs b).")
    v.metrics["mse_top20_de"] = metric_verdict("mse_top20_de", None, 0.5, {}, {"b": 0.4})
    assert "on mse_top20_de it does NOT beat it (test -0.1000 vs b)" in headline(v)
