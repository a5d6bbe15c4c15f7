"""The `cellforge` command line. Each command group lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from . import data_cmd, design_cmd, images_cmd, sandbox_cmd, score_cmd, serve_cmd
from .output import JsonUsageErrors

app = typer.Typer(
    name="cellforge",
    help="Design, train and honestly score single-cell perturbation models in hardened sandboxes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    cls=JsonUsageErrors,
)

for _module in (images_cmd, sandbox_cmd, data_cmd, design_cmd, serve_cmd, score_cmd):
    _module.register(app)


def main() -> None:
    app()
