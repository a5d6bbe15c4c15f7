"""The design pipeline, end to end: profile → task analysis → discussion → Plan → split and validation
folds → search in sandboxes (drafts, debugging, improve steps) → competition on validation (the best
designed model, every baseline, a stack of them) → delivery → scoring on test → verdict → report.

Integrity: the service owns the split and every truth; a sandbox sees only model files (training cells,
the val and test inputs); every choice is made on validation, never on test; the service's evaluator
computes every reported score.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anndata as ad
from pydantic import BaseModel, Field, field_validator

from sandbox import (DEFAULT_CPU_IMAGE, DEFAULT_GPU_IMAGE, BackendKind, BackendProvider, SandboxProvider, SpecError,
                     parse_size, require_runtime)
from service.agents import DiscussionEvent, Plan, analyse_task, handlers as agent_handlers, run_discussion
from service.data import make_split, profile_dataset
from service.data.load import POOLED
from service.data.profile import NOTHING_TO_HOLD_OUT
from service.data.splits import SPLIT_FILES, TRUTH_FILES, Scheme, Split, condition_groups, load_split
from service.data.baselines import run_baselines
from service.data.celleval import cell_eval_block
from service.data.evaluate import EvaluationReport, Evaluator
from service.errors import CellForgeError
from service.llm import (Backend, LLMConfig, LLMError, LLMInvalidReply, LLMRequest, make_backend, read_calls,
                         summarize_run)
from service.llm.request import R
from service.pipeline.candidates import candidate_plans
from service.pipeline.budget import DEFAULT_MAX_MINUTES
from service.pipeline.codegen import Bundle, render_bundle
from service.pipeline.codegen.manifest import implemented, plan_following
from service.pipeline.codegen.request import (CODEGEN, CODEGEN_FILE, CodegenMode, codegen_request, generate_by_files,
                                              offline_codegen, offline_codegen_file)
from service.pipeline.compete import (Delivery, Entry, concat_predictions, install_outputs, merit_against, rank,
                                      stack_test_predictions, verify_code, with_stack, write_predictor_code)
from service.pipeline.debugger import (DEBUG, PatchError, apply_patch, debug_context, debug_request,
                                       offline_debug, unified_diff)
from service.pipeline.execute import OUTPUT_FILES, SandboxSettings
from service.pipeline.nodes import NodeRunner
from service.pipeline.progress import ProgressCallback, ProgressEvent
from service.pipeline.report import write_report
from service.pipeline.rundir import RunDir
from service.pipeline.search import (IMPROVE, Node, SearchTree, apply_change, improve_context, improve_request,
                                     offline_improve, validation_table)
from service.pipeline.selection import HEADLINE, Selection, prepare_selection
from service.pipeline.verdict import build_verdict

Status = Literal["validated", "failed"]
FINAL_OUTPUTS = OUTPUT_FILES
FINISH_SECONDS = 45.0  # kept back for competition, delivery, scoring and the report


class PipelineError(CellForgeError, RuntimeError):
    """The design run could not proceed (bad arguments, a replay that does not match its record)."""


class DesignSettings(BaseModel):
    """The arguments of a design run (saved as run.json; `replay` re-reads them)."""

    data: Path
    task: str = Field(min_length=1)
    out: Path
    seed: int = Field(0, ge=0)
    max_attempts: int = Field(4, ge=1, le=50, description="sandbox runs of one draft, its debugging included")
    max_minutes: float = Field(DEFAULT_MAX_MINUTES, gt=0,
                               description="wall-clock budget of the whole design from its start (profile, split, "
                                           "sandboxes, scoring, report); the improve loop starts a step only when "
                                           "its projection fits; the LLM's time is not counted against it")
    max_rounds: int = Field(4, ge=1, le=20)
    sandbox: BackendKind = BackendKind.DOCKER
    gpus: int = Field(0, ge=0)
    image: str | None = None
    runtime: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                                description="container runtime of docker sandboxes (runsc: gVisor)")
    tenant: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                               description="the tenant of a service job: every sandbox of the run is labelled with it")
    memory: str = Field("4g", description="sandbox memory, Docker-style ('512m', '4g')")
    cpus: float = Field(2.0, gt=0, le=256, description="sandbox CPUs")
    max_genes: int | None = Field(None, ge=10, description="cap on the genes kept by the split")
    candidates: int = Field(1, ge=1, le=7, description="draft plans (the discussion's + variants)")
    max_nodes: int | None = Field(None, ge=0, le=100, description="cap on the improve steps after the first working "
                                                                  "model (default: none, the time budget decides)")
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="share of the groups held out for validation")
    cv_folds: int = Field(3, ge=2, le=10, description="folds when the validation fold is too small to decide "
                                                      "(unseen cell types: one per training cell type up to 8)")
    held_out_context: str | None = Field(None, description="unseen-context splits: the context to hold out "
                                                           "(default: one drawn with the seed)")
    # The dataset's columns, as `cellforge data profile/split` take them (default: detected).
    perturbation_key: str | None = Field(None, description="obs column of the perturbation")
    control: str | None = Field(None, description="control label of the perturbation column")
    context_key: str | None = Field(None, description=f"obs column of the cell type / context ({POOLED!r}: "
                                                      "none, pool every cell)")
    dose_key: str | None = Field(None, description="obs column of the dose")
    scheme: Scheme | None = Field(None, description="the split scheme (default: the task analysis' choice)")
    split: Path | None = Field(None, description="a split directory prepared by `cellforge data split`, used "
                                                 "instead of splitting here (its scheme and columns apply)")

    @field_validator("memory")
    @classmethod
    def _size(cls, value: str) -> str:
        try:
            parse_size(value, "memory")
        except SpecError as exc:
            raise ValueError(str(exc).removeprefix("memory: ")) from None
        return value

    def data_keys(self) -> dict[str, str | None]:
        """The column options of `profile_dataset` / `make_split`."""
        return {"perturbation_key": self.perturbation_key, "control": self.control, "context_key": self.context_key,
                "dose_key": self.dose_key}

    def sandbox_settings(self, provider: SandboxProvider | None = None) -> SandboxSettings:
        return SandboxSettings(backend=self.sandbox, image=self.image, gpus=self.gpus, cpus=self.cpus,
                               memory=self.memory, runtime=self.runtime, tenant=self.tenant, provider=provider)


@dataclass
class DesignResult:
    run_dir: Path
    status: Status
    metrics: dict[str, Any]
    attempts: list[Node] = field(default_factory=list)


def pipeline_handlers() -> dict[str, Any]:
    """The offline backend's handlers: the agents' plus code generation, the debugger's and the search's rules."""
    return {**agent_handlers(), CODEGEN: offline_codegen, CODEGEN_FILE: offline_codegen_file, DEBUG: offline_debug,
            IMPROVE: offline_improve}


def _with_seed(plan: Plan, seed: int) -> Plan:
    return plan.model_copy(update={"training": plan.training.model_copy(update={"seed": seed})})


def _discussion_progress(on_progress: ProgressCallback):
    def emit(event: DiscussionEvent) -> None:
        on_progress(ProgressEvent("discussion", event.message, round=event.round))
    return emit


class Search:
    """Drafts, their debugging and the improve loop over one run's validation folds."""

    def __init__(self, runner: NodeRunner, llm: Backend, settings: DesignSettings, primary: str, scheme: str,
                 baselines: dict[str, Any], improve_calls: int | None, codegen: CodegenMode = "edits",
                 recorded_skips: set[tuple[str, int]] | None = None) -> None:
        self.runner, self.llm, self.settings, self.primary, self.scheme = runner, llm, settings, primary, scheme
        self.codegen = codegen
        self.baselines = baselines  # name -> PooledScore on validation
        merit = merit_against([Entry("baseline", name, score, {}) for name, score in baselines.items()], primary)
        self.tree = SearchTree(primary, merit=lambda node: merit(runner.pooled(node)))
        self.improve_calls = improve_calls  # a replay asks no more than the record holds
        self.recorded_skips = recorded_skips or set()  # a replay's: (step, after_node) the record skipped

    def _ask(self, request: LLMRequest[R]) -> R:
        """The LLM's answer; the time it took is given back to the sandboxes' time budget."""
        began = self.runner.clock()
        try:
            return self.llm.ask(request)
        finally:
            self.runner.deadline += self.runner.clock() - began

    def _new(self, **fields) -> Node:
        return self.tree.add(Node(id=len(self.tree.nodes) + 1, **fields))

    def _history(self, node: Node) -> list[dict[str, Any]]:
        """The attempts on this draft so far (root first), what each patch did and whether it applied."""
        chain = [n for n in self.tree.nodes if n.id in self.tree.path_to(node)]
        out = []
        for n in chain:
            entry: dict[str, Any] = {"attempt": n.id, "kind": n.kind, "label": n.label, "failure": n.failure}
            if n.patch is not None:
                entry["patch"] = {"failure_class": n.patch.failure_class, "diagnosis": n.patch.diagnosis,
                                  "edits": [e.model_dump(exclude_none=True) for e in n.patch.edits],
                                  "config_changes": n.patch.config_changes,
                                  "applied": n.patch_error is None, "error": n.patch_error}
            out.append(entry)
        return out

    def _debug(self, node: Node, depth_limit: int, budgeted: bool = False) -> Node:
        """Debug children of a failed node until one works or the limits are reached (`budgeted`: an improve
        node's, each only when projected to fit the budget). Whatever the debugger does (no answer, a patch that
        does not apply), the search goes on to the finish."""
        while not node.working and node.debug_depth < depth_limit and self.runner.time_left() > 10 and \
                (not budgeted or self._fits("debug", node.id)):
            result = self.runner.results[node.id]
            self.runner.emit(ProgressEvent("debug", node.failure or "failed", attempt=node.id))
            folder = self.runner.node_dir(node)
            plan = json.loads(node.plan.model_dump_json(exclude={"provenance", "rationale"}))
            context = debug_context(node.id, result.failure, result.problems, node.bundle, self._history(node), plan)
            try:
                patch = self._ask(debug_request(context, node.bundle))
            except LLMError as exc:  # re-asks (and the rules) spent, or the endpoint gone: the run goes on
                what = "patch did not apply" if isinstance(exc, LLMInvalidReply) else "the debugger gave no patch"
                node.patch_error = f"{what}: {exc}"
                self.runner.rd.write_json(folder / "patch_error.json", {"error": node.patch_error})
                self.runner.emit(ProgressEvent("debug", node.patch_error, attempt=node.id))
                self.runner.save(node)
                break
            node.patch = patch
            self.runner.rd.write_json(folder / "diagnosis.json", patch.model_dump(mode="json"))
            if patch.give_up:
                self.runner.emit(ProgressEvent("debug", f"no fix: {patch.diagnosis}", attempt=node.id))
                break
            try:
                bundle = apply_patch(node.bundle, patch)
            except PatchError as exc:
                node.patch_error = f"patch did not apply: {exc}"
                self.runner.rd.write_json(folder / "patch_error.json", {"error": str(exc)})
                self.runner.emit(ProgressEvent("debug", node.patch_error, attempt=node.id))
                self.runner.save(node)
                break
            (folder / "patch.diff").write_text(unified_diff(node.bundle, bundle))
            self.runner.emit(ProgressEvent("debug", f"patch applied ({patch.failure_class}): {patch.diagnosis}",
                                           attempt=node.id))
            child = self._new(parent=node.id, kind="debug", label=f"fix: {patch.failure_class}",
                              candidate=node.candidate,
                              plan=plan_following(node.plan, bundle.files, set(patch.config_changes)),
                              bundle=bundle, debug_depth=node.debug_depth + 1,
                              change={"debug": patch.model_dump(mode="json")})
            self.runner.run(child, self.tree)
            node = child
        return node

    def drafts(self, candidates: list[tuple[str, Plan]]) -> None:
        for index, (label, plan) in enumerate(candidates, 1):
            if self.runner.time_left() <= 10:
                self.runner.emit(ProgressEvent("debug", "time budget spent"))
                break
            self.runner.emit(ProgressEvent("codegen", f"candidate {index}/{len(candidates)} ({label}): "
                                                      f"{plan.architecture.perturbation_encoder} encoder, "
                                                      f"base {plan.architecture.base_predictor}"))
            generated = self._generate(index, plan)
            if generated is None:
                continue
            plan, bundle = generated
            node = self._new(parent=None, kind="draft", label=label, candidate=index, plan=plan, bundle=bundle)
            self.runner.run(node, self.tree)
            self._debug(node, self.settings.max_attempts - 1)

    def _generate(self, index: int, plan: Plan) -> tuple[Plan, Bundle] | None:
        """The candidate's code (and its plan): the model's, in the configured mode. When no code comes back
        for a plan with custom components (the model's replies never declared them and the offline rules
        cannot write them), the vetted design runs instead, said so: offline code keeps the vetted space."""
        vetted = render_bundle(plan)
        try:
            if self.codegen == "files":
                return plan, generate_by_files(self._ask, plan, vetted)
            return plan, self._ask(codegen_request(plan, vetted)).applied(vetted)
        except (LLMError, ValueError) as exc:  # no code for this candidate; the others, and the finish, go on
            self.runner.rd.write_json(self.runner.rd.root / f"codegen_error_{index}.json", {"error": str(exc)})
            if not plan.architecture.custom_components:
                self.runner.emit(ProgressEvent("codegen", f"candidate {index}: no code generated: {exc}"))
                return None
        names = ", ".join(c.name for c in plan.architecture.custom_components)
        self.runner.emit(ProgressEvent("codegen", f"candidate {index}: the custom component(s) {names} were not "
                                                  "implemented; the vetted design runs without them"))
        vetted_plan = plan.model_copy(update={"architecture": plan.architecture.model_copy(
            update={"custom_components": []})})
        return vetted_plan, render_bundle(vetted_plan)

    def _table(self, node: Node) -> dict[str, Any]:
        pooled = self.runner.results[node.id].pooled
        return validation_table(self.primary, pooled.summary, {n: s.summary for n, s in self.baselines.items()},
                                pooled.per_condition, {n: s.per_condition for n, s in self.baselines.items()},
                                self.runner.selection.mode)

    def _stop(self, reason: str, detail: str, **numbers: Any) -> None:
        """The improve loop ends: why, in the tree (search.json, the report) and in the progress."""
        self.tree.stopped = {**numbers, "reason": reason, "detail": detail}
        self.runner.emit(ProgressEvent("improve", f"search stops: {detail}"))

    def _fits(self, step: str, after: int) -> bool:
        """Whether the next `step` (an improve node, or the debug child of a failed one) is projected to end
        before the budget's finish reserve; one that is not is recorded as skipped. A replay skips the steps its
        record skipped and runs the others (its timings are another machine's): the record decides there."""
        if self.improve_calls is not None:
            if (step, after) not in self.recorded_skips:
                return True
            self.tree.skipped.append({"after_node": after, "step": step, "reason": "budget",
                                      "detail": f"budget: skipped as in the recorded run ({step} after node {after})"})
            return False
        forecast = self.runner.forecast(step)
        if forecast.fits:
            return True
        self.tree.skipped.append({"after_node": after, **forecast.to_json()})
        return False

    def improve(self, reserve: float) -> None:
        """Changes to the best node so far, each kept only if validation improves, while the next one is
        projected to fit in the time budget (`budget`), less `reserve` for the finish; up to max_nodes when set."""
        self.runner.reserve = reserve  # an improve node's sandbox runs end before the finish's reserve too
        try:
            self._improve()
        finally:
            self.runner.reserve = 0.0  # the finish's own runs (a CV search's run on the whole split) use it

    def _improve(self) -> None:
        steps = 0
        while True:
            parent = self.tree.best()
            if parent is None:
                self._stop("no_working_node", "no working model to improve")
                return
            if self.settings.max_nodes is not None and steps >= self.settings.max_nodes:
                self._stop("max_nodes", f"{steps} improve step(s): the --max-nodes cap")
                return
            if self.improve_calls is not None and steps >= self.improve_calls:
                self._stop("replay", f"the recorded run's {self.improve_calls} improve request(s) replayed")
                return
            if not self._fits("improve", self.tree.nodes[-1].id):
                skipped = self.tree.skipped[-1]
                self._stop("budget", skipped["detail"],
                           **{k: skipped[k] for k in ("projected_s", "left_s", "reserve_s") if k in skipped})
                return
            steps += 1
            try:
                change = self._ask(improve_request(improve_context(parent, self.tree, self._table(parent),
                                                                   self.scheme)))
            except LLMError as exc:
                self._stop("llm_error", f"no change proposed: {exc}")
                return
            if change.stop:
                self._stop("no_change", change.rationale)
                return
            self.runner.emit(ProgressEvent("improve", f"node {len(self.tree.nodes) + 1}: {change.label} "
                                                      f"({change.rationale})"))
            try:
                plan, bundle = apply_change(parent.plan, parent.bundle, change)
                if bundle == parent.bundle:
                    raise PatchError("the change leaves the bundle as it was")
            except PatchError as exc:
                node = self._new(parent=parent.id, kind="improve", label=change.label, candidate=parent.candidate,
                                 plan=parent.plan, bundle=parent.bundle, change=change.model_dump(mode="json"),
                                 status="rejected", failure=str(exc))
                self.runner.save(node)
                continue
            code_changed = any(bundle.files.get(n) != parent.bundle.files.get(n) for n in bundle.files
                               if n != "config.json")
            node = self._new(parent=parent.id, kind="improve", label=change.label, candidate=parent.candidate,
                             plan=plan, bundle=bundle, change=change.model_dump(mode="json"), tested=code_changed)
            (self.runner.node_dir(node) / "patch.diff").write_text(unified_diff(parent.bundle, bundle))
            self.runner.run(node, self.tree)
            self._debug(node, 1, budgeted=True)


