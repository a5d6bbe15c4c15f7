"""Profiles of three kinds of data for the agents' tests.

They are the agents' `ProfileFacts` (what the data layer's `DataProfile` is reduced to), so each test
states the numbers its assertion depends on; one test runs the real simulator + profiler instead.
"""

from service.agents import ProfileFacts

_BASE = dict(
    modalities=["rna_counts"], n_cells=20000, n_genes=2000, n_perturbations=120, n_conditions=120,
    n_control_cells=3000, cells_per_condition_median=150.0, cells_per_condition_min=40.0, n_contexts=1,
    n_doses=0, n_combos=0, de_top20_fraction=0.4,
)


def make_facts(**overrides) -> ProfileFacts:
    return ProfileFacts.model_validate({**_BASE, **overrides})


KNOCKOUT = make_facts(perturbation_kind="genetic", target_genes_measured_fraction=0.97,
                      recommended_split="unseen-perturbation")
DRUG = make_facts(perturbation_kind="chemical", n_perturbations=30, n_conditions=360, n_doses=4, n_contexts=3,
                  recommended_split="unseen-drug", alternative_splits=["unseen-dose", "unseen-context"])
CYTOKINE = make_facts(perturbation_kind="cytokine", modalities=["rna_lognorm"], n_perturbations=40,
                      n_conditions=200, n_contexts=5, recommended_split="unseen-perturbation",
                      alternative_splits=["unseen-context"])
TASKS = {
    "knockout": (KNOCKOUT, "Predict expression after CRISPR knockout of unseen genes (Perturb-seq)."),
    "drug": (DRUG, "Predict responses of cancer cell lines to unseen drugs at several doses."),
    "cytokine": (CYTOKINE, "Predict cytokine stimulation responses in an unseen cell type."),
}
