"""Jobs as Ray tasks: a job an API replica claimed runs on some node of a Ray cluster, not in the replica.

    runner = JobRunner(store, kinds, work_root, remote=RayJobs("auto"))

The replica keeps the job's record (claim, heartbeat, events, final state); the work runs as one Ray task
per job on a node that offers the sandbox resource (it has Docker and the sandbox image), asking for the
job's CPUs, so N jobs run on N nodes at once. The task streams the job's progress back (a Ray streaming
generator) and, last, its result and its artifacts as one tar archive, unpacked into the service's store.

- **Cancel**: the replica cancels its waiting coroutine, which `ray.cancel`s the task; the task sets the
  job's cancel flag (the handler's cancellation points) and cancels the handler, whose sandboxes close.
- **Node loss**: the task's node died: `JobLost`; the runner requeues the job, which runs again from its
  start (a design run from scratch) on a node Ray picks, up to the runner's `max_attempts`, then fails it
  with the reason. The first event of every attempt names its node.
- **Paths**: a job's inputs (datasets, code bundles, stored runs) are paths under the API's data dir; on a
  cluster of several machines that dir is a shared filesystem mounted at the same path on every node
  (docs/scale.md). The job's own work folder is a private temporary folder on the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError, TaskCancelledError

from .runner import JobCancelled, JobContext, JobFailed, JobLost, Redactor
from .store import Job

log = logging.getLogger(__name__)

NAMESPACE = "cellforge"
SLOT_RESOURCE = "cellforge_sandbox"  # as sandbox.ray_backend: the nodes that have Docker and the image
MARKER = 0.001
# The largest artifact archive a job sends back (the design run's weights and predictions fit).
MAX_ARTIFACT_BYTES = 2 << 30
_END = object()


@dataclass(frozen=True)
class Progress:
    """One of a running job's reports: ("event", (kind, data)), ("phase", name) or ("checkpoint", name)."""

    what: str
    value: Any


@dataclass(frozen=True)
class Outcome:
    """The task's last item: the handler's result and its artifacts folder as a tar archive."""

    result: dict[str, Any]
    artifacts: bytes
    node: str


class _Forward:
    """A JobContext recorder that hands the handler's reports to the task's stream (redacted on the node:
    the node's work folder becomes relative to it)."""

    def __init__(self, out: queue.Queue[Any], redact: Redactor) -> None:
        self._out, self._redact = out, redact

    def put(self, what: str, value: Any) -> None:
        self._out.put(Progress(what, self._redact(value) if what == "event" else value))


def job_options(job: Job) -> dict[str, Any]:
    """The task's Ray options: the job's CPUs on a node that hosts sandboxes."""
    cpus = float(job.params.get("cpus") or (job.params.get("options") or {}).get("cpus") or 1.0)
    return {"num_cpus": cpus, "resources": {SLOT_RESOURCE: MARKER}, "max_retries": 0}


