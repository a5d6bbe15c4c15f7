"""`cellforge design`, `cellforge replay` and `cellforge demo`: the design pipeline from the command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from sandbox.backend import BackendKind

from .choices import SchemeChoice
from .data_cmd import ContextKeyOpt, ControlOpt, DoseKeyOpt, KeyOpt
from .output import JsonOpt, emit_json, err, fail, tables

# The pipeline, agents and LLM SDK are imported inside the commands: they cost seconds at import,
# and every other `cellforge` command would pay for them.
if TYPE_CHECKING:
    from service.llm import LLMConfig
    from service.pipeline import DesignResult, DesignSettings

TABLE = ("pearson_delta_pert", "mse_top20_de", "pearson_delta", "mse")

SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the split and of training.")]
AttemptsOpt = Annotated[int, typer.Option("--max-attempts", help="Sandbox attempts (debugging included).")]
MinutesOpt = Annotated[float | None, typer.Option(
    "--max-minutes", help="Wall-clock budget of the whole design from its start, LLM time not counted (default 15): "
                          "the search starts a step only when it is projected to fit.")]
SandboxOpt = Annotated[BackendKind, typer.Option("--sandbox", help="docker (isolated) or local (not isolated).")]
RuntimeOpt = Annotated[str | None, typer.Option(
    "--runtime", help="Container runtime of the docker sandboxes: runsc (gVisor) or runc; default: the engine's.")]
MemoryOpt = Annotated[str | None, typer.Option(
    "--memory", help="Memory of each sandbox, Docker-style (512m, 4g); default 4g, on a server the tenant's.")]
CpusOpt = Annotated[float | None, typer.Option("--cpus", help="CPUs of each sandbox; default 2, on a server the "
                                                              "tenant's.")]
GpusOpt = Annotated[int, typer.Option("--gpus", help="GPUs given to the sandbox.")]
SplitDirOpt = Annotated[Path | None, typer.Option(
    "--split", help="A split directory prepared by `cellforge data split` (its scheme and columns apply).")]
SchemeOpt = Annotated[SchemeChoice | None, typer.Option(
    "--scheme", help="Split scheme (default: the one the task analysis chooses).")]
ContextOpt = Annotated[str | None, typer.Option(
    "--context", help="unseen-context: the cell type / context to hold out (default: drawn with the seed).")]


def _metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(title=f"test split: model vs baselines ({metrics.get('n_test_conditions', '?')} conditions)",
                  title_justify="left")
    table.add_column("predictor")
    for m in TABLE:
        table.add_column(m, justify="right")
    rows = {"designed model": metrics["model"]} if "model" in metrics else {}
    delivered = metrics.get("delivered") or {}
    if delivered and delivered.get("kind") != "designed":
        rows[f"delivered: {delivered['key']}"] = delivered.get("test", {})
    rows.update({**metrics.get("baselines", {}), "data ceiling": metrics.get("ceiling", {})})
    for name, scores in rows.items():
        table.add_row(name, *(f"{scores[m]:.4f}" if m in scores else "-" for m in TABLE))
    return table


def print_verdict(verdict: dict[str, Any] | None, json_out: bool = False) -> None:
    """The verdict first, in plain words: does the designed model beat the best baseline, what is delivered."""
    if not verdict:
        return
    from service.pipeline import Verdict, verdict_lines

    out = tables(json_out)

    v = Verdict.model_validate(verdict)
    lines = verdict_lines(v)
    colour = "green" if v.beats_baselines else "red"
    out.print(f"[bold {colour}]verdict:[/] {lines[0]}", highlight=False)
    for line in lines[1:]:
        out.print(f"  {line}", highlight=False, style="yellow" if line.startswith("warning") else None)


def _finish(result: DesignResult, json_out: bool) -> None:
    metrics = result.metrics
    out = tables(json_out)
    print_verdict(metrics.get("verdict"), json_out)
    if "baselines" in metrics:
        out.print(_metrics_table(metrics))
    beats = (metrics.get("verdict") or {}).get("beats_baselines")
    from service.pipeline.verdict import STATUS_MEANING

    meaning = STATUS_MEANING.get(result.status, "")
    for node in result.attempts:
        if node.patch_error:
            out.print(f"[yellow]attempt {node.id}: {escape(node.patch_error)}[/yellow]", highlight=False)
    out.print(f"status: [bold]{result.status}[/bold] ({meaning}); beats baselines: [bold]{beats}[/bold]; "
              f"delivered: {(metrics.get('delivered') or {}).get('key')}; run directory {result.run_dir}; "
              f"report {result.run_dir / 'report.html'}", highlight=False)
    if json_out:
        summary = {k: v for k, v in metrics.items() if k != "per_condition"}
        emit_json({"ok": result.status != "failed", "run_dir": str(result.run_dir),
                   "report": str(result.run_dir / "report.html"), **summary})
    if result.status == "failed":
        raise typer.Exit(1)


def _handled_errors() -> tuple[type[Exception], ...]:
    """Every explained failure: the service's errors and the sandbox layer's (which knows nothing of the service)."""
    from sandbox import SandboxError
    from service.errors import CellForgeError

    return (CellForgeError, SandboxError)


def _run(settings: DesignSettings, config: LLMConfig | None, replay_from: Path | None, json_out: bool) -> None:
    from service.pipeline import progress_display, run_design

    try:
        with progress_display(err) as progress:
            result = run_design(settings, config, replay_from=replay_from, on_progress=progress)
    except _handled_errors() as exc:
        fail(exc, json_out)
    _finish(result, json_out)


def _settings(**values: Any) -> DesignSettings:
    """The run's settings; a bad value is one line (`field: problem`), the whole check before any work."""
    from service.pipeline import DesignSettings

    return DesignSettings(**{k: v for k, v in values.items() if v is not None})


