"""Ray backend: sandboxes spread over a Ray cluster, each a Ray actor owning its container on its node.

    backend = RayBackend("auto")        # or "ray://head:10001"; None: $RAY_ADDRESS, else a local Ray
    sb = await backend.create(SandboxSpec(cpus=2, memory="4g", resources={"zone_a": 0.01}))
    await sb.execute("1 + 1")           # the same Sandbox API as the Docker backend

Each sandbox is one actor (ray_node.SandboxActor) that creates the hardened container with its
node's Docker backend: the container, the kernel's sockets and their key never leave that node;
this process talks to the actor only: executions over the actor's execution channel (ray_channel: a direct,
token-checked connection to the actor on its node, which saves Ray's few milliseconds per call), or as Ray
calls where the node's port cannot be reached (or with `channel=False`); all else as Ray calls. Ray places
the actor by the spec's resources:

- `num_cpus` = `cpus`, `memory` = `memory`, `num_gpus` = `gpus` (the container gets the devices
  Ray reserved on that node; device ids in a spec only count how many);
- `cellforge_sandbox: 1`: a node hosts sandboxes only when started with this resource (it has
  Docker and the sandbox image), and its amount caps the sandboxes there;
- `cellforge_runtime_<name>` (a marker amount) when the spec names a container runtime, e.g. a
  node started with `--resources '{"cellforge_sandbox": 64, "cellforge_runtime_runsc": 1}'` takes
  gVisor sandboxes;
- the spec's own `resources` (node pools, zones, labels), as given.

A spec no live node could ever hold is refused at once (SandboxStartError naming what is missing);
one that must wait for room waits up to `placement_timeout`. When a node dies, Ray reports its
actors dead: a running execution ends `died`, `sb.dead` says which node was lost, and `restart()`
places a fresh sandbox (state and workspace lost, as after any death). Containers left on a node
whose actor died are removed by `reap()`, which runs the Docker reaper on every sandbox node.

Starting a sandbox's actor costs a new Ray worker process on its node (about a second of a core) before
the container is made. With `spare_ttl` > 0 (the API server: 30 s) the backend keeps one *spare* per spec
shape it has started (the same placement options): an actor placed and constructed in the background right
after a start, holding that shape's resources on its node, and given the next sandbox of that shape (one
actor call: the container's start). A spare ends itself `spare_ttl` seconds after it was made unless used,
also when the process that made it stopped; `close()` ends this backend's. Meanwhile a node's capacity for
that shape shows one sandbox fewer. A sandbox started on a spare is like any other (its own actor, its name,
its hardening); restarting a sandbox whose node was lost places a fresh actor. The default is no spares
(`cellforge design --ray-address`: each sandbox runs for minutes, and every actor of the run is one of its
sandboxes).

Every actor is named `sandbox-<id>` in the `cellforge` namespace. With `detached=True` (what API
replicas use) a sandbox outlives the process that created it, and any process of the cluster reaches it
with `attach(id)`: a sandbox created through one API replica is used through another.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .backend import BackendHealth, BackendKind, KernelHost, ReapReport, SandboxBackend
from .commands import Commands
from .errors import SandboxClosedError, SandboxDeadError, SandboxError, SandboxStartError, UsageError
from .events import ExecutionResult, Outcome, StatusEvent, StreamEvent
from .files import Files, local_destination, regular_files, workspace_path
from .kernel import Replies, Sandbox, unwatched
from .ray_channel import ChannelClient, ChannelUnreachable
from .ray_node import NodeSandbox, RunEnd, SandboxActor
from .reaper import reap_orphans
from .spec import SandboxSpec

if TYPE_CHECKING:
    from .collector import Emit

log = logging.getLogger(__name__)

NAMESPACE = "cellforge"
SLOT_RESOURCE = "cellforge_sandbox"
RUNTIME_RESOURCE_PREFIX = "cellforge_runtime_"
# A marker: requested in this amount, a resource works as a node label rather than a count.
MARKER = 0.001
# Seconds a close may wait on a node that stopped answering before the actor is killed anyway.
CLOSE_TIMEOUT_S = 30.0
# Seconds a spare may take to be placed and constructed; one that could not be placed by then is given up
# rather than left waiting for room a sandbox asked for.
SPARE_PLACE_S = 10.0
# A spare this close to its end is not handed out (it might end while its sandbox starts).
SPARE_MARGIN_S = 5.0
SERVER_SPARE_TTL_S = 30.0  # the API server's spares (RayBackend(spare_ttl=...))
# Seconds an execution whose channel broke waits for Ray to say whether the actor (its node) was lost.
LOSS_WAIT_S = 30.0

OnBatch = Callable[[list[StreamEvent]], None]

_Actor = ray.remote(SandboxActor)
_reap_node = ray.remote(num_cpus=0)(reap_orphans)


def actor_name(sandbox_id: str) -> str:
    return f"sandbox-{sandbox_id}"


def runtime_resource(runtime: str) -> str:
    return f"{RUNTIME_RESOURCE_PREFIX}{runtime}"


def placement(spec: SandboxSpec) -> dict[str, Any]:
    """The Ray actor options that place a sandbox of `spec` (see the module docstring)."""
    resources = {SLOT_RESOURCE: 1.0, **spec.resources}
    if spec.runtime:
        resources[runtime_resource(spec.runtime)] = MARKER
    gpus = len(spec.gpus) if isinstance(spec.gpus, list) else (spec.gpus or 0)
    return {"num_cpus": spec.cpus, "num_gpus": gpus, "memory": spec.memory_bytes, "resources": resources}


def _demand(options: dict[str, Any]) -> dict[str, float]:
    """Actor options as a node's resource names (as `ray.nodes()` lists them)."""
    demand = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], "memory": options["memory"]}
    return {name: amount for name, amount in {**demand, **options["resources"]}.items() if amount}


