"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.live_sandboxes = Gauge(
            "cellforge_live_sandboxes", "Sandboxes leased to tenants (their jobs' included)", registry=self.registry
        )
        self.job_sandboxes = Gauge(
            "cellforge_job_sandboxes", "Sandboxes leased to tenants' jobs (design and regression runs)",
            registry=self.registry,
        )
        self.warm_sandboxes = Gauge(
            "cellforge_warm_sandboxes", "Warm sandboxes ready in the pool", registry=self.registry
        )
        self.executions = Counter(
            "cellforge_executions", "Executions by outcome", ["outcome", "transport"], registry=self.registry
        )
        self.execution_seconds = Histogram(
            "cellforge_execution_seconds", "Execution wall time", registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.job_seconds = Histogram(
            "cellforge_job_duration_seconds", "Job wall time by kind and final status", ["kind", "status"],
            registry=self.registry, buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
        )
        self.queue_depth = Gauge("cellforge_job_queue_depth", "Jobs waiting to run", registry=self.registry)
        self.running_jobs = Gauge("cellforge_jobs_running", "Jobs running now", registry=self.registry)
        self.requests = Counter(
            "cellforge_requests", "API calls by transport and outcome", ["transport", "outcome"],
            registry=self.registry,
        )