def design(
    data: Annotated[Path, typer.Option("--data", help="The dataset (.h5ad).", show_default=False)],
    task: Annotated[str, typer.Option("--task", help="What to predict, in plain language.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (default: runs/<data stem>).")] = None,
    llm: Annotated[str | None, typer.Option("--llm", help="offline (rules) or openai (compatible endpoint).")] = None,
    model: Annotated[str | None, typer.Option("--model", help="LLM model name.")] = None,
    base_url: Annotated[str | None, typer.Option("--base-url", help="OpenAI-compatible endpoint.")] = None,
    perturbation_key: KeyOpt = None,
    control: ControlOpt = None,
    context_key: ContextKeyOpt = None,
    dose_key: DoseKeyOpt = None,
    split: SplitDirOpt = None,
    scheme: SchemeOpt = None,
    context: ContextOpt = None,
    sandbox: SandboxOpt = BackendKind.DOCKER,
    memory: MemoryOpt = None,
    cpus: CpusOpt = None,
    gpus: GpusOpt = 0,
    runtime: RuntimeOpt = None,
    max_attempts: AttemptsOpt = 4,
    max_minutes: MinutesOpt = None,
    seed: SeedOpt = 0,
    candidates: Annotated[int, typer.Option("--candidates", help="Plans drafted; the best by validation is kept.")] = 1,
    max_nodes: Annotated[int | None, typer.Option(
        "--max-nodes", help="Cap on the improve steps of the design search after the first working model (0: none; "
                            "default: no cap, the time budget decides).")] = None,
    max_llm_minutes: Annotated[float | None, typer.Option(
        "--max-llm-minutes", help="Wall time all LLM calls may take together (not counted in --max-minutes); "
                                  "then the offline rules answer.")] = None,
    llm_timeout: Annotated[float | None, typer.Option("--llm-timeout", help="Seconds per LLM HTTP request.")] = None,
    llm_attempts: Annotated[int | None, typer.Option(
        "--llm-attempts", help="HTTP attempts per LLM completion, retries included.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Output cap per LLM completion.")] = None,
    token_budget: Annotated[int | None, typer.Option(
        "--token-budget", help="Tokens one LLM question may spend, re-asks and continuations included.")] = None,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", help="Stream LLM replies (live token progress; no read timeout on slow replies).")] = None,
    codegen: Annotated[str | None, typer.Option(
        "--codegen", help="LLM code generation: 'edits' (one reply of edits against the vetted bundle) or "
                          "'files' (one file per reply).")] = None,
    json_out: JsonOpt = False,
    server: Annotated[str | None, typer.Option("--server", help="Run as a job on a CellForge server (URL).")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="CELLFORGE_API_KEY",
                                                help="API key for --server.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run the design's sandboxes on a Ray cluster ('auto' or ray://HOST:PORT; its "
        "sandbox nodes offer the cellforge_sandbox resource and see the data at the same path).")] = None,
) -> None:
    """Design, train and score a model for a dataset and a task."""
    from service.llm import LLMConfig, LLMError
    from service.pipeline import PipelineError

    llm_flags = {"backend": llm, "model": model, "base_url": base_url, "total_minutes": max_llm_minutes,
                 "timeout": llm_timeout, "max_attempts": llm_attempts, "max_tokens": max_tokens,
                 "token_budget": token_budget, "stream": stream, "codegen": codegen}
    if server and runtime:
        fail(PipelineError("--runtime applies to sandboxes run here; a server chooses it per tenant"), json_out)
    if server and any(v is not None for v in llm_flags.values()):
        given = ", ".join(f"--{n}" for n, v in zip(("llm", "model", "base-url", "max-llm-minutes", "llm-timeout",
                                                    "llm-attempts", "max-tokens", "token-budget", "stream",
                                                    "codegen"),
                                                   llm_flags.values(), strict=True) if v is not None)
        fail(PipelineError(f"{given}: a server runs its jobs with its own LLM configuration; these flags apply "
                           "to runs here (drop them, or run without --server)"), json_out)
    if ray_address is not None:
        if server:
            fail(PipelineError("--ray-address runs this run's sandboxes on a cluster; a server has its own "
                               "(cellforge serve --ray-address)"), json_out)
        if sandbox is BackendKind.LOCAL:
            fail(PipelineError("--ray-address runs the sandboxes on a cluster's nodes; --sandbox local runs them "
                               "here, not isolated: choose one"), json_out)
        try:
            import ray  # noqa: F401
        except ImportError:
            fail(PipelineError("--ray-address needs Ray: pip install 'cellforge[ray]'"), json_out)
        # The Ray backend connects to $RAY_ADDRESS: the run's sandboxes, made one by one, all go there.
        os.environ["RAY_ADDRESS"] = ray_address
        sandbox = BackendKind.RAY
    if server and split:
        fail(PipelineError("--split is a directory on this machine; a server splits the data it holds"), json_out)
    columns = {"perturbation_key": perturbation_key, "control": control, "context_key": context_key,
               "dose_key": dose_key, "scheme": scheme.value if scheme else None, "held_out_context": context}
    sizes = {"memory": memory, "cpus": cpus, "gpus": gpus}
    if server:
        _run_remote(server, api_key, data, task, out_dir or Path("runs") / data.stem, json_out,
                    max_attempts=max_attempts, max_minutes=max_minutes, seed=seed, max_nodes=max_nodes,
                    candidates=candidates, **sizes, **columns)
        return
    try:
        config = LLMConfig.resolve(llm_flags)
        settings = _settings(data=data, task=task, out=out_dir or Path("runs") / data.stem, seed=seed,
                             max_attempts=max_attempts, max_minutes=max_minutes, sandbox=sandbox, runtime=runtime,
                             candidates=candidates, max_nodes=max_nodes, split=split, **sizes, **columns)
    except (LLMError, ValueError) as exc:
        fail(exc, json_out)
    _run(settings, config, None, json_out)


