"""The code of a delivered predictor that is not a designed network: a baseline, or the validation-fitted
stack. The bundle carries CellForge's baselines module as the service runs it (copied from
`service/data`, which the sandbox image can import: numpy, pandas, scipy, scikit-learn, anndata), the
stack's weights in config.json and, when the designed model is a member, the designed bundle in
`designed/`. It follows the generated-code contract, so the service runs it in a sandbox like any other
bundle and checks that it reproduces the delivered predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

from service.pipeline.codegen import TEMPLATES, Bundle

DATA = Path(__file__).resolve().parents[1] / "data"
VENDORED = ("baselines.py", "chunks.py", "conditions.py", "errors.py", "metrics.py")
PACKAGE = "cellforge_baselines"
DESIGNED = "designed"
# The data errors derive from the service's error root, which the sandbox has no `service` package to
# import it from: it travels in the bundle too (it imports nothing), and errors.py imports it there.
ROOT_ERROR = Path(__file__).resolve().parents[1] / "errors.py"
ROOT_IMPORT = "from service.errors import CellForgeError"


def predictor_files(weights: dict[str, float], kind: str, description: str,
                    designed: Bundle | None = None) -> dict[str, str]:
    """Relative path -> text of the bundle of a predictor blending `weights` (member -> weight on its Δ)."""
    folder = TEMPLATES / "predictor"
    files = {name: (folder / name).read_text().replace("{description}", description)
             for name in ("model.py", "train.py", "test_model.py")}
    files["config.json"] = json.dumps({"kind": kind, "description": description, "weights": weights}, indent=1) + "\n"
    files[f"{PACKAGE}/__init__.py"] = ('"""CellForge\'s baselines as the service runs them (copied from '
                                       'service/data)."""\n')
    for name in VENDORED:
        files[f"{PACKAGE}/{name}"] = (DATA / name).read_text()
    if ROOT_IMPORT not in files[f"{PACKAGE}/errors.py"]:
        raise RuntimeError(f"service/data/errors.py no longer has {ROOT_IMPORT!r}: update the vendoring")
    files[f"{PACKAGE}/errors.py"] = files[f"{PACKAGE}/errors.py"].replace(ROOT_IMPORT,
                                                                          "from .root_error import CellForgeError")
    files[f"{PACKAGE}/root_error.py"] = ROOT_ERROR.read_text()
    if DESIGNED in weights:
        if designed is None:
            raise ValueError("the stack weighs the designed model but no designed bundle was given")
        files.update({f"{DESIGNED}/{name}": text for name, text in designed.files.items()})
    return files


def write_files(files: dict[str, str], directory: Path) -> Path:
    for name, text in sorted(files.items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return directory