def _sandbox_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(SLOT_RESOURCE)]


def require_placeable(options: dict[str, Any]) -> None:
    """SandboxStartError when no live sandbox node has, in total, what the sandbox asks for."""
    demand = _demand(options)
    nodes = _sandbox_nodes()
    if not nodes:
        raise SandboxStartError(
            f"no live Ray node offers the {SLOT_RESOURCE!r} resource: start sandbox nodes with "
            f"`ray start --resources '{{\"{SLOT_RESOURCE}\": 64}}'` (on machines with Docker and the sandbox image)"
        )
    if any(all(n["Resources"].get(name, 0) >= amount for name, amount in demand.items()) for n in nodes):
        return
    short = {name: amount for name, amount in demand.items() if not any(n["Resources"].get(name, 0) >= amount
                                                                         for n in nodes)}
    raise SandboxStartError(
        f"no Ray sandbox node can hold this sandbox: it needs {demand}; "
        f"{short or 'these together'} no single node has (of {len(nodes)} sandbox nodes)"
    )


class RayBackend(SandboxBackend):
    """Sandboxes as Ray actors on the nodes of a Ray cluster (`address`: "auto", "ray://HOST:PORT", or
    None for $RAY_ADDRESS or a Ray started here). Connects on first use; an already connected Ray
    (ray.init by the caller) is used as it is."""

    kind = BackendKind.RAY
    isolated = True

    def __init__(
        self, address: str | None = None, *, placement_timeout: float = 60.0, detached: bool = False,
        spare_ttl: float = 0.0, channel: bool = True,
    ) -> None:
        self.address = address
        self.placement_timeout = placement_timeout
        # Detached: the actors outlive this process; whoever uses them must close them (`close()`).
        self.detached = detached
        self.spare_ttl = spare_ttl
        # Executions over the actors' execution channels (ray_channel); False: always Ray calls (callers that
        # cannot reach the nodes' ports would otherwise wait a connect timeout once per sandbox to learn so).
        self.channel = channel
        # One spare per placement (its options as JSON): (sandbox id, actor, when it was made).
        self._spares: dict[str, asyncio.Task[tuple[str, Any, float]]] = {}

    @property
    def shared(self) -> bool:
        """Whether other processes of the cluster reach this backend's sandboxes (`attach`)."""
        return self.detached

    def connect(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, namespace=NAMESPACE, logging_level=logging.WARNING)

    async def create(self, spec: SandboxSpec) -> RaySandbox:
        """A started sandbox on a node that fits `spec`; on any failure nothing is left and
        SandboxStartError says why."""
        self.connect()
        options = placement(spec)
        started = await self._start_on_spare(spec, options)
        if started is None:
            sandbox_id = secrets.token_hex(6)
            started = sandbox_id, *await self.start_actor(spec, sandbox_id)
        self._keep_spare(options)
        sandbox_id, actor, facts = started
        return RaySandbox(self, spec, sandbox_id, actor, facts)

    # --- spares: actors placed and constructed before their sandbox is asked for ---------------------------

    def _keep_spare(self, options: dict[str, Any]) -> None:
        """Have a spare of this placement made in the background, unless one is there or on its way."""
        key = json.dumps(options, sort_keys=True)
        if self.spare_ttl <= 0 or (key in self._spares and not self._spares[key].done()):
            return
        task = asyncio.ensure_future(self._make_spare(options))
        task.add_done_callback(_spare_made)
        self._spares[key] = task

    async def _make_spare(self, options: dict[str, Any]) -> tuple[str, Any, float]:
        sandbox_id = secrets.token_hex(6)
        lifetime = {"lifetime": "detached"} if self.detached else {}
        actor: Any = _Actor.options(name=actor_name(sandbox_id), namespace=NAMESPACE, max_restarts=0, **lifetime,
                                    **options).remote(self.spare_ttl)
        try:
            async with asyncio.timeout(min(SPARE_PLACE_S, self.spare_ttl)):
                await actor.idle_seconds.remote()  # placed, its worker started and the actor constructed
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        return sandbox_id, actor, time.monotonic()  # its time to live runs from about now (its construction)

    def _take_spare(self, options: dict[str, Any]) -> tuple[str, Any] | None:
        """A ready spare of this placement, no longer kept (a new one is made after the start)."""
        key = json.dumps(options, sort_keys=True)
        task = self._spares.get(key)
        if task is None or not task.done():
            return None
        del self._spares[key]
        if task.cancelled() or task.exception() is not None:
            return None
        sandbox_id, actor, made = task.result()
        if time.monotonic() - made > self.spare_ttl - SPARE_MARGIN_S:
            ray.kill(actor, no_restart=True)
            return None
        return sandbox_id, actor

    async def _start_on_spare(self, spec: SandboxSpec, options: dict[str, Any]) -> tuple[str, Any, NodeSandbox] | None:
        """The sandbox started in a spare of its placement; None when there is none or it was lost meanwhile (its
        node died, it ended): then a fresh actor is placed. A failure of the start itself is the sandbox's."""
        spare = self._take_spare(options)
        if spare is None:
            return None
        sandbox_id, actor = spare
        try:
            async with asyncio.timeout(spec.start_timeout):
                facts: NodeSandbox = await actor.start.remote(spec)
        except RayActorError:
            return None
        except BaseException as exc:
            ray.kill(actor, no_restart=True)
            if isinstance(exc, TimeoutError):
                raise SandboxStartError(f"sandbox {sandbox_id}: its container did not start within "
                                        f"{spec.start_timeout:g}s") from None
            if isinstance(exc, RayTaskError):
                _raise_cause(exc)
            raise
        return sandbox_id, actor, facts

    async def start_actor(self, spec: SandboxSpec, sandbox_id: str) -> tuple[Any, NodeSandbox]:
        """Place the actor of sandbox `sandbox_id` and have it start the container."""
        self.connect()
        options = placement(spec)
        await asyncio.to_thread(require_placeable, options)
        lifetime = {"lifetime": "detached"} if self.detached else {}
        actor: Any = _Actor.options(name=actor_name(sandbox_id), namespace=NAMESPACE, max_restarts=0, **lifetime,
                                    **options).remote()
        limit = self.placement_timeout + spec.start_timeout
        try:
            async with asyncio.timeout(limit):
                facts: NodeSandbox = await actor.start.remote(spec)
        except BaseException as exc:
            # The actor removes what it made on a failure it sees; one killed mid-start leaves a
            # container whose owner is gone, which the node's reaper removes.
            ray.kill(actor, no_restart=True)
            if isinstance(exc, TimeoutError):
                raise SandboxStartError(
                    f"sandbox {sandbox_id} was not placed and started within {limit:g}s: no node had "
                    f"{_demand(options)} free (or its container did not start)"
                ) from None
            if isinstance(exc, RayTaskError):
                _raise_cause(exc)
            if isinstance(exc, RayActorError):
                raise SandboxStartError(f"sandbox {sandbox_id}: its Ray actor died while starting: {_why(exc)}") from None
            raise
        return actor, facts

    async def attach(self, sandbox_id: str) -> RaySandbox:
        """The sandbox `sandbox_id`, started by any process of the cluster (a detached one), as a sandbox of
        this process. SandboxClosedError when no such sandbox is alive (closed, or never was)."""
        self.connect()
        try:
            actor = await asyncio.to_thread(ray.get_actor, actor_name(sandbox_id), namespace=NAMESPACE)
        except ValueError:
            raise SandboxClosedError(f"sandbox {sandbox_id}: no live Ray actor {actor_name(sandbox_id)!r}") from None
        try:
            spec, facts = await actor.describe.remote()
        except RayTaskError as exc:
            _raise_cause(exc)
        except RayActorError as exc:
            raise SandboxDeadError(f"sandbox {sandbox_id}: its Ray actor is gone ({_why(exc)})") from None
        return RaySandbox(self, spec, sandbox_id, actor, facts)

    async def live_ids(self) -> set[str]:
        """The ids of every sandbox whose actor is alive in the cluster (whoever started it)."""
        self.connect()
        named = await asyncio.to_thread(ray.util.list_named_actors, all_namespaces=True)
        prefix = actor_name("")
        return {a["name"][len(prefix):] for a in named
                if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)}

    async def death_causes(self, sandbox_ids: set[str]) -> dict[str, str]:
        """Why the actors of these sandboxes are gone, for those that died (their node died, their worker
        process died, they were killed for memory), naming the node. Those closed on purpose, alive, or of
        which Ray keeps no record are left out. Reads the cluster's whole actor table: for sandboxes found
        gone, not for every call."""
        if not sandbox_ids:
            return {}
        self.connect()
        causes = await asyncio.to_thread(_death_causes, {actor_name(sid) for sid in sandbox_ids})
        return {name.removeprefix(actor_name("")): cause for name, cause in causes.items()}

    async def provision(self, spec: SandboxSpec) -> KernelHost:
        raise UsageError("RayBackend places whole sandboxes on nodes (their kernels stay there): use create()")

    async def health(self) -> BackendHealth:
        try:
            self.connect()
            nodes = await asyncio.to_thread(_sandbox_nodes)
        except Exception as exc:  # noqa: BLE001 - health never raises: it says what is wrong
            return BackendHealth(ok=False, detail=f"Ray cluster not reachable at {self.address or 'default'}: {exc}")
        if not nodes:
            return BackendHealth(ok=False, detail=f"no live Ray node offers the {SLOT_RESOURCE!r} resource")
        slots = sum(n["Resources"][SLOT_RESOURCE] for n in nodes)
        return BackendHealth(ok=True, detail=f"Ray cluster: {len(nodes)} sandbox nodes, {slots:g} sandbox slots")

    async def reap(self) -> ReapReport:
        """Run the Docker reaper on every live sandbox node: containers whose actor died are removed."""
        self.connect()
        nodes = await asyncio.to_thread(_sandbox_nodes)
        runs = [
            _reap_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes
        ]
        merged = ReapReport()
        for node, report in zip(nodes, await asyncio.gather(*runs, return_exceptions=True), strict=True):
            if isinstance(report, BaseException):
                merged.kept[f"node {node['NodeID']}"] = f"reaping failed there: {report}"
                continue
            merged.removed += [c for c in report.removed if c not in merged.removed]
            merged.kept.update({c: why for c, why in report.kept.items() if c not in merged.removed})
        return merged

    async def close(self) -> None:
        """End this backend's spares; the Ray connection stays for sandboxes still to close."""
        spares, self._spares = list(self._spares.values()), {}
        for task in spares:
            task.cancel()
        for outcome in await asyncio.gather(*spares, return_exceptions=True):
            if isinstance(outcome, tuple):
                ray.kill(outcome[1], no_restart=True)

    async def spares_ready(self) -> None:
        """Wait for the spares on their way (a benchmark measures starts with a spare ready)."""
        await asyncio.gather(*self._spares.values(), return_exceptions=True)


