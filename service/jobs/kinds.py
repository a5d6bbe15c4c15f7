"""The job kinds the server runs, by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sandbox import SandboxProvider

from .design import run_design_job
from .regression import run_pytest, run_replay, run_rescore
from .runner import JobContext, JobKind

REGRESSION_KINDS = ("regression.pytest", "regression.rescore", "regression.replay")

# (tenant id, job id) -> the provider a job's sandboxes are leased from: the server's, for that tenant's quota.
ProviderFor = Callable[[str, str], SandboxProvider]


def job_kinds(provider_for: ProviderFor) -> dict[str, JobKind]:
    """Regression runs are idempotent, so a restarted server runs them again from the start; a design
    run cannot resume mid-pipeline and ends as interrupted. Every kind that runs code leases its sandboxes
    from `provider_for(tenant, job)`."""

    def provider(ctx: JobContext) -> SandboxProvider:
        return provider_for(ctx.job.tenant_id, ctx.job.id)

    async def design_job(ctx: JobContext) -> dict[str, Any]:
        return await run_design_job(ctx, provider(ctx))

    async def pytest_job(ctx: JobContext) -> dict[str, Any]:
        return await run_pytest(ctx, provider(ctx))

    async def replay_job(ctx: JobContext) -> dict[str, Any]:
        return await run_replay(ctx, provider(ctx))

    return {
        "design": JobKind(design_job, resumable=False),
        "regression.pytest": JobKind(pytest_job, resumable=True),
        "regression.rescore": JobKind(run_rescore, resumable=True),
        "regression.replay": JobKind(replay_job, resumable=False),
    }
