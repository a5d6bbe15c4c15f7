"""Free architectures in LLM mode and code generation file by file.

The plan may carry components outside the design space (`architecture.custom_components`), which only the
deep-learning architect proposes and only LLM experts fill; code generation is asked to implement them
and to declare them in config.json's `implements.custom`, which the service checks like the other plan
fields; offline mode keeps the vetted space. Code generation may ask for one file per reply, each with its
own output cap. No code generation reply replaces the service's contract tests. The end-to-end test runs
the real `openai` client against the scripted server and real Docker sandboxes: a non-template
architecture is designed, debugged and validated."""

from __future__ import annotations

import json
import re

import pytest

from fake_llm_server import Reply

from agent_profiles import KNOCKOUT
from scripted_experts import RuleModel
from pydantic import ValidationError

from service.agents import Architecture, CustomComponent, Plan, analyse_task
from service.agents.discussion import proposal_check
from service.agents.experts import BIOLOGIST, DL_ARCHITECT
from service.agents.messages import ExpertProposal, FieldChoice
from service.agents.offline_experts import expert_proposal
from service.llm import LLMConfig, OfflineBackend, make_backend, read_calls
from service.pipeline import Bundle, PatchError, pipeline_handlers, render_bundle, run_design
from service.pipeline.codegen import CONTRACT_TESTS, EXTRA_TESTS
from service.pipeline.codegen.manifest import IMPLEMENTS, check_custom, check_implements, implemented
from service.pipeline.codegen.request import (WRITTEN_FILES, GeneratedBundle, codegen_request, file_tokens,
                                              generate_by_files)

FIELD = "architecture.custom_components"
ATTENTION = {"name": "perturbation_attention", "role": "perturbation_encoder",
             "description": "self-attention across tokens of the perturbation embedding, the context and the "
                            "control expression, so the response of a knockout can depend on the cell state",
             "interfaces": "net_input rows (n, in_dim) -> Δ residual (n, n_genes), zero before training"}


def _with_custom(plan: Plan, *components: dict) -> Plan:
    architecture = plan.architecture.model_copy(
        update={"custom_components": [CustomComponent.model_validate(c) for c in components]})
    return plan.model_copy(update={"architecture": architecture})


def _declare(bundle: Bundle, names: list[str], code: str = "") -> Bundle:
    config = bundle.config()
    config[IMPLEMENTS]["custom"] = names
    files = {**bundle.files, "config.json": json.dumps(config, indent=1)}
    if code:
        files["model.py"] = bundle.files["model.py"] + code
    return Bundle(files=files)


# --- the plan and the discussion --------------------------------------------------------------------


def _analysis():
    return analyse_task(KNOCKOUT, "Predict unseen CRISPR knockouts", OfflineBackend(pipeline_handlers()))


def test_offline_mode_keeps_the_vetted_space(knockout_plan):
    assert knockout_plan.architecture.custom_components == []
    assert knockout_plan.provenance[FIELD].expert == "dl_architect"  # the owner set it: to nothing
    context = {"facts": KNOCKOUT.model_dump(), "analysis": _analysis().model_dump(), "expert": "dl_architect",
               "round": 1, "previous": None, "critiques": []}
    assert expert_proposal(context).values()[FIELD] == []
    vetted = render_bundle(knockout_plan)
    assert vetted.config()[IMPLEMENTS]["custom"] == [] and check_implements(knockout_plan, vetted.files) == []


def test_only_the_architect_proposes_custom_components_and_each_is_checked(knockout_plan):
    analysis = _analysis()
    choice = FieldChoice(field=FIELD, value=[ATTENTION], argument="150 cells per condition, 3000 controls")
    assert choice.value == [ATTENTION]  # kept as JSON data in proposals, drafts and transcripts
    proposal = ExpertProposal(summary="attention", choices=[choice], confidence=0.8)
    proposal_check(DL_ARCHITECT, KNOCKOUT, analysis)(proposal)  # within the architect's remit
    with pytest.raises(ValueError, match=r"outside the biologist remit: \['architecture.custom_components'\]"):
        proposal_check(BIOLOGIST, KNOCKOUT, analysis)(proposal)
    with pytest.raises(ValidationError, match=r"rejected at 0\.role: Input should be 'perturbation_encoder'"):
        FieldChoice(field=FIELD, value=[{**ATTENTION, "role": "magic"}], argument="x")
    with pytest.raises(ValidationError, match="names must be unique"):
        Architecture.model_validate({**knockout_plan.architecture.model_dump(), "custom_components": [ATTENTION] * 2})


