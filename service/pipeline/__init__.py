"""The design pipeline's execution: code generation from the Plan, the design search in sandboxes (drafts,
the debugging agent, improve steps) scored on validation folds owned by the service, the competition
with baselines and their stack, the verdict, evaluation and the report (`run_design`)."""

from service.pipeline.budget import DEFAULT_MAX_MINUTES, Forecast, project_step
from service.pipeline.codegen import Bundle, CodegenError, config_from_plan, render_bundle
from service.pipeline.debugger import DebugPatch, FileEdit, PatchError, apply_patch, offline_debug
from service.pipeline.execute import SandboxSettings, StepFailure
from service.pipeline.progress import PlainProgress, ProgressEvent, RichProgress, progress_display
from service.pipeline.run import DesignResult, DesignSettings, PipelineError, pipeline_handlers, run_design
from service.pipeline.rundir import RunDir
from service.pipeline.search import Change, SearchTree, offline_improve
from service.pipeline.verdict import Verdict, build_verdict, verdict_lines

__all__ = [
    "DEFAULT_MAX_MINUTES",
    "Bundle",
    "Change",
    "CodegenError",
    "DebugPatch",
    "DesignResult",
    "DesignSettings",
    "FileEdit",
    "Forecast",
    "PatchError",
    "PipelineError",
    "PlainProgress",
    "ProgressEvent",
    "RichProgress",
    "RunDir",
    "SandboxSettings",
    "SearchTree",
    "StepFailure",
    "Verdict",
    "apply_patch",
    "build_verdict",
    "config_from_plan",
    "offline_debug",
    "offline_improve",
    "pipeline_handlers",
    "progress_display",
    "project_step",
    "render_bundle",
    "run_design",
    "verdict_lines",
]