def _run_remote(server: str, api_key: str | None, data: Path, task: str, out_dir: Path, json_out: bool,
                **options: Any) -> None:
    """The same design as a job on a server: its events drive the same live progress, its artifacts
    land in `out_dir`."""
    from service.client import APIError
    from service.client.remote import run_design
    from service.pipeline import PipelineError, ProgressEvent, progress_display

    if not api_key:
        fail(PipelineError("--server needs --api-key (or CELLFORGE_API_KEY)"), json_out)
    try:
        with progress_display(err) as progress:
            job = run_design(server, api_key, data, task, download_to=out_dir, **options,
                             on_event=lambda e: progress(ProgressEvent(**e["data"])) if e["kind"] == "progress"
                             else None)
    except APIError as exc:
        fail(PipelineError(f"the server refused the job: {exc}"), json_out)
    metrics = (job.get("result") or {}).get("metrics") or {}
    out = tables(json_out)
    print_verdict(metrics.get("verdict"), json_out)
    if "baselines" in metrics:
        out.print(_metrics_table(metrics))
    out.print(f"job {job['id']}: [bold]{job['status']}[/bold]; artifacts in {out_dir}", highlight=False)
    if json_out:
        emit_json({**metrics, "ok": job["status"] == "succeeded", "job": job["id"], "status": job["status"],
                   "run_status": metrics.get("status"), "error": job.get("error"), "out": str(out_dir)})
    if job["status"] != "succeeded":
        raise typer.Exit(1)


def replay(
    run_dir: Annotated[Path, typer.Argument(help="A recorded run directory.", show_default=False)],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to re-run (default: RUN_DIR-replay).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-run a recorded run from its recorded LLM replies (no endpoint), same arguments and seed."""
    from service.pipeline import DesignSettings, PipelineError

    try:
        recorded = json.loads((run_dir / "run.json").read_text())
        settings = DesignSettings.model_validate(
            {**recorded["settings"], "out": str(out_dir or run_dir.with_name(run_dir.name + "-replay"))})
    except (OSError, ValueError, KeyError) as exc:
        fail(PipelineError(f"{run_dir}: not a recorded run (run.json unreadable: {exc})"), json_out)
    _run(settings, None, run_dir, json_out)


# The demo's screen: 26 knockouts in 3 cell types, so its test split holds 5 genes (15 conditions), enough for a
# verdict (the report warns below 10); at 8,000 cells it held 3 (9 conditions). The knockout benchmark's size.
DEMO_CELLS, DEMO_GENES = 12_000, 500
DEMO_TASK = "Predict expression after CRISPR knockout of unseen genes"


def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo data and run go.")] = Path("runs/demo"),
    sandbox: SandboxOpt = BackendKind.DOCKER,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Simulate a small knockout screen and design a model for it, offline, in Docker."""
    from service.data import simulate
    from service.llm import LLMConfig
    from service.pipeline import DesignSettings

    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "knockout.h5ad"
    err.print(f"simulating a knockout screen ({DEMO_CELLS:,} cells × {DEMO_GENES} genes) into {data}")
    simulate("knockout", seed, n_cells=DEMO_CELLS, n_genes=DEMO_GENES).write_h5ad(data)
    settings = DesignSettings(data=data, task=DEMO_TASK,
                              out=out_dir / time.strftime("run-%Y%m%d-%H%M%S"), seed=seed, sandbox=sandbox,
                              max_minutes=15)
    _run(settings, LLMConfig(), None, json_out)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("design")(design)
    app.command("replay")(replay)
    app.command("demo")(demo)
