"""Code generation: a `Plan` → the bundle of the generated-code contract, assembled from vetted templates
under `templates/`: small modules a scientist can keep (`BUNDLE_FILES`):

- config.py: the typed `Config` that config.json is read into (unknown or missing keys are errors);
- data.py: the split's h5ad parts, the condition tables, the predictions format;
- components.py: the fitted closed-form components the plan chose (perturbation encoder, base
  predictor and its stack, the knock-down term, the expression input);
- state.py: fitted state as plain tensors and lists, so model.pt loads with `weights_only=True`;
- model.py: the residual network and `PerturbationModel` (`save`, `load`, `predict`);
- train.py: the training run (`python train.py --data DIR --out DIR --config config.json`);
- test_model.py: its tests; config.json: every hyperparameter, from the plan.

The plan shapes the code twice: components.py holds only the components the plan chose, with the plan's
choices written into their docstrings, and config.json carries every hyperparameter the code reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from service.agents import Plan
from service.errors import CellForgeError
from service.pipeline.codegen.manifest import IMPLEMENTS, implements_block, read_config

TEMPLATES = Path(__file__).parent / "templates"
BUNDLE_FILES = ("config.py", "data.py", "components.py", "state.py", "model.py", "train.py", "test_model.py",
                "config.json")
# Modules copied as they are; components.py and model.py are assembled and filled from the plan.
FIXED_MODULES = ("config.py", "data.py", "state.py", "train.py", "test_model.py")
CONTRACT_TESTS = "test_model.py"
EXTRA_TESTS = "test_extra.py"  # the model's own tests, beside the service's; optional
RIDGE_LAMBDAS = [0.01, 0.1, 1.0, 10.0, 100.0]

_ENCODER_TEMPLATE = {
    # A combination's genes are aggregated (sum or mean, from the plan) by the gene-embedding encoder.
    "gene_embedding": "gene_embedding.py",
    "gene_set": "gene_embedding.py",
    "onehot": "onehot.py",
    "drug_onehot_dose": "drug_dose.py",
    "drug_embedding_dose": "drug_dose.py",
    "drug_target_dose": "drug_target.py",
}


class CodegenError(CellForgeError, ValueError):
    """The plan asks for a component that has no vetted template."""


class Bundle(BaseModel):
    """The generated files by name (text)."""

    files: dict[str, str] = Field(description="file name -> full text; the names of BUNDLE_FILES")

    def write(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(self.files.items()):
            (directory / name).write_text(text)
        return directory

    @classmethod
    def read(cls, directory: str | Path) -> Bundle:
        directory = Path(directory)
        return cls(files={p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file()})

    def config(self) -> dict:
        """config.json as a dict; `CodegenError` saying why when it is not valid JSON."""
        config, why = read_config(self.files)
        if config is None:
            raise CodegenError(why or "config.json unreadable")
        return config


def config_from_plan(plan: Plan) -> dict:
    """Every number and choice train.py reads, taken from the plan, and the `implements` declaration."""
    a, t = plan.architecture, plan.training
    return {
        "perturbation_kind": plan.perturbation_kind,
        "split_scheme": plan.evaluation.split_scheme,  # the base's folds hold out what the split holds out
        "perturbation_encoder": a.perturbation_encoder,
        "gene_embedding_source": a.gene_embedding_source,
        "embedding_dim": a.embedding_dim,
        "combo_aggregation": a.combo_aggregation,
        "dose_encoding": a.dose_encoding,
        "context_embedding": a.context_embedding,
        "expression_encoder": a.expression_encoder,
        "residual_delta": a.residual_delta,
        "base_predictor": a.base_predictor,
        "hidden_width": a.hidden_width,
        "depth": a.depth,
        "dropout": a.dropout,
        "self_knockdown": plan.perturbation_kind in ("genetic", "genetic_combo")
        and plan.preprocessing.keep_perturbed_genes,
        "ridge_lambdas": RIDGE_LAMBDAS,
        "loss": plan.loss.model_dump(mode="json"),
        "optimizer": t.optimizer,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "batch_size": t.batch_size,
        "epochs": t.epochs,
        "early_stopping_patience": t.early_stopping_patience,
        "grad_clip": t.grad_clip,
        "seed": t.seed,
        "device": "auto",
        "cell_sample": 4000,
        IMPLEMENTS: implements_block(plan),  # what the code declares it implements, checked against the plan
    }


def _template(*parts: str) -> str:
    path = TEMPLATES.joinpath(*parts)
    if not path.exists():
        raise CodegenError(f"no vetted template {path.relative_to(TEMPLATES)}")
    return path.read_text()


def _fill(text: str, values: dict[str, object]) -> str:
    # Placeholders live in docstrings only; str.replace keeps the code's own braces untouched.
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    return text


def _values(plan: Plan) -> dict[str, object]:
    """The plan's choices the templates' docstrings name."""
    a = plan.architecture
    return {
        "source": a.gene_embedding_source,
        "dose_encoding": a.dose_encoding,
        "identity": "the drug's response signature on the top Δ components"
        if a.perturbation_encoder == "drug_embedding_dose" else "a one-hot vector",
        "expression_encoder": a.expression_encoder,
        "loss_kind": plan.loss.kind,
    }


def _summary(plan: Plan) -> str:
    a = plan.architecture
    return (f"{plan.perturbation_kind} perturbations, {a.perturbation_encoder} encoder (dim {a.embedding_dim}), "
            f"base {a.base_predictor}, residual MLP {a.depth}x{a.hidden_width} (dropout {a.dropout}), "
            f"loss {plan.loss.kind}")


def render_components(plan: Plan) -> str:
    """components.py: the fitted closed-form components the plan chose."""
    a = plan.architecture
    encoder = _ENCODER_TEMPLATE.get(a.perturbation_encoder)
    if encoder is None:
        raise CodegenError(f"perturbation encoder {a.perturbation_encoder!r} has no template")
    header = (f'"""The fitted closed-form components of the model, generated by CellForge from the plan: '
              f'{_summary(plan)}."""\n\n')
    dose = [_template("dose.py")] if a.dose_encoding else []
    body = [_template("common.py"), *dose, _template("encoders", encoder), _template("bases", f"{a.base_predictor}.py"),
            _template("expression.py")]
    return header + "\n\n".join(_fill(part, _values(plan)).rstrip() + "\n" for part in body)


def render_model(plan: Plan) -> str:
    """model.py: the residual network and the model that joins it to the components."""
    header = (f'"""The perturbation model, generated by CellForge from the plan: {_summary(plan)}.\n\n'
              f'Hyperparameters are read from config.json (config.py)."""\n\n')
    return header + _fill(_template("model.py"), _values(plan))


def render_bundle(plan: Plan) -> Bundle:
    """The vetted bundle for a plan (deterministic: the same plan gives byte-identical files)."""
    files = {name: _template(name) for name in FIXED_MODULES}
    files["components.py"] = render_components(plan)
    files["model.py"] = render_model(plan)
    files["config.json"] = json.dumps(config_from_plan(plan), indent=1) + "\n"
    return Bundle(files={name: files[name] for name in BUNDLE_FILES})
CONTRACT_TESTS = "test_model.py"
EXTRA_TESTS = "test_extra.py"  # the model's own tests, beside the service's; optional
