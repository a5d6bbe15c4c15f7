"""The design pipeline's execution: code generation from the Plan, sandbox attempts, the debugging
agent, evaluation and the report (`run_design`)."""

from service.pipeline.codegen import Bundle, CodegenError, config_from_plan, render_bundle
from service.pipeline.debugger import DebugPatch, FileEdit, PatchError, apply_patch, offline_debug
from service.pipeline.execute import SandboxSettings, StepFailure
from service.pipeline.progress import ProgressEvent, RichProgress
from service.pipeline.run import DesignResult, DesignSettings, PipelineError, pipeline_handlers, run_design
from service.pipeline.rundir import RunDir

__all__ = [
    "Bundle",
    "CodegenError",
    "DebugPatch",
    "DesignResult",
    "DesignSettings",
    "FileEdit",
    "PatchError",
    "PipelineError",
    "ProgressEvent",
    "RichProgress",
    "RunDir",
    "SandboxSettings",
    "StepFailure",
    "apply_patch",
    "config_from_plan",
    "offline_debug",
    "pipeline_handlers",
    "render_bundle",
    "run_design",
]
