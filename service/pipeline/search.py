"""The design search (after AIDE: draft → debug → improve), as a journal of nodes.

A node is one bundle run in the sandbox(es) and scored on validation by the service. Drafts are the
candidate plans; a draft that fails gets debug children (the debugging agent's patches); once one
works, each improve node makes one change to the best node so far and is kept only if its pooled
validation scores stand better by the rule the delivery is chosen by (`SearchTree.merit`: no worse than the
best baseline on both headline metrics first, then the mean relative gain over both). The change comes
from an LLM request of kind `improve` — offline, from rules that read the validation table (which baseline
beats the model, by which metric) and map it to the design space; in LLM mode, from the model, shown the
code, the table and the history. Either way the reply is a typed `Change`, recorded like every LLM call, so
`replay` reproduces the search. The journal is saved as `search.json`; each node's folder is `attempts/NN/`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from service.agents import Loss, Plan
from service.llm import LLMRequest
from service.pipeline.codegen import Bundle, render_bundle
from service.pipeline.codegen.manifest import CUSTOM_FIELD, plan_following, read_config
from service.pipeline.debugger import DebugPatch, FileEdit, PatchError, apply_patch
from service.pipeline.selection import better, finite
from service.pipeline.validate import Validation

IMPROVE = "improve"
NodeKind = Literal["draft", "debug", "improve"]
NodeStatus = Literal["buggy", "kept", "discarded", "rejected"]  # rejected: the change did not apply


class Change(BaseModel):
    """One change to the best bundle so far: plan fields (the bundle is rendered again from the plan),
    config.json keys and/or search/replace edits of the bundle's files. `stop` when nothing is worth
    trying."""

    label: str = Field(min_length=1, max_length=120, description="short name of the change")
    rationale: str = Field(min_length=1, max_length=4000, description="the validation evidence behind it")
    plan_updates: dict[str, Any] = Field(default_factory=dict,
                                         description="dotted plan fields -> values, e.g. architecture.dropout")
    config_changes: dict[str, Any] = Field(default_factory=dict, description="top-level config.json keys")
    edits: list[FileEdit] = Field(default_factory=list)
    stop: bool = Field(default=False, description="true when no change is worth a run")


@dataclass
class Node:
    id: int
    parent: int | None
    kind: NodeKind
    label: str
    candidate: int
    plan: Plan
    bundle: Bundle
    change: dict[str, Any] | None = None
    status: NodeStatus = "buggy"
    validation: Validation | None = None
    failure: str | None = None
    seconds: float = 0.0
    started: float = 0.0  # seconds since the start of the run
    debug_depth: int = 0
    patch: DebugPatch | None = None
    patch_error: str | None = None  # why the debugger's patch to this node did not apply (or none came)
    tested: bool = True  # its code ran test_model.py (a config-only change reuses the parent's pass)

    @property
    def working(self) -> bool:
        return self.validation is not None and self.validation.ok

    @property
    def score(self) -> float | None:
        return self.validation.val_score if self.validation is not None and self.validation.ok else None

    def to_json(self) -> dict[str, Any]:
        v = self.validation
        return {"id": self.id, "parent": self.parent, "kind": self.kind, "label": self.label,
                "candidate": self.candidate, "change": self.change, "status": self.status,
                "val": None if v is None else {"primary": v.val_score, "summary": v.val_summary,
                                               "n_conditions": v.n_conditions, "problems": v.problems},
                "failure": self.failure, "seconds": round(self.seconds, 1), "started": round(self.started, 1),
                "debug_depth": self.debug_depth, "patch_error": self.patch_error}


Merit = Callable[["Node"], tuple[float, ...]]  # how working nodes compare: the greater is better


@dataclass
class SearchTree:
    primary: str
    nodes: list[Node] = field(default_factory=list)
    # The pipeline judges nodes as the delivery judges candidates (`compete.merit`), so the search does not keep
    # a change that buys the primary metric with top-20-DE MSE and then loses the delivery on it; without
    # one, by the primary metric alone.
    merit: Merit | None = None
    # Why the improve loop ended ({"reason", "detail", ...}: budget, max_nodes, rules, llm, replay, no_working_node)
    stopped: dict[str, Any] | None = None
    # Steps not started because their projection did not fit the time budget (`budget.Forecast.to_json`)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    def _merit(self, node: Node) -> tuple[float, ...] | None:
        """How the node stands on validation; None for one that did not work."""
        if not (node.working and finite(node.score)):
            return None
        if self.merit is not None:
            return self.merit(node)
        return (node.score if better(self.primary, 1.0, 0.0) else -node.score,)

    def best(self) -> Node | None:
        """The working node of the best merit (the first one on a tie)."""
        judged = [(merit, node) for node in self.nodes if (merit := self._merit(node)) is not None]
        return max(judged, key=lambda pair: pair[0], default=(None, None))[1]

    def judge(self, node: Node) -> None:
        """A working node is kept when it beats every node before it on validation, else discarded."""
        before = SearchTree(self.primary, [n for n in self.nodes if n is not node], merit=self.merit).best()
        mine, theirs = self._merit(node), None if before is None else self._merit(before)
        if not node.working:
            node.status = "buggy"
        elif theirs is None or (mine is not None and mine > theirs):
            node.status = "kept"
        else:
            node.status = "discarded"

    def path_to(self, node: Node | None) -> list[int]:
        by_id = {n.id: n for n in self.nodes}
        out = []
        while node is not None:
            out.append(node.id)
            node = by_id.get(node.parent) if node.parent is not None else None
        return out[::-1]

    def to_json(self, delivered: str | None = None) -> dict[str, Any]:
        best = self.best()
        return {"primary_metric": self.primary, "best": best.id if best else None, "kept_path": self.path_to(best),
                "delivered": delivered, "stopped": self.stopped, "skipped": self.skipped,
                "nodes": [{**n.to_json(), "merit": list(m) if (m := self._merit(n)) is not None else None}
                          for n in self.nodes]}


# --- one change --------------------------------------------------------------------------------------


def updated_plan(plan: Plan, updates: dict[str, Any]) -> Plan:
    """The plan with dotted fields replaced, validated as a whole (a value outside the design space is a
    `PatchError`)."""
    data = plan.model_dump()
    for path, value in updates.items():
        section, _, name = path.partition(".")
        if section not in data or not isinstance(data[section], dict) or name not in data[section]:
            raise PatchError(f"plan has no field {path!r}")
        data[section][name] = value
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PatchError(f"plan update {updates} rejected: {exc.errors()[0]['msg']}") from None


def apply_change(plan: Plan, bundle: Bundle, change: Change) -> tuple[Plan, Bundle]:
    """The plan and bundle after `change`. Plan updates render the bundle again, keeping the config values
    the parent's bundle had changed from its own plan's (a debugger's fix stays fixed)."""
    if change.plan_updates and (plan.architecture.custom_components or CUSTOM_FIELD in change.plan_updates):
        # Rendering again gives the vetted bundle, which implements no custom component: the model's own code
        # would be dropped (and a new component left unwritten).
        raise PatchError(f"plan updates render the vetted bundle again, which implements no custom component "
                         f"({CUSTOM_FIELD}); change the code of a plan with custom components by edits and "
                         "config_changes instead")
    if change.plan_updates:
        new_plan = updated_plan(plan, change.plan_updates)
        own = render_bundle(plan).config()
        overrides = {k: v for k, v in bundle.config().items() if own.get(k) != v}
        rendered = render_bundle(new_plan)
        fresh = rendered.config()
        changed = {k for k in fresh if fresh[k] != own.get(k)}
        config = {**fresh, **{k: v for k, v in overrides.items() if k not in changed and k in fresh}}
        bundle = Bundle(files={**rendered.files, "config.json": json.dumps(config, indent=1) + "\n"})
        plan = new_plan
    if change.config_changes or change.edits:
        bundle = apply_patch(bundle, DebugPatch(failure_class="improve", diagnosis=change.label,
                                                edits=change.edits, config_changes=change.config_changes))
        plan = plan_following(plan, bundle.files, set(change.config_changes))
    return plan, bundle


# --- the request and the offline rules ---------------------------------------------------------------


def improve_context(parent: Node, tree: SearchTree, table: dict[str, Any], scheme: str) -> dict[str, Any]:
    return {
        "parent": parent.id,
        "scheme": scheme,
        "plan": json.loads(parent.plan.model_dump_json(exclude={"provenance", "rationale"})),
        "config": read_config(parent.bundle.files)[0] or {},
        "files": {name: parent.bundle.files[name] for name in ("components.py", "model.py", "train.py")},
        "validation": table,
        "history": [{"id": n.id, "parent": n.parent, "kind": n.kind, "label": n.label, "status": n.status,
                     "val": n.score} for n in tree.nodes],
    }


def improve_request(context: dict[str, Any]) -> LLMRequest[Change]:
    system = (
        "You are CellForge's design-search agent. A generated perturbation-response model trained and was "
        "scored by the service on validation conditions held out like the test ones. context.validation has "
        "its scores beside every baseline's (primary metric first, then mse_top20_de) and the conditions "
        "where baselines beat it; context.history lists the changes tried so far and whether validation "
        "improved. A change is kept when the model stands better on validation by the rule the delivery "
        "uses: no worse than the best baseline on both the primary metric and mse_top20_de first, then a "
        "higher mean relative gain over the best baseline of each metric. Propose ONE "
        "change most likely to make it stand better: plan field "
        "updates (rendered again from vetted components), config.json changes, or minimal search/replace "
        "edits of components.py / model.py / train.py. Do not repeat a change from the history. Set stop when nothing is "
        "worth a run."
    )
    user = f"Propose one change to node {context['parent']}."
    return LLMRequest(kind=IMPROVE, system=system, user=user, context=context, schema=Change)


def validation_table(primary: str, model: dict[str, float], baselines: dict[str, dict[str, float]],
                     per_condition: list[dict[str, Any]], baseline_rows: dict[str, list[dict[str, Any]]],
                     mode: str) -> dict[str, Any]:
    """What the improve step reads: the model's pooled val scores beside each baseline's, the baselines
    that beat it on each headline metric and the conditions where the best one does."""
    metrics = [primary] + [m for m in ("mse_top20_de", "pearson_delta") if m != primary]
    beaten_by = {m: sorted((n for n, s in baselines.items() if finite(s.get(m)) and finite(model.get(m))
                            and better(m, s[m], model[m])), key=lambda n: baselines[n][m],
                           reverse=not better(m, 0.0, 1.0))
                 for m in metrics}
    worst = []
    best = beaten_by[primary][0] if beaten_by[primary] else None
    if best is not None:
        theirs = {r["condition"]: r.get(primary) for r in baseline_rows[best]}
        for row in per_condition:
            mine, other = row.get(primary), theirs.get(row["condition"])
            if finite(mine) and finite(other) and better(primary, other, mine):
                worst.append({"condition": row["condition"], "model": mine, best: other})
        worst = sorted(worst, key=lambda r: abs(r[best] - r["model"]), reverse=True)[:10]
    return {"primary_metric": primary, "mode": mode, "n_conditions": len(per_condition),
            "model": {m: model.get(m) for m in metrics},
            "baselines": {n: {m: s.get(m) for m in metrics} for n, s in baselines.items()},
            "beaten_by": beaten_by, "conditions_lost_to_best_baseline": worst}


def _proposals(context: dict[str, Any]) -> list[Change]:
    """Ordered changes the validation table argues for, most specific first."""
    table, plan, config = context["validation"], context["plan"], context["config"]
    a, loss, training = plan["architecture"], plan["loss"], plan["training"]
    primary = table["primary_metric"]
    beaten = table["beaten_by"]
    out: list[Change] = []

    def propose(label: str, why: str, **parts) -> None:
        out.append(Change(label=label, rationale=why, **parts))

    def score(name: str, metric: str) -> str:
        value = table["baselines"][name].get(metric)
        return "n/a" if value is None else f"{value:.4f}"

    model = table["model"]
    # Unseen-cell-type validation holds out whole training cell types, where the residual network is never
    # applied: a change to the network alone cannot move validation, so none is proposed.
    network = context["scheme"] != "unseen-context"
    for name in beaten.get(primary, []):
        why = (f"baseline {name} beats the model on validation {primary} ({score(name, primary)} vs "
               f"{model[primary]:.4f})")
        if name == "gene_similarity" and a.get("gene_embedding_source") == "pca":
            propose("co-expression gene embedding", f"{why}: co-expression neighbours carry what the PCA "
                    "embedding misses", plan_updates={"architecture.gene_embedding_source": "coexpression"})
        if name in ("delta_transfer", "linear_context_ridge") and context["scheme"] == "unseen-context" \
                and a["base_predictor"] != "delta_transfer":
            propose("Δ-transfer base", f"{why}: transfer the perturbation's response measured in other cell "
                    "types", plan_updates={"architecture.base_predictor": "delta_transfer"})
        if name in ("linear_pca_ridge", "drug_target_ridge", "gene_similarity") and \
                a["base_predictor"] != "linear_ridge" and context["scheme"] != "unseen-context":
            propose("linear ridge base", f"{why}: start from the closed-form ridge",
                    plan_updates={"architecture.base_predictor": "linear_ridge"})
        if name in ("control", "context_mean", "mean_delta"):
            lambdas = config.get("ridge_lambdas")
            if lambdas:
                propose("stronger ridge regularisation", f"{why}: the perturbation-specific part does not "
                        "generalise; shrink it", config_changes={"ridge_lambdas": [x * 10 for x in lambdas]})
            if network and a["residual_delta"] and a["base_predictor"] != "none":
                propose("closed-form base only", f"{why}: the residual network adds variance",
                        plan_updates={"architecture.residual_delta": False})
            if network:
                propose("more dropout and weight decay", f"{why}: regularise the network",
                        plan_updates={"architecture.dropout": min(0.8, round(a["dropout"] + 0.2, 3)),
                                      "training.weight_decay": min(1.0, max(training["weight_decay"] * 10, 1e-4))})
    top = beaten.get("mse_top20_de", [])
    if top and primary != "mse_top20_de":
        propose("heavier top-DE loss weight", f"baseline {top[0]} beats the model on validation mse_top20_de",
                plan_updates={"loss.de_weighting": "top_de", "loss.de_weight": min(100.0, loss["de_weight"] * 2)})
    # Not at the schema's cap already: the change would leave the plan as it is and spend a step.
    if beaten.get(primary) and primary.startswith("pearson") and not top and loss["pearson_weight"] < Loss.MAX_PEARSON_WEIGHT:
        propose("Pearson Δ loss term", f"the model loses on {primary} while its squared error is competitive",
                plan_updates={"loss.kind": "mse_pearson_delta",
                              "loss.pearson_weight": min(Loss.MAX_PEARSON_WEIGHT,
                                                         max(Loss.DEFAULT_PEARSON_WEIGHT, loss["pearson_weight"] * 2))})
    if network:
        propose("lower learning rate", "generic: a smaller step often stops later at a better point",
                plan_updates={"training.lr": training["lr"] * 0.3})
        propose("wider and deeper residual network", "generic: more capacity for the residual",
                plan_updates={"architecture.hidden_width": min(4096, a["hidden_width"] * 2),
                              "architecture.depth": min(8, a["depth"] + 1)})
        propose("longer training", "generic: more epochs and patience",
                plan_updates={"training.epochs": min(5000, training["epochs"] * 2),
                              "training.early_stopping_patience": min(1000,
                                                                      training["early_stopping_patience"] * 2)})
    if a.get("gene_embedding_source") == "coexpression":
        propose("PCA gene embedding", "generic: the other gene embedding source",
                plan_updates={"architecture.gene_embedding_source": "pca"})
    return out


NO_EFFECT_STREAK = 2  # changes in a row that leave validation exactly as it was: the rules' knobs do not reach it


def _no_effect_streak(history: list[dict[str, Any]]) -> int:
    """How many of the last improve nodes scored exactly what their parent scored."""
    score = {h["id"]: h.get("val") for h in history if "id" in h}
    streak = 0
    for h in reversed([h for h in history if h.get("kind") == "improve"]):
        mine, theirs = h.get("val"), score.get(h.get("parent"))
        if not (finite(mine) and finite(theirs) and abs(mine - theirs) <= 1e-12):
            break
        streak += 1
    return streak


def offline_improve(context: dict[str, Any]) -> Change:
    """The first proposal the history has not tried yet (deterministic), or `stop` — also when the last
    changes left validation exactly unchanged (e.g. the network's residual is not used for unseen cell
    types, so its knobs cannot move their predictions)."""
    if _no_effect_streak(context["history"]) >= NO_EFFECT_STREAK:
        return Change(label="stop", rationale=f"the last {NO_EFFECT_STREAK} changes left validation exactly "
                      "unchanged: the knobs the rules turn do not reach these predictions", stop=True)
    tried = {h["label"] for h in context["history"]}
    for change in _proposals(context):
        if change.label not in tried:
            return change
    return Change(label="stop", rationale="every rule-based change was tried", stop=True)