# --- the plan check -----------------------------------------------------------------------------------


def test_the_plan_check_asks_for_each_custom_component_declared_and_named_in_the_code(knockout_plan):
    plan = _with_custom(knockout_plan, ATTENTION)
    vetted = render_bundle(plan)
    assert any("does not declare it" in p and "perturbation_attention" in p for p in check_implements(plan, vetted.files))
    unnamed = _declare(vetted, ["perturbation_attention"])
    assert check_custom(plan, unnamed.files) == [
        "implements.custom declares 'perturbation_attention' but no module of the bundle names it (name the "
        "class or function that implements it after the component)"]
    named_in_a_test = Bundle(files={**unnamed.files, EXTRA_TESTS: "# perturbation_attention\n"})
    assert check_custom(plan, named_in_a_test.files) != []  # a test implements nothing
    done = _declare(vetted, ["perturbation_attention"], "\n\nclass perturbation_attention:\n    pass\n")
    assert check_implements(plan, done.files) == []
    assert implemented(done.files)[FIELD] == ["perturbation_attention"]
    extra = _declare(done, ["perturbation_attention", "graph_prior"])
    assert check_custom(plan, extra.files) == [
        "implements.custom declares ['graph_prior'], which the plan does not ask for (the plan's: "
        "['perturbation_attention'])"]
    assert check_custom(knockout_plan, done.files) != []  # declared, but this plan asks for none


# --- code generation ------------------------------------------------------------------------------------


def _backend(fake_llm, tmp_path, **config):
    values = dict(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x", max_attempts=1,
                  fallback=False)
    return make_backend(LLMConfig(**{**values, **config}), pipeline_handlers(), tmp_path)


def test_no_code_generation_reply_replaces_or_edits_the_contract_tests(fake_llm, tmp_path, knockout_plan):
    vetted = render_bundle(knockout_plan)
    with pytest.raises(ValueError, match=f"{CONTRACT_TESTS} cannot be replaced"):
        GeneratedBundle(files={CONTRACT_TESTS: "def test_nothing():\n    assert True\n"}).applied(vetted)
    # A reply that echoes the whole vetted bundle back, contract tests unchanged, is no replacement.
    echoed = GeneratedBundle(files=dict(vetted.files)).applied(vetted)
    assert echoed.files == vetted.files
    with pytest.raises(PatchError, match="contract tests and cannot be edited"):
        GeneratedBundle(edits=[{"path": CONTRACT_TESTS, "search": "def test_one_batch_overfit",
                                "replace": "def _skipped"}]).applied(vetted)
    # Through the model: the reply that replaces them goes back with the reason; the model adds its own.
    fake_llm.script(Reply(json.dumps({"files": {CONTRACT_TESTS: "def test_nothing():\n    assert True\n"}})),
                    Reply(json.dumps({"files": {EXTRA_TESTS: "def test_mine():\n    assert True\n"}})))
    bundle = _backend(fake_llm, tmp_path).ask(codegen_request(knockout_plan, vetted)).applied(vetted)
    assert bundle.files[CONTRACT_TESTS] == vetted.files[CONTRACT_TESTS] and EXTRA_TESTS in bundle.files
    assert f"{CONTRACT_TESTS} cannot be replaced" in fake_llm.requests[1].messages[-1]["content"]