def run_on_node(job: Job) -> Iterator[Progress | Outcome]:
    """The Ray task: the job's handler on this node, with its own sandbox pool on this node's Docker engine;
    its reports as they come, then its `Outcome`. Cancelled (ray.cancel): the handler is cancelled and its
    sandboxes closed before the task ends."""
    from sandbox import BackendKind, BackendProvider

    from .kinds import job_kinds

    reports: queue.Queue[Any] = queue.Queue()
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory(prefix="cellforge-job-") as folder:
        work_dir = Path(folder) / job.id
        (work_dir / "artifacts").mkdir(parents=True)
        redact = Redactor(work_dir, (Path(folder),))
        ctx = JobContext(job=job, store=None, work_dir=work_dir, recorder=_Forward(reports, redact))
        handler: list[asyncio.Task[dict[str, Any]]] = []
        outcome: list[Any] = []

        async def run() -> dict[str, Any]:
            # The node's one provider for the job (its Docker engine): the job's sandboxes are labelled with
            # its tenant; the tenant's quota was held by the job's admission on the API replica.
            provider = BackendProvider(BackendKind.DOCKER, loop=asyncio.get_running_loop())
            try:
                kind = job_kinds(lambda tenant, job_id: provider)[job.kind]
                handler.append(asyncio.current_task())  # type: ignore[arg-type]
                return await kind.handler(ctx)
            finally:
                await provider.aclose()

        def thread() -> None:
            try:
                outcome.append(loop.run_until_complete(run()))
            except BaseException as exc:  # noqa: BLE001 - carried to the task's thread and raised there
                outcome.append(exc)
            finally:
                reports.put(_END)

        node = ray.get_runtime_context().get_node_id()
        yield Progress("event", ("node", {"node": node}))  # where it runs, first: a lost node is named by it
        worker = threading.Thread(target=thread, name=f"cellforge-job-{job.id}", daemon=True)
        worker.start()
        try:
            while (item := _next(reports)) is not _END:
                if item is not None:
                    yield item
            worker.join()
            result = outcome[0]
            if isinstance(result, BaseException):
                raise result
            yield Outcome(redact(result), _tar(work_dir / "artifacts"), node)
        finally:
            if worker.is_alive():  # cancelled (or the caller went away): stop the handler, let it clean up
                ctx.cancelled.set()
                for task in handler:
                    loop.call_soon_threadsafe(task.cancel)
                worker.join(60)
            if not worker.is_alive():
                loop.close()


def _next(reports: queue.Queue[Any]) -> Any:
    """The next report, or None after a short wait: Ray delivers a cancel (KeyboardInterrupt) between
    Python steps, never inside a blocking wait, so the task must not block for long."""
    try:
        return reports.get(timeout=0.2)
    except queue.Empty:
        return None


_task = ray.remote(run_on_node)


class RayJobs:
    """Runs jobs as Ray tasks on the cluster at `address` ("auto", "ray://HOST:PORT"; None: $RAY_ADDRESS or
    an already connected Ray)."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def connect(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=NAMESPACE, logging_level=logging.WARNING)

    async def run(self, ctx: JobContext) -> dict[str, Any]:
        """Run `ctx.job` on the cluster: its reports go to `ctx`, its artifacts into `ctx.artifacts_dir`;
        returns its result. Cancelling this coroutine cancels the task."""
        await asyncio.to_thread(self.connect)
        stream: Any = _task.options(**job_options(ctx.job)).remote(ctx.job)
        try:
            async for ref in stream:
                item = await ref
                if isinstance(item, Progress):
                    ctx._put(item.what, item.value)
                    continue
                _untar(item.artifacts, ctx.artifacts_dir)
                return item.result
        except asyncio.CancelledError:
            ray.cancel(stream)
            raise
        except RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, (JobFailed, JobCancelled, JobLost)):
                raise cause from None
            if isinstance(cause, TaskCancelledError):
                raise JobCancelled(f"job {ctx.job.id} was cancelled") from None
            log.error("job %s failed on its Ray node: %s", ctx.job.id, exc)
            raise JobFailed(f"internal error on its Ray node ({type(cause).__name__}); see the server log") from None
        except RayError as exc:  # the node or the task's worker died
            why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise JobLost(f"its Ray node was lost while it ran ({why})") from None
        raise JobFailed("its Ray task ended without a result")


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
    data = buf.getvalue()
    if len(data) > MAX_ARTIFACT_BYTES:
        raise JobFailed(f"the job's artifacts are {len(data)} bytes compressed; the limit is {MAX_ARTIFACT_BYTES}")
    return data


def _untar(data: bytes, folder: Path) -> None:
    """The task's artifacts into the service's store: regular files only, inside `folder` only."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        with contextlib.suppress(AttributeError):  # Python without tar filters: members are checked below too
            tar.extraction_filter = tarfile.data_filter
        for member in tar.getmembers():
            target = (folder / member.name).resolve()
            if not member.isfile() or not target.is_relative_to(folder.resolve()):
                continue
            tar.extract(member, folder)
