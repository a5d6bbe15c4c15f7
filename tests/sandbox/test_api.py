"""The shape of the sandbox API: backends by kind, one error root, facades that mirror the async
sandbox, in-kernel code as real modules, and a light `import sandbox` (local kernels; no engine)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest

import sandbox
from sandbox import (
    BackendKind,
    DockerBackend,
    LocalBackend,
    PooledSandbox,
    RayBackend,
    Sandbox,
    SandboxError,
    SandboxPool,
    SandboxReaped,
    SandboxSpec,
    SpecError,
    StdoutEvent,
    SyncSandbox,
    UsageError,
    backend_class,
    new_backend,
)
from sandbox import inkernel
from sandbox.facade import Blocking, blocking
from sandbox.files import Files
from sandbox.sync import SyncFiles

in_module_loop = pytest.mark.asyncio(loop_scope="module")


def test_backends_are_chosen_by_kind():
    assert backend_class("docker") is DockerBackend and backend_class(BackendKind.LOCAL) is LocalBackend
    assert isinstance(new_backend("local"), LocalBackend)
    assert backend_class("ray") is RayBackend
    assert {cls.kind for cls in (DockerBackend, LocalBackend, RayBackend)} == set(BackendKind)
    with pytest.raises(UsageError, match="unknown sandbox backend 'k8s'; expected one of docker, local, ray"):
        new_backend("k8s")


def _sandbox_modules() -> list:
    return [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(sandbox.__path__, "sandbox.")
        if info.name not in ("sandbox.supervisor", "sandbox.inkernel.files", "sandbox.inkernel.run_command")
    ]


def test_every_sandbox_exception_derives_from_one_root_with_a_name_of_its_own():
    from service.api import errors as service_errors

    defined = {
        obj
        for module in _sandbox_modules()
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }
    public = {cls for cls in defined if not cls.__name__.startswith("_")}
    assert public, "no exception classes found"
    assert [cls.__name__ for cls in public if not issubclass(cls, SandboxError)] == []
    names = [cls.__name__ for cls in public]
    assert len(names) == len(set(names))
    service_names = {n for n, obj in vars(service_errors).items() if isinstance(obj, type)}
    assert set(names) & service_names == set()


def test_the_sandbox_package_never_imports_the_service():
    importers = []
    for path in Path(sandbox.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(name.split(".")[0] == "service" for name in names):
                importers.append(f"{path.name}:{node.lineno}")
    assert importers == []


def test_invalid_specs_are_spec_errors_naming_the_field_however_built():
    cases = [
        ({"memory": "lots"}, "invalid sandbox spec: memory: expected a size like '512m' or '2g', got 'lots'"),
        ({"cpus": 0}, "invalid sandbox spec: cpus: Input should be greater than 0"),
        ({"cpu": 2}, "invalid sandbox spec: cpu: Extra inputs are not permitted"),
        ({"mounts": [{"source": "rel"}]}, "invalid sandbox spec: mounts.0: invalid mount: mount source: expected an "
                                          "absolute path, got 'rel'"),
    ]
    for values, message in cases:
        for build in (lambda v: SandboxSpec(**v), SandboxSpec.parse):
            with pytest.raises(SpecError) as caught:
                build(values)
            assert str(caught.value) == message and isinstance(caught.value, SandboxError)
    with pytest.raises(SpecError, match="memory: .*'lots'; .*env: 'LD_PRELOAD' is not allowed"):
        SandboxSpec(memory="lots", env={"LD_PRELOAD": "x.so"})  # every problem at once
    with pytest.raises(SpecError, match="^invalid sandbox spec: Input should be a valid dictionary"):
        SandboxSpec.parse(["not", "a", "spec"])


def test_a_facade_that_misses_a_method_of_its_class_fails_where_it_is_defined():
    with pytest.raises(TypeError, match="does not offer get_dir, list, put_dir, remove of Files"):

        class HalfFiles(Blocking[Files], mirrors=Files):
            put = blocking(Files.put)
            get = blocking(Files.get)


def test_facades_carry_the_async_signatures_and_docs():
    for facade in (SyncSandbox, PooledSandbox):
        for name in ("execute", "stream", "interrupt", "restart"):
            mirrored, original = getattr(facade, name), getattr(Sandbox, name)
            assert inspect.signature(mirrored) == inspect.signature(original)
            assert mirrored.__doc__ == original.__doc__
    assert inspect.signature(SyncFiles.put) == inspect.signature(Files.put)


def test_importing_sandbox_loads_no_engine_or_kernel_libraries():
    code = (
        "import sys, sandbox, sandbox.events, sandbox.spec, sandbox.backend\n"
        "print(sorted(m for m in ('docker', 'zmq', 'jupyter_client', 'httpx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


def test_in_kernel_code_is_standard_library_only():
    folder = Path(inkernel.__file__).parent
    for path in folder.glob("*.py"):
        if path.name == "__init__.py":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        # `comm` is the kernel's own comm API, there in every ipykernel.
        assert imported - set(sys.stdlib_module_names) - {"comm"} == set(), path.name


def test_in_kernel_calls_leave_only_the_named_result(tmp_path):
    namespace: dict = {}
    exec(inkernel.call("run_command", "run", ["sh", "-c", "exit 3"], str(tmp_path), result="rc"), namespace)
    assert {k for k in namespace if k != "__builtins__"} == {"rc"} and namespace["rc"] == 3
    with pytest.raises(UsageError, match="not a plain literal"):
        inkernel.call("run_command", "run", object())


async def test_backend_health_is_reported_without_raising():
    assert (await LocalBackend().health()).ok
    broken = await LocalBackend(python="/no/such/python").health()
    assert not broken.ok and "/no/such/python" in broken.detail


@pytest.mark.docker
async def test_docker_backend_health_names_the_engine_or_why_not(docker_image):
    async with DockerBackend() as backend:
        health = await backend.health()
        assert health.ok and "Docker engine" in health.detail and "runc" in health.detail
    unreachable = DockerBackend(client=docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version="1.41"))
    health = await unreachable.health()
    assert not health.ok and "not usable" in health.detail


def test_sync_sandbox_offers_files_and_commands_blocking():
    with SyncSandbox(SandboxSpec(timeout=20), backend="local") as sb:
        assert not sb.isolated
        sb.files.put("code/run.py", b"print('from a file')\n")
        sb.files.put("code/old.py", b"")
        assert sb.files.list() == ["code/old.py", "code/run.py"]
        sb.files.remove("code/old.py")
        assert sb.files.list("code") == ["run.py"] and sb.files.get("code/run.py") == b"print('from a file')\n"
        # Bad arguments are UsageErrors (SandboxErrors) naming what was expected, through the facade too.
        with pytest.raises(UsageError, match="expected a non-empty list of strings, got 'python code/run.py'"):
            sb.commands.run("python code/run.py")
        with pytest.raises(UsageError, match=r"files.put\('x.txt'\): expected bytes, got str"):
            sb.files.put("x.txt", "text")
        res = sb.commands.run(["python", "code/run.py"])
        assert res.outcome == "ok" and res.stdout == "from a file\n" and res.exit_code == 0
        events = list(sb.stream("print(6 * 7)"))
        assert [e.text for e in events if isinstance(e, StdoutEvent)] == ["42\n"] and events[-1].ok
        base = Path(sb.workspace).parent
    assert not base.exists()


@in_module_loop
async def test_a_released_lease_refuses_files_and_commands_and_activity_is_counted():
    spec = SandboxSpec(timeout=20)
    async with SandboxPool(LocalBackend(), [], warm=0, preload="") as pool:
        lease = await pool.acquire(spec, tenant="t1")
        before = lease.last_active
        await lease.files.put("a.txt", b"a")
        assert lease.last_active > before and not lease.busy
        assert (await lease.commands.run(["cat", "a.txt"])).stdout == "a"
        await lease.close()
        with pytest.raises(SandboxReaped, match="released"):
            await lease.files.get("a.txt")
        with pytest.raises(SandboxReaped, match="released"):
            await lease.commands.run(["true"])
        assert pool.stats().live_per_tenant == {}
