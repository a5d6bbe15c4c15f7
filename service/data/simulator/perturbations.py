"""Perturbation designs: each condition becomes production multipliers per cell type.

A design lists the conditions (control first) and, for each condition and cell type, the factor
by which every gene's production is scaled; the network then carries the effect downstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from ..conditions import CONTROL
from .network import GeneNetwork

DRUG_DOSES = (0.01, 0.1, 1.0, 10.0)
CYTOKINES = (
    "IFNG", "TNF", "IL1B", "IL4", "IL6", "IL10", "IL13", "IL17A", "IL2", "TGFB1", "IFNB1",
    "IL21", "IL15", "IL12A", "CSF2", "IL7", "IL33", "IL18", "IFNA1", "OSM",
)  # fmt: skip


@dataclass
class Design:
    """Conditions (index 0 is the control) and their multipliers (conditions × cell types × genes)."""

    perturbation: list[str]
    dose: np.ndarray  # float; NaN when the kind has no dose
    multiplier: np.ndarray
    escapes: bool  # whether some perturbed cells escape the perturbation (genetic kinds)
    truth: dict = field(default_factory=dict)  # h5ad-writable description of what was done


def _base(n_conditions: int, n_types: int, n_genes: int) -> np.ndarray:
    return np.ones((n_conditions, n_types, n_genes))


def knockouts(rng: np.random.Generator, net: GeneNetwork, n_types: int, n_perts: int) -> Design:
    """CRISPRi-like knockdowns, mostly of regulators (as in genome-scale Perturb-seq screens)."""
    tfs = net.tfs
    others = np.flatnonzero(~net.is_tf)
    n_tf = min(len(tfs), int(round(0.85 * n_perts)))
    genes = np.concatenate(
        [rng.choice(tfs, n_tf, replace=False), rng.choice(others, n_perts - n_tf, replace=False)]
    )
    genes = rng.permutation(genes)
    efficiency = rng.uniform(0.7, 0.95, len(genes))
    mult = _base(len(genes) + 1, n_types, net.n_genes)
    mult[np.arange(1, len(genes) + 1), :, genes] = (1.0 - efficiency)[:, None]
    return Design(
        perturbation=[CONTROL, *net.names[genes]],
        dose=np.full(len(genes) + 1, np.nan),
        multiplier=mult,
        escapes=True,
        truth={"knockdown": {"gene": net.names[genes].astype(str), "efficiency": efficiency}},
    )


def combos(rng: np.random.Generator, net: GeneNetwork, n_types: int, n_perts: int) -> Design:
    """Single and double knockdowns. Half the pairs are redundant regulators of a shared target
    (either suffices), which interact non-additively; the rest are TFs of one module."""
    n_pairs = max(2, n_perts // 2)
    cooperative = sorted(
        {
            tuple(sorted(p))
            for g in np.flatnonzero(net.group_redundant)
            for p in combinations(net.group_member[net.group_of_member == g].tolist(), 2)
        }
    )
    # Parallel regulators only: when one is upstream of the other, the pair is just a longer cascade.
    cooperative = [(a, b) for a, b in cooperative if a not in net.ancestors(b) and b not in net.ancestors(a)]
    rng.shuffle(cooperative)
    pairs = cooperative[: n_pairs // 2]
    same_module = [
        p
        for m in np.unique(net.module[net.is_tf])
        for p in combinations(np.flatnonzero(net.is_tf & (net.module == m)).tolist(), 2)
    ]
    rng.shuffle(same_module)
    taken = set(pairs)
    for p in same_module:
        if len(pairs) >= n_pairs:
            break
        if p not in taken:
            pairs.append(p)
            taken.add(p)
    singles = sorted({g for p in pairs for g in p})
    efficiency = dict(zip(singles, rng.uniform(0.7, 0.95, len(singles)), strict=True))
    labels = [CONTROL] + [str(net.names[g]) for g in singles]
    labels += [f"{net.names[a]}+{net.names[b]}" for a, b in pairs]
    mult = _base(len(labels), n_types, net.n_genes)
    for i, g in enumerate(singles, start=1):
        mult[i, :, g] = 1.0 - efficiency[g]
    for i, (a, b) in enumerate(pairs, start=1 + len(singles)):
        mult[i, :, a] = 1.0 - efficiency[a]
        mult[i, :, b] = 1.0 - efficiency[b]
    cooperative_set = set(cooperative)
    return Design(
        perturbation=labels,
        dose=np.full(len(labels), np.nan),
        multiplier=mult,
        escapes=True,
        truth={
            "knockdown": {
                "gene": net.names[singles].astype(str),
                "efficiency": np.array([efficiency[g] for g in singles]),
            },
            "cooperative_pairs": np.array(
                [f"{net.names[a]}+{net.names[b]}" for a, b in pairs if (a, b) in cooperative_set], dtype=str
            ),
        },
    )


def hill(x: np.ndarray, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    r = (x / k) ** n
    return r / (1.0 + r)


def drugs(rng: np.random.Generator, net: GeneNetwork, n_types: int, n_drugs: int) -> Design:
    """Compounds with sparse signed target sets, Hill dose–response, and mild toxicity at high dose.
    The sign belongs to the target (80% of targets are inhibited, the rest activated, by every compound
    that hits them), as compounds sharing a target mostly share its mode of action: target annotations
    then carry the information a model needs, not a coin flip per compound."""
    tfs = net.tfs
    target_sign = np.where(rng.random(len(tfs)) < 0.8, -1.0, 1.0)
    stress = rng.choice(np.flatnonzero(net.module == -1), size=max(5, net.n_genes // 100), replace=False)
    doses = np.asarray(DRUG_DOSES)
    rows = [np.ones((n_types, net.n_genes))]
    labels, dose_col = [CONTROL], [0.0]
    t_drug, t_gene, t_sign, t_ic50, t_emax, t_hill = [], [], [], [], [], []
    for d in range(n_drugs):
        name = f"drug_{d + 1:02d}"
        picked = rng.choice(len(tfs), size=int(rng.integers(1, 4)), replace=False)
        targets, sign = tfs[picked], target_sign[picked]
        ic50 = np.exp(rng.uniform(np.log(0.03), np.log(3.0), len(targets)))
        emax = rng.uniform(0.6, 0.95, len(targets))
        n_hill = rng.uniform(0.8, 2.0, len(targets))
        toxicity = rng.uniform(0.0, 1.5)
        tox_ic50 = np.exp(rng.uniform(np.log(1.0), np.log(30.0)))
        for c in doses:
            m = np.ones((n_types, net.n_genes))
            occupancy = emax * hill(np.full(len(targets), c), ic50, n_hill)
            m[:, targets] = np.where(sign < 0, 1.0 - occupancy, 1.0 + 2.0 * occupancy)
            m[:, stress] *= 1.0 + toxicity * c / (c + tox_ic50)
            rows.append(m)
            labels.append(name)
            dose_col.append(float(c))
        t_drug += [name] * len(targets)
        t_gene += list(net.names[targets])
        t_sign += list(sign)
        t_ic50 += list(ic50)
        t_emax += list(emax)
        t_hill += list(n_hill)
    return Design(
        perturbation=labels,
        dose=np.asarray(dose_col),
        multiplier=np.stack(rows),
        escapes=False,
        truth={
            "drug_targets": {
                "drug": np.array(t_drug, dtype=str),
                "gene": np.array(t_gene, dtype=str),
                "sign": np.array(t_sign),
                "ic50": np.array(t_ic50),
                "emax": np.array(t_emax),
                "hill": np.array(t_hill),
            },
            "stress_genes": net.names[stress].astype(str),
        },
    )


def cytokines(
    rng: np.random.Generator, net: GeneNetwork, control: np.ndarray, n_cytokines: int
) -> Design:
    """Cytokines act through a receptor whose level differs by cell type, on shared and type-specific genes."""
    n_types = control.shape[0]
    # Receptors: genes whose control expression varies most between cell types.
    spread = control.std(axis=0) / control.mean(axis=0)
    candidates = np.argsort(spread)[::-1][: max(4 * n_cytokines, 20)]
    receptors = rng.choice(candidates, n_cytokines, replace=False)
    non_tf_masters = net.tfs[~net.is_master[net.tfs]]
    regulated = np.flatnonzero(net.module >= 0)
    rows = [np.ones((n_types, net.n_genes))]
    r_name, r_gene = [], []
    activity_rows = []
    for i, rec in enumerate(receptors):
        level = control[:, rec]
        activity = hill(level, np.full(n_types, level.mean()), np.full(n_types, 2.0))
        m = np.ones((n_types, net.n_genes))
        shared = rng.choice(non_tf_masters, size=3, replace=False)
        gain = rng.uniform(1.5, 4.0, len(shared))
        m[:, shared] *= 1.0 + activity[:, None] * gain
        for c in range(n_types):
            # Each cell type wires the signal to its own TFs (which cascade) and its own genes.
            own_tfs = rng.choice(non_tf_masters, size=2, replace=False)
            m[c, own_tfs] *= 1.0 + activity[c] * rng.uniform(1.5, 4.0, 2)
            own = rng.choice(regulated, size=max(10, net.n_genes // 30), replace=False)
            own_gain = rng.uniform(-0.7, 3.0, len(own))
            m[c, own] *= np.maximum(0.1, 1.0 + activity[c] * own_gain)
        rows.append(m)
        r_name.append(CYTOKINES[i])
        r_gene.append(net.names[rec])
        activity_rows.append(activity)
    labels = [CONTROL, *CYTOKINES[:n_cytokines]]
    return Design(
        perturbation=labels,
        dose=np.full(len(labels), np.nan),
        multiplier=np.stack(rows),
        escapes=False,
        truth={
            "cytokine_receptors": {
                "cytokine": np.array(r_name, dtype=str),
                "receptor": np.array(r_gene, dtype=str),
                "activity_by_cell_type": np.array(activity_rows),
            }
        },
    )


STATE_NOISE = 0.1  # log-sd of the per-cell-type deviation of each response gene: what no control state explains


def stimulations(
    rng: np.random.Generator, net: GeneNetwork, control: np.ndarray, n_stimuli: int
) -> Design:
    """Stimuli whose response in each cell type follows from that type's control state, as a PBMC
    stimulation's does: a stimulus drives a programme through receptors, with an activity that is a
    saturating (Hill) function of the cell type's receptor levels; each programme gene's induction is
    gated by a cofactor gene (a Hill function of its control level, 1 at the average level); the network
    then propagates it. On top, a small per-cell-type deviation (`STATE_NOISE`) that the control state
    does not explain. An unseen cell type is thus predictable from its control profile, nonlinearly."""
    n_types = control.shape[0]
    relative = control / control.mean(axis=0)  # each gene's control level relative to the average type
    spread = control.std(axis=0) / control.mean(axis=0)
    varying = np.argsort(spread)[::-1][: max(4 * n_stimuli, 20)]
    non_tf_masters = net.tfs[~net.is_master[net.tfs]]
    regulated = np.flatnonzero(net.module >= 0)
    rows = [np.ones((n_types, net.n_genes))]
    names, receptor_genes, activity_rows = [], [], []
    for i in range(n_stimuli):
        receptors = rng.choice(varying, size=2, replace=False)
        weight = rng.uniform(0.5, 1.0, 2)
        drive = relative[:, receptors] @ weight / weight.sum()
        activity = hill(drive, np.full(n_types, rng.uniform(0.6, 1.2)), np.full(n_types, 2.0))
        programme = np.concatenate([rng.choice(non_tf_masters, size=3, replace=False),
                                    rng.choice(regulated, size=max(10, net.n_genes // 25), replace=False)])
        programme = np.unique(programme)
        gain = rng.uniform(-0.7, 3.0, len(programme))
        gain[np.isin(programme, net.tfs)] = rng.uniform(1.5, 4.0, int(np.isin(programme, net.tfs).sum()))
        cofactor = rng.choice(varying, size=len(programme))
        gate = 2.0 * hill(relative[:, cofactor], np.ones(len(programme)), np.full(len(programme), 2.0))
        induced = 1.0 + activity[:, None] * gain[None, :] * gate
        deviation = np.exp(rng.normal(0.0, STATE_NOISE, (n_types, len(programme))))
        m = np.ones((n_types, net.n_genes))
        m[:, programme] = np.maximum(0.1, induced) * deviation
        rows.append(m)
        names.append(CYTOKINES[i])
        receptor_genes.append(";".join(net.names[receptors].astype(str)))
        activity_rows.append(activity)
    return Design(
        perturbation=[CONTROL, *names],
        dose=np.full(n_stimuli + 1, np.nan),
        multiplier=np.stack(rows),
        escapes=False,
        truth={
            "stimulus_receptors": {
                "stimulus": np.array(names, dtype=str),
                "receptors": np.array(receptor_genes, dtype=str),
                "activity_by_cell_type": np.array(activity_rows),
            },
            "state_noise": STATE_NOISE,
        },
    )
