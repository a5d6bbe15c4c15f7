"""`cellforge images build|tag`: build the sandbox images offline, content-tagged and cached."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sandbox.images import ImageBuildError, build_image, image_tag

from .output import JsonOpt, err, fail

images_app = typer.Typer(help="Build the sandbox images offline (no registry needed).", no_args_is_help=True)


class Flavor(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


FlavorOpt = Annotated[Flavor, typer.Option("--flavor", help="cpu, or gpu (PyPI's CUDA build of torch).")]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base image; default python:3.11-slim if present or pullable, else debootstrap."),
]


@images_app.command("build")
def build(
    flavor: FlavorOpt = Flavor.cpu,
    base: BaseOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the content tag exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build cellforge-sandbox:<flavor> (and its content tag); a no-op when it is up to date."""
    try:
        with Progress(
            SpinnerColumn(), TextColumn("[bold]{task.fields[step]}[/] {task.description}"),
            TimeElapsedColumn(), console=err, transient=True,
        ) as progress:
            task = progress.add_task("", step=f"{flavor.value} image", total=None)

            def on_log(line: str) -> None:
                if line.startswith("Step "):
                    progress.update(task, step=line.split(":", 1)[0])
                progress.update(task, description=line[:100])

            result = build_image(flavor.value, base=base, force=force, on_log=on_log)
    except ImageBuildError as exc:
        fail(exc, json_out)
    verb = "built" if result.built else "up to date:"
    err.print(f"[green]{verb}[/] {result.tag} (alias {result.alias}, base {result.base}) in {result.seconds:.1f} s")
    if json_out:
        print(json.dumps({"ok": True, **dataclasses.asdict(result)}), flush=True)


@images_app.command("tag")
def tag(flavor: FlavorOpt = Flavor.cpu, base: BaseOpt = None, json_out: JsonOpt = False) -> None:
    """Print the content tag a build would produce now, without building."""
    try:
        content_tag = image_tag(flavor.value, base=base)
    except ImageBuildError as exc:
        fail(exc, json_out)
    print(json.dumps({"ok": True, "tag": content_tag}) if json_out else content_tag, flush=True)


def register(app: typer.Typer) -> None:
    """Add `cellforge images` to the top-level app."""
    app.add_typer(images_app, name="images")
