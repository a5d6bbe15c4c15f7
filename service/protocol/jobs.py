"""Design jobs, regression runs and their answers, as they travel over HTTP and gRPC."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .times import Timestamp

FINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
# service.data.splits.SCHEMES, spelled out: the protocol depends on pydantic only (a test keeps them equal).
SplitScheme = Literal["unseen-perturbation", "combo", "unseen-drug", "unseen-dose", "unseen-context"]


class DesignOptions(BaseModel):
    """What a tenant may choose about a design run; the server decides the rest (paths, sandbox backend)
    and checks the ranges. An option it does not know is refused (422), never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(default=None, description="seed of the split and the training (default 0)")
    max_attempts: int | None = Field(default=None, description="debugging attempts (default 4)")
    max_minutes: float | None = Field(default=None, description="wall-clock budget of the whole design in minutes, "
                                       "LLM time not counted (default 15)")
    max_rounds: int | None = Field(default=None, description="expert discussion rounds (default 4)")
    gpus: int | None = Field(default=None, description="GPUs for the training sandbox (default 0)")
    memory: str | None = Field(default=None, description="sandbox memory, e.g. '4g' (within the tenant's limit)")
    cpus: float | None = Field(default=None, description="sandbox CPUs (within the tenant's limit)")
    max_genes: int | None = Field(default=None, description="cap on the genes kept by the split")
    max_nodes: int | None = Field(default=None, description="cap on the improve steps after the first working "
                                     "model (default: none, the time budget decides)")
    candidates: int | None = Field(default=None, description="draft plans: the discussion's and variants (default 1)")
    runtime: str | None = Field(default=None, description="container runtime of the run's sandboxes: the tenant's "
                                "(default) or a stronger one (runsc), never a weaker one")
    perturbation_key: str | None = Field(default=None, description="obs column of the perturbation (default: "
                                        "detected)")
    control: str | None = Field(default=None, description="control label (default: detected)")
    context_key: str | None = Field(default=None, description="obs column of the cell type / context (default: "
                                   "detected; 'none': pool every cell)")
    dose_key: str | None = Field(default=None, description="obs column of the dose (default: detected)")
    scheme: SplitScheme | None = Field(default=None, description="split scheme (default: the task analysis' choice)")
    held_out_context: str | None = Field(default=None, description="unseen-context: the cell type to hold out "
                                        "(default: drawn with the seed)")

    def chosen(self) -> dict[str, Any]:
        """The options the caller set (the others take the server's defaults)."""
        return self.model_dump(exclude_none=True)


class DesignJobRequest(BaseModel):
    dataset_id: str
    task: str = Field(description="what to predict, in plain words")
    options: DesignOptions = Field(default_factory=DesignOptions)


class _Regression(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PytestRegression(_Regression):
    kind: Literal["pytest"]
    bundle_zip_b64: str | None = Field(default=None, description="the code bundle as a base64 zip")
    job_id: str | None = Field(default=None, description="or: a finished design job whose code bundle to test")
    dataset_id: str | None = Field(default=None, description="mounted read-only at /data")
    timeout: float = Field(default=600.0, gt=0, le=86400)
    memory: str | None = Field(default=None, description="default: 2g, or the tenant's memory limit if lower")
    cpus: float | None = Field(default=None, gt=0, le=64, description="default: 1, or the tenant's CPU limit if lower")


class CompareRegression(_Regression):
    kind: Literal["rescore", "replay"]
    job_id: str = Field(description="the stored design run")
    tolerances: dict[str, float] = Field(default_factory=dict, description="absolute tolerance per metric")
    default_tolerance: float | None = Field(default=None, ge=0)


RegressionRequest = Annotated[PytestRegression | CompareRegression, Field(discriminator="kind")]
RegressionRequestAdapter: TypeAdapter[PytestRegression | CompareRegression] = TypeAdapter(RegressionRequest)


class JobInfo(BaseModel):
    """A job or regression run as its tenant sees it (host paths stay on the server)."""

    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    phase: str | None
    error: str | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    attempts: int
    params: dict[str, Any]
    result: dict[str, Any] | None
    artifacts: list[str]
    final: bool
    logs: list[str] = Field(default_factory=list, description="attempt logs, for `GET /v1/jobs/{id}/logs/{path}`")


class JobList(BaseModel):
    jobs: list[JobInfo]


class JobLogs(BaseModel):
    logs: list[str] = Field(description="paths of the attempt logs, for `GET /v1/jobs/{id}/logs/{path}`")


class JobEvent(BaseModel):
    seq: int
    ts: Timestamp
    kind: str
    data: dict[str, Any]