class RaySandbox(Sandbox):
    """A sandbox whose kernel runs in a Ray actor on another node: the `Sandbox` API, each call one
    actor call, but executions go over the actor's execution channel when its node can be reached (else one
    streaming call each). `node` says where it runs."""

    def __init__(self, backend: RayBackend, spec: SandboxSpec, sandbox_id: str, actor: Any, node: NodeSandbox) -> None:
        # Not Sandbox.__init__: its kernel client belongs on the node, in the actor.
        self.id = sandbox_id
        self.spec = spec
        self.isolated = True
        self.files = RayFiles(self)
        self.commands = Commands(self)
        self._backend = backend
        self._closed = False
        self._dead: str | None = None
        # Called with the cause when the actor is lost (its node died): its container and the resources Ray
        # reserved for it are gone until restart() places it anew (the API's quota stops counting it).
        self.on_lost: list[Callable[[str], None]] = []
        self._channel: ChannelClient | None = None
        self._attach(actor, node)

    def _attach(self, actor: Any, node: NodeSandbox) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = ChannelClient(node.channel) if node.channel and self._backend.channel else None
        self._actor = actor
        self._actor_lost = False
        self.node = node
        self.workspace = node.workspace
        self.data_root = node.data_root
        self._watch = asyncio.ensure_future(self._watch_actor(actor))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"dead ({self._dead})" if self._dead else "ready"
        return f"<RaySandbox {self.id} on {self.node.hostname} ({self.node.node_id[:12]}) {state}>"

    @property
    def healthy(self) -> bool:
        return not (self._closed or self._dead)

    async def _watch_actor(self, actor: Any) -> None:
        """Learn of the actor's loss (its node died), or of its close by another process, when it happens,
        not at the next call."""
        try:
            await actor.wait_closed.remote()
        except RayActorError as exc:
            if actor is self._actor and not self._closed:
                with contextlib.suppress(SandboxClosedError):
                    await self._gone(exc)
            return
        if actor is self._actor and not self._closed:
            self._closed_elsewhere()

    def _closed_elsewhere(self) -> None:
        """Closed through another process (an API replica): this handle is closed too."""
        self._closed = True
        self._actor_lost = True

    async def _gone(self, exc: RayActorError) -> str:
        """The actor is gone: SandboxClosedError when another process closed it on purpose (its kill can
        reach a call here before its close does); else it was lost, and the cause."""
        if await asyncio.to_thread(_closed_on_purpose, self._actor._actor_id.hex()):
            self._closed_elsewhere()
            raise SandboxClosedError(f"sandbox {self.id} was closed by another process")
        return self._lose(exc)

    @property
    def lost(self) -> bool:
        """Whether its actor is gone (its node died): it holds no container and no resources until restart()."""
        return self._actor_lost and not self._closed

    def _lose(self, exc: RayActorError) -> str:
        """Mark the actor lost; the cause, naming the node."""
        first = not self._actor_lost
        self._actor_lost = True
        if not self._dead:
            self._dead = f"Ray node {self.node.hostname} ({self.node.node_id[:12]}) lost: {_why(exc)}"
        if first:
            for hook in list(self.on_lost):
                try:
                    hook(self._dead)
                except Exception:  # a hook's failure must not hide the loss from the caller
                    log.exception("an on_lost hook of sandbox %s raised", self.id)
        return self._dead

    async def _call(self, method: Any, *args: Any) -> Any:
        """One actor call; the sandbox layer's errors come back as themselves."""
        self.check_usable()
        try:
            return await method.remote(*args)
        except RayTaskError as exc:
            _raise_cause(exc)
        except RayActorError as exc:
            raise SandboxDeadError(f"sandbox {self.id} died ({await self._gone(exc)}); call restart() for a fresh one") from None

    # --- execution: over the actor's channel, else one Ray call per run --------------------------------

    async def _run(
        self,
        code: str,
        timeout: float | None,
        emit: Emit,
        *,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
    ) -> tuple[ExecutionResult, Replies]:
        self.check_usable()
        started = time.perf_counter()
        expressions = None if store_history else (user_expressions or {})
        # Nobody watches: the events travel with the result.
        on_batch = None if emit is unwatched else _batch_emitter(emit)
        end = await self._run_on_channel(code, timeout, expressions, on_batch)
        if end is None:
            end = await self._run_on_ray(code, timeout, expressions, on_batch)
        if isinstance(end, str):  # the actor was lost: why
            emit(StatusEvent(state="died", detail=end))
            elapsed = (time.perf_counter() - started) * 1000
            return ExecutionResult(outcome=Outcome.DIED, died_cause=end, state_lost=True, duration_ms=elapsed), {}
        for event in end.events:
            emit(event)
        self._dead = end.dead
        return end.result, end.replies

    async def _run_on_channel(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None, on_batch: OnBatch | None
    ) -> RunEnd | str | None:
        """The run over the actor's execution channel; the cause when the actor was lost meanwhile; None when
        there is no channel to use (then nothing was sent)."""
        client = self._channel
        if client is None:
            return None
        request = client.request(code, timeout, expressions, on_batch is not None)
        if request is None:
            return None
        try:
            conn = await client.connection()
        except ChannelUnreachable as exc:
            log.warning("sandbox %s: its node's execution channel is unreachable (%s); its executions are Ray "
                        "calls from now on", self.id, exc)
            self._channel = None
            return None
        run = asyncio.ensure_future(client.run(conn, request, on_batch))
        try:
            # Ray tells of the actor's loss (its node died) even when no connection breaks to say so.
            await asyncio.wait({run, self._watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            run.cancel()  # the connection closes: its node interrupts the code
            raise
        if not run.done() and self.lost:
            run.cancel()
            return self._dead
        try:
            end: RunEnd = await run
        except (ConnectionError, EOFError):
            # The node closed the connection mid-run: its actor died (Ray says so in a moment), or it was closed.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LOSS_WAIT_S):
                    await asyncio.wait({self._watch})
            if self.lost:
                return self._dead
            self.check_usable()  # closed through another process meanwhile: SandboxClosedError
            raise SandboxError(f"sandbox {self.id}: its node closed the execution channel mid-run") from None
        return end

    async def _run_on_ray(
        self, code: str, timeout: float | None, expressions: dict[str, str] | None, on_batch: OnBatch | None
    ) -> RunEnd | str:
        """The run as one Ray call (a streaming one when watched); the cause when the actor was lost."""
        call = (self._actor.run_all if on_batch is None else self._actor.run).remote(code, timeout, expressions)
        try:
            end: RunEnd = await call if on_batch is None else await self._streamed(call, on_batch)
        except asyncio.CancelledError:
            ray.cancel(call)  # the actor's sandbox interrupts the code, as for a local caller
            raise
        except RayTaskError as exc:
            _raise_cause(exc)
        except RayActorError as exc:
            return await self._gone(exc)
        return end

    async def _streamed(self, stream: Any, on_batch: OnBatch) -> RunEnd:
        """The streaming call's batches of events given to `on_batch` as they come; its `RunEnd`."""
        async for ref in stream:
            # The generator hands out a ref once its value has arrived: a small one is in this process, and
            # reading it there saves a second trip through the event loop (a large one is awaited).
            try:
                item = ray.get(ref, timeout=0)
            except GetTimeoutError:
                item = await ref
            if isinstance(item, RunEnd):
                return item
            on_batch(item)
        raise SandboxError(f"sandbox {self.id}: its node ended an execution without a result")

    # --- control -----------------------------------------------------------------------------------

    async def interrupt(self) -> None:
        await self._call(self._actor.interrupt)

    async def restart(self) -> None:
        """A fresh kernel (workspace kept), or, when the node was lost, a fresh sandbox placed anew."""
        if self._closed:
            raise SandboxClosedError(f"sandbox {self.id} is closed")
        if self._actor_lost:
            ray.kill(self._actor, no_restart=True)
            actor, node = await self._backend.start_actor(self.spec, self.id)
            self._attach(actor, node)
            self._dead = None
            return
        self._dead = None  # the actor's sandbox revives a dead kernel; _call refuses a dead sandbox
        try:
            await self._call(self._actor.restart)
        except SandboxStartError as exc:
            self._dead = str(exc)
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.shield(self._remove())

    async def idle_seconds(self) -> float:
        """Seconds since any process last used this sandbox (the pool's idle reaping asks before reaping)."""
        idle: float = await self._call(self._actor.idle_seconds)
        return idle

    def detach(self) -> None:
        """Stop using this sandbox here without closing it: it lives on for other processes (`attach`)."""
        self._closed = True
        self._let_go()

    def _let_go(self) -> None:
        """Stop what this process holds of the sandbox: the actor watch and the channel's connections."""
        self._watch.cancel()
        if self._channel is not None:
            self._channel.close()

    async def _remove(self) -> None:
        if not self._actor_lost:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._actor.close.remote()
            except (RayActorError, RayTaskError, TimeoutError) as exc:
                log.warning("closing sandbox %s on %s: %s", self.id, self.node.hostname, exc)
        ray.kill(self._actor, no_restart=True)
        self._let_go()

    # --- the kernel API of a local sandbox has no meaning here ------------------------------------------

    async def start(self) -> None:
        _node_only("start")

    @contextlib.asynccontextmanager
    async def exclusive(self, timeout: float | None = None) -> AsyncIterator[None]:
        _node_only("exclusive")
        yield

    async def comm_request(self, *args: Any, **kwargs: Any) -> Any:
        _node_only("comm_request")


class RayFiles(Files):
    """`Files` of a Ray sandbox: each transfer is one actor call; the actor's own `Files` does it on
    the node. Paths are checked here too, so a bad one fails before anything travels."""

    def __init__(self, sandbox: RaySandbox) -> None:
        self._ray = sandbox

    async def put(self, path: str, data: bytes, timeout: float | None = None) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UsageError(f"files.put({path!r}): expected bytes, got {type(data).__name__}")
        await self._ray._call(self._ray._actor.put_file, workspace_path(path), bytes(data), timeout)

    async def get(self, path: str, timeout: float | None = None, max_bytes: int | None = None) -> bytes:
        data: bytes = await self._ray._call(self._ray._actor.get_file, workspace_path(path), timeout, max_bytes)
        return data

    async def list(self, path: str = "", timeout: float | None = None) -> builtins.list[str]:
        names: builtins.list[str] = await self._ray._call(
            self._ray._actor.list_files, workspace_path(path, allow_root=True), timeout
        )
        return names

    async def remove(self, path: str, timeout: float | None = None) -> None:
        await self._ray._call(self._ray._actor.remove_file, workspace_path(path), timeout)

    async def put_dir(self, local_dir: str | Path, path: str, timeout: float | None = None) -> builtins.list[str]:
        rel = workspace_path(path, allow_root=True)
        files = {inner: source.read_bytes() for inner, source in regular_files(local_dir)}
        written: builtins.list[str] = await self._ray._call(self._ray._actor.put_dir, files, rel, timeout)
        return written

    async def get_dir(
        self, path: str, local_dir: str | Path, timeout: float | None = None, max_bytes: int | None = None
    ) -> builtins.list[str]:
        rel = workspace_path(path, allow_root=True)
        files: dict[str, bytes] = await self._ray._call(self._ray._actor.get_dir, rel, timeout, max_bytes)
        top = Path(local_dir)
        top.mkdir(parents=True, exist_ok=True)
        top = top.resolve()
        written: builtins.list[Path] = []
        try:
            for inner, data in files.items():
                destination = local_destination(top, inner, self._ray.id)
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(data)
                written.append(destination)
        except BaseException:
            for done in written:
                done.unlink(missing_ok=True)
            raise
        return [str(p) for p in written]


def _batch_emitter(emit: Emit) -> OnBatch:
    def on_batch(batch: list[StreamEvent]) -> None:
        for event in batch:
            emit(event)

    return on_batch


def _spare_made(task: asyncio.Task[Any]) -> None:
    """A spare that could not be made is only a start without one: say why, once."""
    if not task.cancelled() and task.exception() is not None:
        log.info("no spare Ray sandbox actor: %s", task.exception())


def _raise_cause(exc: RayTaskError) -> NoReturn:
    """What the actor raised, as itself (a SandboxError keeps its class and message)."""
    cause = exc.cause
    if isinstance(cause, Exception):
        raise cause from None
    raise SandboxError(f"a sandbox call failed on its node: {exc}") from None


def _why(exc: RayActorError) -> str:
    """The first line of Ray's account of an actor's death (e.g. that its node died)."""
    text = str(getattr(exc, "error_msg", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _death_causes(names: set[str]) -> dict[str, str]:
    from ray._private import state  # the GCS's actor table (Ray's state API would need the dashboard)

    last: dict[str, dict[str, Any]] = {}
    for record in state.actors().values():
        name = record.get("Name")
        if name in names and record.get("State") == "DEAD" and (record.get("EndTime") or 0) >= (
                last.get(name, {}).get("EndTime") or 0):
            last[name] = record
    causes = {name: _death_cause(record) for name, record in last.items()}
    return {name: cause for name, cause in causes.items() if cause is not None}


def _closed_on_purpose(actor_id: str, within: float = 5.0) -> bool:
    """Whether the actor's record says it was killed on purpose (a close kills it after removing its
    container), waiting a moment for the record of a death that a call here learnt of first."""
    from ray._private import state  # the GCS's actor table (Ray's state API would need the dashboard)

    deadline = time.monotonic() + within
    while (record := state.actors(actor_id=actor_id)) and record.get("State") != "DEAD" \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(record) and record.get("State") == "DEAD" and _killed_on_purpose(record.get("DeathCause"))


def _killed_on_purpose(cause: Any) -> bool:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext  # type: ignore[attr-defined]

    return cause is not None and cause.WhichOneof("context") == "actor_died_error_context" and \
        cause.actor_died_error_context.reason in (ActorDiedErrorContext.RAY_KILL, ActorDiedErrorContext.OUT_OF_SCOPE,
                                                  ActorDiedErrorContext.REF_DELETED)


def _death_cause(record: dict[str, Any]) -> str | None:
    from ray.core.generated.common_pb2 import ActorDiedErrorContext  # type: ignore[attr-defined]

    node = str(record.get("Address", {}).get("NodeID", ""))[:12] or "?"
    cause: Any = record.get("DeathCause")
    if cause is None or _killed_on_purpose(cause):
        return None  # no cause known, or closed on purpose
    which = cause.WhichOneof("context")
    if which == "actor_died_error_context":
        context = cause.actor_died_error_context
        detail = context.error_message
        if context.reason == ActorDiedErrorContext.NODE_DIED:
            info = context.node_death_info.reason_message
            return f"Ray node {node} lost: {_first_line(info or detail) or 'the node died'}"
        why = _first_line(detail) or ActorDiedErrorContext.Reason.Name(context.reason)
        return f"its Ray actor died on node {node}: {why}"
    if which == "oom_context":
        return f"its Ray actor was killed for memory on node {node}: {_first_line(cause.oom_context.error_message)}"
    if which:
        return f"its Ray actor failed on node {node} ({which.removesuffix('_context').replace('_', ' ')})"
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text and text.strip() else ""


def _node_only(name: str) -> NoReturn:
    raise UsageError(f"RaySandbox.{name}: the kernel of a Ray sandbox is reached through its actor only")

