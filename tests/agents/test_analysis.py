"""Task analysis: retrieval over the method cards, citations relevant to the kind, framing from the profile."""

import json

import pytest

from service.agents import AnalysisError, TaskAnalysis, analyse_task, default_knowledge_base
from service.agents.knowledge import KnowledgeBase, KnowledgeBaseError, load_cards
from service.agents.llm_kinds import TASK_ANALYSIS
from service.agents.offline_experts import task_analysis
from service.data import profile_dataset
from service.data import simulate
from service.llm import LLMError, OfflineBackend

from agent_profiles import CYTOKINE, DRUG, KNOCKOUT, TASKS, make_facts


def test_every_card_is_complete_and_cited():
    cards = load_cards()
    assert len(cards) >= 12
    for card in cards:
        assert card.citation and card.pitfalls and card.key_components and card.when_to_use
    ids = {c.id for c in cards}
    assert {"gears", "cpa", "chemcpa", "scgen", "scgpt", "linear_baseline", "state", "systema", "biolord",
            "genept"} <= ids


def test_malformed_card_names_the_file(tmp_path):
    (tmp_path / "broken.json").write_text(json.dumps({"id": "broken", "name": "x"}))
    with pytest.raises(KnowledgeBaseError, match=r"broken\.json.*summary"):
        load_cards(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(KnowledgeBaseError, match=r"broken\.json"):
        load_cards(tmp_path)


def test_tfidf_retrieval_ranks_the_matching_method_first():
    kb = default_knowledge_base()
    assert kb.search("drug compound dose response sci-plex", k=2)[0].card.id in {"chemcpa", "dose_response"}
    assert kb.search("combinations double perturbation additive", k=1)[0].card.id == "additive_combos"
    cyto = [h.card.id for h in kb.search("cytokine stimulation unseen cell type", k=3, kind="cytokine")]
    assert "cytokine_dictionary" in cyto and "scgen" in cyto
    assert all("chemical" in h.card.applies_to for h in kb.search("gene knockout", k=10, kind="chemical"))


@pytest.mark.parametrize(
    ("name", "expected", "unexpected"),
    [
        ("knockout", {"gears"}, {"chemcpa", "dose_response", "cytokine_dictionary"}),
        ("drug", {"chemcpa", "dose_response"}, {"gears", "genept", "additive_combos"}),
        ("cytokine", {"cytokine_dictionary", "scgen"}, {"gears", "chemcpa", "dose_response"}),
    ],
)
def test_analysis_cites_cards_relevant_to_the_kind(offline, name, expected, unexpected):
    facts, task = TASKS[name]
    analysis = analyse_task(facts, task, offline)
    cited = {c.card_id for c in analysis.cited_cards}
    assert expected <= cited and not cited & unexpected
    assert {"linear_baseline", "systema"} <= cited  # evaluation cards are always retrieved
    assert all(c.why and facts.perturbation_kind in c.why for c in analysis.cited_cards)


def test_analysis_frames_split_baselines_and_risks_from_the_profile(offline):
    drug = analyse_task(DRUG, TASKS["drug"][1], offline)
    assert drug.split_scheme == "unseen-drug" and "context_mean" in drug.baselines
    assert drug.primary_metric == "pearson_delta_pert" and drug.preprocessing.normalization == "log1p_cp10k"
    cyto = analyse_task(CYTOKINE, TASKS["cytokine"][1], offline)
    assert cyto.split_scheme == "unseen-context" and "delta_transfer" in cyto.baselines
    assert cyto.preprocessing.normalization == "none"  # rna_lognorm must not be logged twice
    few = make_facts(perturbation_kind="genetic", cells_per_condition_median=12.0, n_conditions=20)
    risks = {r.code for r in analyse_task(few, "unseen knockouts", offline).risks}
    assert {"few_cells_per_condition", "few_conditions"} <= risks
    assert "few_cells_per_condition" not in {r.code for r in analyse_task(KNOCKOUT, "x", offline).risks}


def test_task_text_cannot_ask_for_an_infeasible_split(offline):
    # The knockout data has one context: "unseen cell type" is not makeable, the recommendation stands.
    analysis = analyse_task(KNOCKOUT, "predict knockouts in an unseen cell type", offline)
    assert analysis.split_scheme == "unseen-perturbation"


@pytest.mark.parametrize("task", ["Predict expression after double CRISPR knockouts of unseen gene pairs",
                                  "predict unseen combinations", "held-out knockout pairs", "double knockdowns"])
def test_a_task_about_pairs_of_genes_asks_for_the_combination_split(offline, combo_profile, task):
    """Words between "unseen" and "pairs" (or "double" and "knockouts") do not turn a combination task into one
    about unseen single genes, which the text's "unseen gene" alone would suggest."""
    assert analyse_task(combo_profile, task, offline).split_scheme == "combo"
    assert analyse_task(combo_profile, "predict unseen genes", offline).split_scheme == "unseen-perturbation"


@pytest.fixture(scope="module")
def combo_profile():
    return profile_dataset(simulate("combo", seed=0, n_cells=1500, n_genes=120))


def test_analysis_of_a_real_simulated_dataset(offline):
    profile = profile_dataset(simulate("drug", seed=1, n_cells=1200, n_genes=150))
    analysis = analyse_task(profile, "predict unseen drugs", offline)
    assert analysis.perturbation_kind == "chemical" and analysis.split_scheme == "unseen-drug"
    assert analysis.key_numbers["n_cells"] == 1200 and "chemcpa" in {c.card_id for c in analysis.cited_cards}


def test_bad_inputs_get_specific_errors(offline):
    with pytest.raises(AnalysisError, match="task text is empty"):
        analyse_task(KNOCKOUT, "   ", offline)
    from service.agents import ProfileFactsError

    with pytest.raises(ProfileFactsError, match="n_cells"):
        analyse_task({"perturbation_kind": "genetic", "modalities": ["rna_counts"]}, "x", offline)


def test_llm_citations_of_unknown_cards_are_removed_and_kind_is_checked():
    def inventive(context):
        reply = task_analysis(context).model_dump()
        reply["cited_cards"].append({"card_id": "made_up_2031", "why": "sounds right", "score": 0.9})
        return TaskAnalysis.model_validate(reply)

    analysis = analyse_task(KNOCKOUT, TASKS["knockout"][1], OfflineBackend({TASK_ANALYSIS: inventive}))
    assert "made_up_2031" not in {c.card_id for c in analysis.cited_cards} and analysis.cited_cards

    def wrong_kind(context):
        return task_analysis(context).model_copy(update={"perturbation_kind": "chemical"})

    # The kind is the request's check: a model is re-asked with this reason; rules that break it are a bug.
    with pytest.raises(LLMError, match="perturbation_kind 'chemical' contradicts the data profile, which says "
                                       "'genetic'"):
        analyse_task(KNOCKOUT, "x", OfflineBackend({TASK_ANALYSIS: wrong_kind}))


def test_analysis_cites_only_cards_of_the_knowledge_base_it_is_given(offline):
    kb = KnowledgeBase([c for c in load_cards() if c.id in {"gears", "systema"}])
    analysis = analyse_task(KNOCKOUT, "unseen knockouts", offline, kb=kb)
    assert {c.card_id for c in analysis.cited_cards} == {"gears", "systema"}