def test_code_generation_file_by_file(fake_llm, tmp_path, knockout_plan):
    """One question per file, each with an output cap sized to that file; a module that does not compile
    and a config.json without the custom component go back to the model with the reason."""
    plan = _with_custom(knockout_plan, ATTENTION)
    vetted = render_bundle(plan)
    model = vetted.files["model.py"] + "\n\nclass PerturbationAttention:  # perturbation_attention\n    pass\n"
    config = json.loads(vetted.files["config.json"])
    steps = []
    for name in WRITTEN_FILES:
        if name == "model.py":
            steps += [Reply(json.dumps({"content": model.replace("pass\n", "pass(\n")})),
                      Reply(json.dumps({"content": model}))]
        elif name == "config.json":
            steps.append(Reply(json.dumps({"keep": True})))
            config[IMPLEMENTS]["custom"] = ["perturbation_attention"]
            steps.append(Reply(json.dumps({"content": json.dumps(config, indent=1)})))
        else:
            steps.append(Reply(json.dumps({"keep": True})))
    fake_llm.script(*steps)
    bundle = generate_by_files(_backend(fake_llm, tmp_path).ask, plan, vetted)

    assert bundle.files["model.py"] == model and check_implements(plan, bundle.files) == []
    assert {n: t for n, t in bundle.files.items() if n not in ("model.py", "config.json")} == \
        {n: t for n, t in vetted.files.items() if n not in ("model.py", "config.json")}
    bodies = [r.body for r in fake_llm.requests]
    files = [json.loads(b["messages"][1]["content"].split("Context (JSON):\n", 1)[1])["file"] for b in bodies]
    assert files == [n for n in WRITTEN_FILES for _ in range(2 if n in ("model.py", "config.json") else 1)]
    assert CONTRACT_TESTS not in files
    for body, name in zip(bodies, files, strict=True):  # each reply one file, with its own cap
        assert body["max_tokens"] == file_tokens(vetted.files[name])
    reasks = [b["messages"][-1]["content"] for b in bodies if len(b["messages"]) > 2]
    assert "model.py does not compile" in reasks[0]
    assert "does not declare it" in reasks[1] and "perturbation_attention" in reasks[1]
    calls = read_calls(tmp_path / "llm_calls.jsonl")
    assert [c.kind for c in calls] == ["codegen_file"] * len(WRITTEN_FILES)


# --- end to end -------------------------------------------------------------------------------------------

NET = re.compile(r"class ResidualMLP\(nn\.Module\):.*?(?=\n\ndef delta_loss)", re.S)
ATTENTION_NET = '''class PerturbationAttention(nn.Module):
    """perturbation_attention: the net input projected to `n_tokens` tokens of `width` (the perturbation
    embedding, the context and the control expression mixed), self-attention across them, mean-pooled to
    a Δ residual. The head starts at zero, so before training the model *is* the closed-form base."""

    def __init__(self, in_dim: int, n_genes: int, width: int, depth: int, dropout: float, n_tokens: int = 4):
        super().__init__()
        self.in_dim, self.n_tokens, self.width = in_dim, n_tokens, width
        heads = 4 if width % 4 == 0 else 1
        self.tokens = nn.Linear(in_dim, n_tokens * width)
        self.blocks = nn.ModuleList(nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
                                    for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.head = nn.Linear(width, n_genes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = TOKENS
        for attend, norm in zip(self.blocks, self.norms):
            h = norm(h + attend(h, h, h, need_weights=False)[0])
        return self.head(h.mean(dim=1))'''
BUGGY = "self.tokens(x).view(x.shape[0], self.width, self.n_tokens)"
FIXED = "self.tokens(x).view(x.shape[0], self.n_tokens, self.width)"


def attention_model(vetted: str) -> str:
    """model.py with the residual MLP replaced by an attention network written for the plan (one bug)."""
    text = NET.sub(lambda m: ATTENTION_NET.replace("TOKENS", BUGGY), vetted, count=1)
    assert text != vetted
    return text.replace("ResidualMLP", "PerturbationAttention")