def _codegen_mode(config: LLMConfig, replay_from: Path | None) -> CodegenMode:
    """The configured code generation mode; a replay asks its questions the way the recorded run did."""
    if replay_from is not None:
        try:
            recorded = json.loads((replay_from / "run.json").read_text())["llm"].get("codegen", "edits")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            recorded = "edits"  # a run recorded before the modes existed
        return "files" if recorded == "files" else "edits"
    return config.codegen


def _skips_recorded(replay_from: Path | None) -> set[tuple[str, int]]:
    """The steps the recorded run's time budget skipped: (step, after_node) from its search.json."""
    if replay_from is None:
        return set()
    try:
        skipped = json.loads((replay_from / "search.json").read_text()).get("skipped") or []
        return {(str(s["step"]), int(s["after_node"])) for s in skipped}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # a run recorded before the budget's record (or without a search.json)


def _improve_calls_recorded(replay_from: Path | None) -> int | None:
    if replay_from is None:
        return None
    return sum(1 for call in read_calls(replay_from / "llm_calls.jsonl") if call.kind == IMPROVE)


def _summaries(reports: dict[str, EvaluationReport]) -> dict[str, dict[str, float]]:
    return {name: report.summary for name, report in reports.items()}


DOCKER_HINT = "start Docker, or run without isolation on this machine with --sandbox local (Python: sandbox='local')"


