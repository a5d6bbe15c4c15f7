"""`cellforge images build|tag|lock`: build the sandbox images offline, content-tagged and cached;
lock the GPU image's CUDA torch to what the index serves."""

from __future__ import annotations

import dataclasses
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sandbox.gpu_lock import LockError, PackageIndex, lock_path, verify_lock, write_lock
from sandbox.derived_images import build_derived_image
from sandbox.images import IMAGES_DIR, ImageBuildError, build_image, image_tag

from .output import JsonOpt, err, fail

images_app = typer.Typer(help="Build the sandbox images offline (no registry needed).", no_args_is_help=True)


class Flavor(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


FlavorOpt = Annotated[Flavor, typer.Option("--flavor", help="cpu, or gpu (PyPI's CUDA build of torch).")]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base image; default python:3.11-slim if present or pullable, else debootstrap. "
                            "With --requirements: the image to extend (default cellforge-sandbox:<flavor>)."),
]


@images_app.command("build")
def build(
    flavor: FlavorOpt = Flavor.cpu,
    base: BaseOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the content tag exists.")] = False,
    requirements: Annotated[Path | None, typer.Option(
        "--requirements", "-r", dir_okay=False,
        help="Build cellforge-sandbox:<flavor> (or --base) plus these packages, as "
             "cellforge-sandbox:<flavor>-req-<hash>: wheels fetched on the host, installed offline.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build cellforge-sandbox:<flavor> (and its content tag); a no-op when it is up to date.

    With --requirements FILE, build a derived image that adds FILE's packages to it instead."""
    try:
        with Progress(
            SpinnerColumn(), TextColumn("[bold]{task.fields[step]}[/] {task.description}"),
            TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal,
        ) as progress:
            task = progress.add_task("", step=f"{flavor.value} image", total=None)

            def on_log(line: str) -> None:
                if not err.is_terminal:  # a log file gets the lines themselves
                    err.print(line, highlight=False, markup=False)
                if line.startswith("Step "):
                    progress.update(task, step=line.split(":", 1)[0])
                progress.update(task, description=line[:100])

            if requirements is not None:
                derived = build_derived_image(requirements, flavor.value, base=base, force=force, on_log=on_log)
            else:
                result = build_image(flavor.value, base=base, force=force, on_log=on_log)
    except ImageBuildError as exc:
        fail(exc, json_out)
    if requirements is not None:
        verb = "built" if derived.built else "up to date:"
        added = f", adds {', '.join(derived.added)}" if derived.added else ""
        err.print(f"[green]{verb}[/] {derived.tag} (base {derived.base}{added}) in {derived.seconds:.1f} s")
        if json_out:
            print(json.dumps({"ok": True, **dataclasses.asdict(derived)}), flush=True)
        return
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


@images_app.command("lock")
def lock(
    flavor: FlavorOpt = Flavor.gpu,
    torch: Annotated[str | None, typer.Option(
        "--torch", help="Limit torch, e.g. '<=2.14.1' (default: what pip's configured constraints allow).")] = None,
    check: Annotated[bool, typer.Option("--check", help="Only check the checked-in lock against the index.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Choose the newest CUDA torch whose whole nvidia-*/cuda-* set the index serves; pin it in
    images/gpu/torch-cuda.txt (metadata only: nothing is downloaded)."""
    if flavor is not Flavor.gpu:
        fail(ImageBuildError("only the gpu flavor has a torch lock (the cpu one pins torch's +cpu build)"), json_out)
    flavor_dir = IMAGES_DIR / flavor.value
    index = PackageIndex()
    try:
        with err.status(f"reading {index.url} metadata", spinner="dots"):
            pins = verify_lock(index, flavor_dir) if check else write_lock(
                flavor_dir, torch, index=index, log=lambda line: err.print(line, highlight=False))
    except LockError as exc:
        fail(exc, json_out)
    finally:
        index.close()
    torch_pin = pins[0]
    verb = "checked" if check else "locked"
    err.print(f"[green]{verb}[/] torch {torch_pin.version} and {len(pins) - 1} wheels in {lock_path(flavor_dir)}")
    if json_out:
        print(json.dumps({"ok": True, "lock": str(lock_path(flavor_dir)),
                          "pins": {p.name: p.version for p in pins}}), flush=True)


def register(app: typer.Typer) -> None:
    """Add `cellforge images` to the top-level app."""
    app.add_typer(images_app, name="images")