class FreeArchitect(RuleModel):
    """The rules' experts, except that the architect designs an attention encoder; code generation writes
    model.py anew (with one bug) and declares the component; the debugger fixes the bug."""

    def __init__(self) -> None:
        super().__init__(spoil=self._architect)
        self.codegen: list[dict] = []
        self.debug: list[dict] = []

    @staticmethod
    def _architect(schema: str, context: dict, reply: dict, asked: int) -> str | None:
        if schema != "ExpertProposal" or context["expert"] != "dl_architect":
            return None
        choices = [c for c in reply["choices"] if c["field"] != FIELD]
        choices.append({"field": FIELD, "value": [ATTENTION], "argument": "knockouts act through the cell "
                        "state; 3 cell types with their own controls: attention mixes them per condition"})
        return json.dumps({**reply, "choices": choices})

    def __call__(self, body: dict) -> str:
        system = body["messages"][0]["content"]
        schema = re.search(r"JSON schema \((\w+)\)", system).group(1)
        if schema not in ("GeneratedFile", "DebugPatch"):
            return super().__call__(body)
        context = json.loads(body["messages"][1]["content"].split("Context (JSON):\n", 1)[1])
        if schema == "DebugPatch":
            self.debug.append(context)
            return json.dumps({"failure_class": "code_error", "diagnosis": "the tokens are viewed as (n, width, "
                               "n_tokens); attention wants (n, n_tokens, width)",
                               "edits": [{"path": "model.py", "search": BUGGY, "replace": FIXED}]})
        self.codegen.append(body)
        if context["file"] == "model.py":
            return json.dumps({"content": attention_model(context["vetted_file"])})
        if context["file"] == "config.json":
            config = json.loads(context["vetted_file"])
            config[IMPLEMENTS]["custom"] = [c["name"] for c in context["plan"]["architecture"]["custom_components"]]
            return json.dumps({"content": json.dumps(config, indent=1)})
        return json.dumps({"keep": True})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_non_template_architecture_is_designed_debugged_and_validated(fake_llm, design_settings, tmp_path):
    model = FreeArchitect()
    fake_llm.script(*[Reply(model) for _ in range(80)])
    config = LLMConfig(backend="openai", base_url=fake_llm.base_url, model="fake-model", api_key="sk-x",
                       codegen="files", fallback=False)
    result = run_design(design_settings(tmp_path / "run", max_attempts=3, max_minutes=15), config)
    run = tmp_path / "run"

    # Designed: the architect's component is in the final plan, with the argument that set it.
    plan = Plan.model_validate_json((run / "plan.json").read_text())
    assert [c.name for c in plan.architecture.custom_components] == ["perturbation_attention"]
    assert plan.provenance[FIELD].expert == "dl_architect"
    architect = [s for name, s in model.seen if name == "ExpertProposal" and "Deep-learning architecture" in s]
    assert architect and "components outside the design space" in architect[0]

    # Generated file by file, asked to implement it; one bug, found by the service's contract tests.
    assert [json.loads(b["messages"][1]["content"].split("Context (JSON):\n", 1)[1])["file"]
            for b in model.codegen] == list(WRITTEN_FILES)
    assert "perturbation_attention" in model.codegen[0]["messages"][0]["content"]
    nodes = json.loads((run / "search.json").read_text())["nodes"]
    assert [n["label"] for n in nodes] == ["discussion plan", "fix: code_error"]
    assert nodes[0]["failure"].startswith("pytest failed") and "embed" in nodes[0]["failure"]
    assert len(model.debug) == 1 and "model.py" in model.debug[0]["files"]

    # Debugged and validated: the code that ran is the attention network, not the template's MLP.
    assert result.status == "validated" and result.metrics["chosen_attempt"] == 2
    code = run / "attempts" / "02" / "code"
    assert FIXED in (code / "model.py").read_text() and "ResidualMLP" not in (code / "model.py").read_text()
    assert (code / CONTRACT_TESTS).read_text() == render_bundle(plan).files[CONTRACT_TESTS]
    assert result.metrics["implements"][FIELD] == ["perturbation_attention"]
    report = (run / "report.html").read_text()
    assert f"<td>{FIELD}</td><td>perturbation_attention</td><td>perturbation_attention</td>" in report
    assert "<b>perturbation_attention</b> (perturbation_encoder)" in report
    assert json.loads((run / "run.json").read_text())["llm"]["codegen"] == "files"


def test_an_improve_step_does_not_render_custom_code_away(knockout_plan):
    from service.pipeline.search import Change, apply_change

    plan = _with_custom(knockout_plan, ATTENTION)
    bundle = _declare(render_bundle(plan), ["perturbation_attention"], "\n\nclass perturbation_attention:\n    pass\n")
    with pytest.raises(PatchError, match="implements no custom component"):
        apply_change(plan, bundle, Change(label="wider", rationale="r", plan_updates={"architecture.hidden_width": 512}))
    with pytest.raises(PatchError, match="implements no custom component"):
        apply_change(knockout_plan, render_bundle(knockout_plan),
                     Change(label="attention", rationale="r", plan_updates={FIELD: [ATTENTION]}))
    # Config changes still apply, and carry the plan along.
    new_plan, new_bundle = apply_change(plan, bundle, Change(label="lr", rationale="r", config_changes={"lr": 1e-4}))
    assert new_plan.training.lr == 1e-4 and check_implements(new_plan, new_bundle.files) == []


def test_a_replay_asks_for_code_the_way_the_recorded_run_did(tmp_path):
    from service.pipeline.run import _codegen_mode

    recorded = tmp_path / "recorded"
    recorded.mkdir()
    (recorded / "run.json").write_text(json.dumps({"llm": {"backend": "openai", "codegen": "files"}}))
    assert _codegen_mode(LLMConfig(), recorded) == "files"  # whatever this process is configured with
    assert _codegen_mode(LLMConfig(codegen="files"), None) == "files"
    (recorded / "run.json").write_text(json.dumps({"llm": {"backend": "openai"}}))  # before the modes existed
    assert _codegen_mode(LLMConfig(codegen="files"), recorded) == "edits"