def preflight(settings: DesignSettings) -> Split | None:
    """What would fail the run later, checked before any work: the Docker engine, its runtime and the sandbox
    image; a prepared split. Returns the prepared split (opened), if any."""
    prepared = None
    if settings.sandbox is BackendKind.DOCKER:
        import docker

        try:
            client = docker.from_env(timeout=10)
            client.ping()
        except docker.errors.DockerException as exc:
            raise PipelineError(f"the Docker engine is not reachable ({exc}); {DOCKER_HINT}") from None
        try:
            require_runtime(settings.runtime, client)  # a missing runtime would fail every attempt
            image = settings.image or (DEFAULT_GPU_IMAGE if settings.gpus else DEFAULT_CPU_IMAGE)
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                raise PipelineError(f"the sandbox image {image!r} is not built; build it with "
                                    f"`cellforge images build`, or {DOCKER_HINT}") from None
        finally:
            client.close()
    if settings.sandbox is BackendKind.RAY:
        _ray_preflight()
    if settings.split is not None:
        prepared = load_split(settings.split)
        missing = [name for name in TRUTH_FILES if not (prepared.path / name).is_file()]
        if missing:
            raise PipelineError(f"{prepared.path}: a split without its truth files ({', '.join(missing)}) cannot "
                                "score a design run; pass the directory `cellforge data split` wrote")
        if settings.scheme is not None and settings.scheme != prepared.info.scheme:
            raise PipelineError(f"--scheme {settings.scheme} contradicts the prepared split's scheme "
                                f"{prepared.info.scheme}; leave --scheme out with --split")
    return prepared


