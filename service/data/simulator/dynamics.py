"""Steady-state expression of the network, propagated layer by layer along the DAG.

Production of gene j in a state: masters produce their cell-type level; other genes produce
  basal_j + Σ_i w_ij·f_i + Σ_{w_ij<0} |w_ij| + Σ_complexes w_g·(Π_{i∈g} f_i)^(1/|g|)
          + Σ_redundant w_g·(1 - Π_{i∈g} (1 - f_i)),
where f_i = x_i^n / (k_i^n + x_i^n) is the Hill activation of regulator i (a repressor contributes
|w|·(1 - f_i), hence the constant). Expression is scale_j × production_j × multiplier_j (decay = 1),
and the multiplier carries the perturbation (knockdown, drug, cytokine) into the cascade.
"""

from __future__ import annotations

import numpy as np

from .network import GeneNetwork


def steady_state(
    net: GeneNetwork, cell_type: np.ndarray, multiplier: np.ndarray | None = None
) -> np.ndarray:
    """Expression (states × genes) for states given by their cell-type index and production multipliers.

    The network must be calibrated (`calibrate`) so that Hill constants are fixed.
    """
    if net.hill_k is None:
        raise RuntimeError("network not calibrated: call calibrate(net) first")
    return _propagate(net, cell_type, multiplier, net.hill_k, fit_k=False)


def calibrate(net: GeneNetwork) -> np.ndarray:
    """Fix each regulator's half-saturation at its mean control expression over cell types.

    Returns the control expression (cell types × genes).
    """
    n_types = net.master_levels.shape[0]
    k = np.ones(net.n_genes)
    control = _propagate(net, np.arange(n_types), None, k, fit_k=True)
    net.hill_k = k
    return control


def _propagate(
    net: GeneNetwork,
    cell_type: np.ndarray,
    multiplier: np.ndarray | None,
    hill_k: np.ndarray,
    fit_k: bool,
) -> np.ndarray:
    n_states = len(cell_type)
    mult = np.ones((n_states, net.n_genes)) if multiplier is None else multiplier
    weights = net.signed_weights()
    groups = net.group_matrix()
    repress_const = np.asarray(-weights.minimum(0).sum(axis=0)).ravel()
    x = np.zeros((n_states, net.n_genes))
    act = np.zeros((n_states, net.n_genes))  # Hill activation of every computed regulator
    log_act = np.zeros((n_states, net.n_genes))
    log_inact = np.zeros((n_states, net.n_genes))

    roots = net.depth == 0
    production = np.where(net.is_master, net.master_levels[cell_type], net.basal)
    x[:, roots] = (net.scale * production * mult)[:, roots]
    for d in range(int(net.depth.max()) + 1):
        layer = np.flatnonzero(net.depth == d)
        if d > 0:
            prod = net.basal[layer] + repress_const[layer] + (weights[:, layer].T @ act.T).T
            sel = np.flatnonzero(np.isin(net.group_dst, layer))
            if sel.size:
                member_of = groups[:, sel].T
                redundant = net.group_redundant[sel][:, None]
                terms = np.where(redundant, 1.0 - np.exp(member_of @ log_inact.T), np.exp(member_of @ log_act.T))
                terms *= net.group_weight[sel][:, None]
                np.add.at(prod.T, np.searchsorted(layer, net.group_dst[sel]), terms)
            x[:, layer] = net.scale[layer] * prod * mult[:, layer]
        regs = layer[net.is_tf[layer]]
        if regs.size:
            if fit_k:
                hill_k[regs] = x[:, regs].mean(axis=0)
            ratio = (x[:, regs] / hill_k[regs]) ** net.hill_n[regs]
            act[:, regs] = ratio / (1.0 + ratio)
            log_act[:, regs] = np.log(np.maximum(act[:, regs], 1e-300))
            log_inact[:, regs] = np.log(np.maximum(1.0 - act[:, regs], 1e-300))
    return x