def _ray_preflight() -> None:
    """The Ray cluster ($RAY_ADDRESS) is reachable and has a node that hosts sandboxes."""
    import asyncio

    from sandbox.ray_backend import RayBackend

    health = asyncio.run(RayBackend().health())
    if not health.ok:
        raise PipelineError(f"the Ray sandboxes cannot run: {health.detail}")


def _data_keys(settings: DesignSettings, prepared: Split | None) -> dict[str, str | None]:
    """The column options; with a prepared split, those it was made with fill the ones not given."""
    keys = settings.data_keys()
    if prepared is not None:
        info = prepared.info
        made_with = {"perturbation_key": info.perturbation_key, "control": info.control_label,
                     "context_key": info.context_key or POOLED, "dose_key": info.dose_key}
        keys = {k: v if v is not None else made_with[k] for k, v in keys.items()}
    return keys


def copy_split(source: Path, target: Path) -> None:
    """A prepared split into the run directory (hard links where the file system allows)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES:
        try:
            os.link(source / name, target / name)
        except OSError:
            shutil.copy2(source / name, target / name)


def run_design(settings: DesignSettings, llm_config: LLMConfig | None = None, *,
               replay_from: Path | None = None, on_progress: ProgressCallback | None = None,
               handlers: dict[str, Any] | None = None, provider: SandboxProvider | None = None,
               clock: Callable[[], float] = time.monotonic) -> DesignResult:
    """Run the whole pipeline into `settings.out`; never raises for a model that fails to train
    (status `failed`), raises `PipelineError` / data and LLM errors for what stops the run itself.
    `handlers` replaces the offline backend's rules (default: `pipeline_handlers()`). Every sandbox of the
    run is leased from `provider` (a server's, for its tenant); by default from one `BackendProvider` of
    `settings.sandbox` made for the run and closed at its end: one backend for all its attempts. The time
    budget (`settings.max_minutes`) is measured on `clock` (monotonic seconds; a test may pass its own)."""
    if provider is not None:
        # The provider's backend is the one the sandboxes run on (recorded in run.json, checked by preflight).
        settings = settings.model_copy(update={"sandbox": provider.kind})
        return _run_design(settings, llm_config, replay_from, on_progress, handlers, provider, clock)
    with BackendProvider(settings.sandbox) as own:
        return _run_design(settings, llm_config, replay_from, on_progress, handlers, own, clock)


def _run_design(settings: DesignSettings, llm_config: LLMConfig | None, replay_from: Path | None,
                on_progress: ProgressCallback | None, handlers: dict[str, Any] | None,
                provider: SandboxProvider, clock: Callable[[], float]) -> DesignResult:
    emit = on_progress or (lambda event: None)
    prepared = preflight(settings)
    keys = _data_keys(settings, prepared)
    started = clock()
    rd = RunDir(settings.out).create()
    if rd.plan.exists() or rd.attempts.exists():
        raise PipelineError(f"{rd.root} already holds a run; choose a new --out directory")
    config = llm_config or LLMConfig()
    rd.write_json(rd.run_json, {"settings": json.loads(settings.model_dump_json()),
                                "llm": {"backend": config.backend, "model": config.model, "base_url": config.base_url,
                                        "codegen": _codegen_mode(config, replay_from)},
                                "replay_of": str(replay_from) if replay_from else None})
    llm = make_backend(config, handlers or pipeline_handlers(), rd.root, replay_from=replay_from,
                       on_tokens=lambda kind, n: emit(ProgressEvent("llm", f"{kind}: {n} tokens so far")))

    emit(ProgressEvent("profile", f"profiling {settings.data}"))
    profile = profile_dataset(settings.data, **keys)
    rd.write_json(rd.profile, profile.model_dump(mode="json"))
    if profile.context_candidates:
        # A cell-type column under another name would silently pool every cell type: a different task.
        raise PipelineError(f"{settings.data}: no context column under a known name, but obs column(s) "
                            f"{', '.join(profile.context_candidates)} look like cell types; pass --context-key "
                            f"{profile.context_candidates[0]} to use it, or --context-key {POOLED} to pool every cell")

    if profile.recommended_split is None and prepared is None and settings.scheme is None:
        raise PipelineError(f"{settings.data}: " + next(n for n in profile.notes if n.startswith(NOTHING_TO_HOLD_OUT)))

    emit(ProgressEvent("analysis", "framing the task"))
    asking = clock()
    analysis = analyse_task(profile, settings.task, llm)
    scheme = prepared.info.scheme if prepared is not None else settings.scheme
    if scheme is not None and scheme != analysis.split_scheme:
        emit(ProgressEvent("analysis", f"split scheme {scheme} (chosen by the user; the analysis proposed "
                                       f"{analysis.split_scheme})"))
        analysis = analysis.model_copy(update={"split_scheme": scheme})
    rd.write_json(rd.task_analysis, analysis.model_dump(mode="json"))

    emit(ProgressEvent("discussion", "experts discussing", round=1))
    discussion = run_discussion(analysis, profile, llm, rd.root, max_rounds=settings.max_rounds,
                                on_event=_discussion_progress(emit))
    plan = _with_seed(discussion.plan, settings.seed)
    # LLM time has its own budget (the LLM config's total_minutes): a slow endpoint does not eat the sandboxes'.
    deadline = started + settings.max_minutes * 60 + (clock() - asking)
    rd.plan.write_text(plan.model_dump_json(indent=1) + "\n")

    n_genes = plan.preprocessing.n_hvg if settings.max_genes is None else min(plan.preprocessing.n_hvg,
                                                                             settings.max_genes)
    if prepared is not None:
        emit(ProgressEvent("split", f"prepared {prepared.info.scheme} split {prepared.path} "
                                    f"(seed {prepared.info.seed}, {len(prepared.info.genes)} features)"))
        copy_split(prepared.path, rd.split)
    else:
        emit(ProgressEvent("split", f"{analysis.split_scheme} split, seed {settings.seed}, {n_genes} genes"))
        make_split(settings.data, analysis.split_scheme, settings.seed, rd.split, **keys,
                   n_genes=n_genes if n_genes < profile.n_genes else None, val_fraction=settings.val_fraction,
                   cv_folds=settings.cv_folds, context=settings.held_out_context,
                   on_progress=lambda msg: emit(ProgressEvent("split", msg)))
    preparing = clock()
    selection = prepare_selection(rd, emit)
    emit(ProgressEvent("split", f"selection by {selection.describe()}"))
    test_eval = Evaluator(rd.split, "test")
    # The finish repeats this kind of work on test (baselines run and scored, the predictions scored).
    scoring = clock() - preparing
    primary = plan.evaluation.primary_metric
    baseline_val = {name: selection.baseline_score(name) for name in selection.baselines}
    mean_baseline = baseline_val["mean_delta"].get(primary) if "mean_delta" in baseline_val else None

    runner = NodeRunner(rd, selection, test_eval, primary, settings.sandbox_settings(provider), deadline, started, emit,
                        mean_baseline, clock)
    search = Search(runner, llm, settings, primary, analysis.split_scheme, baseline_val,
                    _improve_calls_recorded(replay_from), _codegen_mode(config, replay_from), _skips_recorded(replay_from))
    candidates = candidate_plans(plan, settings.candidates)
    # A draft's runs end before the finish's own work (not its checking run: a draft is worth more than that).
    runner.reserve = FINISH_SECONDS + scoring
    search.drafts(candidates)
    # Room for the finish (test baselines and scores as long as the selection's took, cell-eval and the report; a
    # sandbox run checks delivered baseline/stack code), and in a cross-validated search for the best node's run
    # on the whole split.
    one_run = runner.mean_run_seconds()
    reserve = FINISH_SECONDS + scoring + one_run + (1.5 * one_run if selection.mode == "cv" else 0)
    search.improve(reserve)
    tree = search.tree
    if len(candidates) > 1:
        rd.write_json(rd.root / "candidates.json", [
            {"candidate": i, "label": label, "plan": json.loads(p.model_dump_json()),
             "attempts": [n.id for n in tree.nodes if n.candidate == i and n.kind != "improve"],
             "val_scores": [n.score for n in tree.nodes if n.candidate == i and n.kind != "improve" and n.validation]}
            for i, (label, p) in enumerate(candidates, 1)])

    result = _finish(rd, settings, selection, test_eval, tree, runner, baseline_val, primary, emit)
    metrics = result["metrics"]
    metrics.update({"seconds": round(clock() - started, 1),
                    "llm_usage": summarize_run(rd.root).model_dump(mode="json")})
    rd.write_json(rd.metrics, metrics)
    emit(ProgressEvent("report", "writing report.html"))
    write_report(rd, result["plan"] or plan, analysis, discussion, metrics, tree)
    emit(ProgressEvent("done", f"{metrics['status']}: {metrics['verdict']['summary']} {rd.root}"))
    return DesignResult(rd.root, metrics["status"], metrics, tree.nodes)


def _finish(rd: RunDir, settings: DesignSettings, selection: Selection, test_eval: Evaluator, tree: SearchTree,
            runner: NodeRunner, baseline_val: dict[str, Any], primary: str, emit: ProgressCallback) -> dict[str, Any]:
    """Competition, delivery, test scores, verdict: metrics.json's content (and the delivered plan)."""
    best = tree.best()
    designed_test: Path | None = None
    designed_failure = None
    if best is not None:  # plan.json describes the best designed model (metrics' "model")
        rd.plan.write_text(best.plan.model_dump_json(indent=1) + "\n")
        out, designed_failure = runner.test_outputs(best)
        designed_test = out / "predictions.h5ad" if out is not None else None
    emit(ProgressEvent("compete", "designed model, baselines and their stack on validation"))
    entries = [Entry("baseline", name, score, {f.name: f.baselines[name] for f in selection.folds})
               for name, score in baseline_val.items()]
    if best is not None and designed_test is not None:
        entries.append(Entry("designed", "designed", runner.pooled(best), runner.val_predictions(best)))
    entries = with_stack(selection, entries, primary)
    ranked = rank(entries, primary)

    test_baselines = run_baselines(test_eval.task, "test")  # the evaluator's task: the training data read once
    baseline_reports = {name: test_eval.score(pred) for name, pred in test_baselines.items()}
    test_members: dict[str, ad.AnnData | Path] = {**test_baselines}
    if designed_test is not None:
        test_members["designed"] = designed_test
    delivery = _deliver(rd, settings, selection, test_eval, ranked, test_members, best, runner, emit)
    model_report = test_eval.score(designed_test) if designed_test is not None else None
    delivered_report = test_eval.score(delivery.test_predictions)

    emit(ProgressEvent("evaluate", "scoring test predictions and baselines"))
    status: Status = "validated" if best is not None else "failed"
    n_test = delivered_report.n_conditions
    not_competing = sorted(set(test_baselines) - set(baseline_val))
    verdict = build_verdict(
        status=status, primary=primary, delivered=delivery.entry.key, delivered_reason=delivery.reason,
        model_val=runner.pooled(best).summary if best is not None else None,
        model_test=model_report.summary if model_report else None,
        baselines_val={n: s.summary for n, s in baseline_val.items()}, baselines_test=_summaries(baseline_reports),
        model_rows=model_report.per_condition if model_report else None,
        baseline_rows={n: r.per_condition for n, r in baseline_reports.items()},
        delivered_val=delivery.entry.val.summary, delivered_test=delivered_report.summary,
        validation=selection.describe(), n_val_conditions=selection.n_conditions, n_test_conditions=n_test,
        not_competing=not_competing,
        test_groups=(selection.group_by, len(set(condition_groups(test_eval.truth.targets, selection.group_by)))))
    verdict.warnings += selection.warnings
    if designed_failure:
        verdict.warnings.append(f"the best designed node did not run on the whole split: {designed_failure}")
    metrics: dict[str, Any] = {
        "primary_metric": primary,
        "status": status,
        "verdict": verdict.model_dump(mode="json"),
        "delivered": {"kind": delivery.entry.kind, "name": delivery.entry.name, "key": delivery.entry.key,
                      "reason": delivery.reason, "weights": delivery.entry.weights or None,
                      "val": delivery.entry.val.summary, "test": delivered_report.summary,
                      "code_check": delivery.code_check},
        "baselines": _summaries(baseline_reports),
        "ceiling": delivered_report.ceiling,
        "n_test_conditions": n_test,
        "val": {**selection.to_json(), "score": best.score if best else None, "mean_baseline": runner.mean_baseline,
                "summary": runner.pooled(best).summary if best else {},
                "candidates": {e.key: {m: e.score(m) for m in dict.fromkeys((primary, *HEADLINE))} for e in ranked}},
        "search": {**{k: v for k, v in tree.to_json(delivery.entry.key).items() if k != "nodes"},
                   "nodes": len(tree.nodes), "improve_nodes": sum(n.kind == "improve" for n in tree.nodes)},
        "chosen_attempt": best.id if best else None,
        # What the chosen node's code declares it implements (custom components included), as checked.
        "implements": implemented(best.bundle.files) if best else {},
        "attempts": len(tree.nodes),
        "chosen_candidate": best.candidate if best else None,
        "candidates": len({n.candidate for n in tree.nodes}),
    }
    if model_report is not None:
        metrics.update({"model": model_report.summary, "model_normalized": model_report.normalized,
                        "per_condition": model_report.per_condition})
    metrics["delivered"]["per_condition"] = delivered_report.per_condition
    metrics["baselines_per_condition"] = {n: r.per_condition for n, r in baseline_reports.items()}
    emit(ProgressEvent("evaluate", "scoring with cell-eval"))
    metrics["cell_eval"] = _cell_eval(test_eval, metrics, designed_test, delivery, test_baselines)
    rd.write_json(rd.search, tree.to_json(delivery.entry.key))
    return {"metrics": metrics, "plan": best.plan if best is not None else None}


def _cell_eval(test_eval: Evaluator, metrics: dict[str, Any], designed_test: Path | None, delivery: Delivery,
               test_baselines: dict[str, ad.AnnData]) -> dict[str, Any]:
    """cell-eval's scores of the designed model, the delivered predictor and the best test baseline on the
    primary metric (rows named as the report names them; each set costs seconds, its DE test included); the
    delivered predictor's per-condition values join its per-condition rows."""
    named: dict[str, ad.AnnData | Path] = {}
    if designed_test is not None:
        named["designed model"] = designed_test
    if delivery.entry.kind != "designed":
        named[f"delivered: {delivery.entry.key}"] = delivery.test_predictions
    best = metrics["verdict"]["metrics"].get(metrics["primary_metric"], {}).get("best_baseline_test")
    if best in test_baselines:
        named[best] = test_baselines[best]
    block, reports = cell_eval_block(test_eval.cell_eval, named)
    delivered = reports.get("designed model" if delivery.entry.kind == "designed" else f"delivered: {delivery.entry.key}")
    if delivered is not None:
        for row in metrics["delivered"]["per_condition"]:
            row.update({f"cell-eval {m}": v for m, v in delivered.per_condition.get(row["condition"], {}).items()})
    return block


def _delivery_reason(winner: Entry, runner_up: Entry | None, primary: str) -> str:
    """Why the winner is delivered, on both headline metrics (the ranking weighs both)."""
    metrics = list(dict.fromkeys((primary, *HEADLINE)))

    def scores(entry: Entry) -> str:
        return ", ".join(f"{m} {v:.4f}" for m in metrics if (v := entry.score(m)) is not None) or "no scores"

    if runner_up is None:
        return f"only candidate ({scores(winner)})"
    return f"best on validation ({scores(winner)}; next: {runner_up.key} {scores(runner_up)})"


def _deliver(rd: RunDir, settings: DesignSettings, selection: Selection, test_eval: Evaluator, ranked: list[Entry],
             test_members: dict[str, ad.AnnData | Path], best: Node | None, runner: NodeRunner,
             emit: ProgressCallback) -> Delivery:
    """Install the validation winner in the run directory: code/, predictions.h5ad (test),
    val_predictions.h5ad (its out-of-fold validation predictions), model.pt and logs."""
    winner = ranked[0]
    runner_up = ranked[1] if len(ranked) > 1 else None
    reason = _delivery_reason(winner, runner_up, runner.primary)
    emit(ProgressEvent("deliver", f"delivering {winner.key}: {reason}"))
    if rd.code.exists():
        shutil.rmtree(rd.code)
    concat_predictions(winner.val_predictions).write_h5ad(rd.val_predictions)
    if winner.kind == "designed":
        out, _ = runner.test_outputs(best)
        shutil.copytree(runner.node_dir(best) / "code", rd.code)
        install_outputs(out, rd.root, tuple(n for n in FINAL_OUTPUTS if n != "val_predictions.h5ad"))
        return Delivery(winner, reason, rd.predictions, {"ran": True, "matches": True, "node": best.id})
    if winner.kind == "baseline":
        predictions = test_members[winner.name]
    else:
        predictions = stack_test_predictions(winner.weights, test_eval, test_members)
    predictions.write_h5ad(rd.predictions)
    write_predictor_code(winner, best.bundle if best is not None else None, rd.code)
    if runner.time_left() < 30:
        check = {"ran": False, "failure": "no time left to run the delivered code"}
    else:
        check = verify_code(rd.code, selection.main_data, rd.root / "delivery", predictions, test_eval,
                            runner.sandbox, runner.time_left(), emit)
        if check.get("ran"):
            install_outputs(Path(check.pop("out")), rd.root, ("model.pt", "train_log.jsonl", "val_metrics.json"))
    return Delivery(winner, reason, rd.predictions, check)
