"""What a sandbox is allowed: image, limits, GPUs, data mounts, environment, labels, runtime.

A spec is validated when it is built, so a bad value fails at the boundary with the field, the value
and what was expected, never later inside the Docker engine.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError

IMAGE_REPOSITORY = "cellforge-sandbox"
# Built by `cellforge images build` (sandbox.images).
DEFAULT_CPU_IMAGE = f"{IMAGE_REPOSITORY}:cpu"
DEFAULT_GPU_IMAGE = f"{IMAGE_REPOSITORY}:gpu"
DATA_ROOT = "/data"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# A kernel (Python + IPython + ipykernel) needs about 60 MiB before any user code runs.
MIN_MEMORY_BYTES = 96 << 20
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Variables that change how the dynamic loader or the interpreter starts: they would let a spec
# inject code into the kernel's start-up, before any of our own code runs.
_FORBIDDEN_ENV_PREFIXES = ("LD_", "DYLD_")
_FORBIDDEN_ENV_KEYS = frozenset({
    "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONEXECUTABLE", "PYTHONUSERBASE",
    "IPYTHONDIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_PATH", "HOME", "PATH",
})
_LABEL_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
_GPU_ID_RE = re.compile(r"^(\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+)$")
_RESOURCE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,63}$")
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})
_RUNTIME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_size(value: str | int, what: str = "size") -> int:
    """Bytes in a Docker-style size (`512m`, `2g`, `1.5G`, `1024`); SpecError when unreadable."""
    if isinstance(value, bool):
        raise SpecError(f"{what}: expected a size like '512m' or '2g', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise SpecError(f"{what}: expected a positive size, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise SpecError(f"{what}: expected a size like '512m' or '2g', got {value!r}")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _SIZE_UNITS[unit])
    if size <= 0:
        raise SpecError(f"{what}: expected a positive size, got {value!r}")
    return size


def _clean_abs_path(value: str, field: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise SpecError(f"{field}: expected an absolute path, got {value!r}")
    if "\x00" in value or any(part == ".." for part in value.split("/")):
        raise SpecError(f"{field}: path must not contain '..' or NUL, got {value!r}")
    return posixpath.normpath(value)


def _spec_error(exc: ValidationError, what: str) -> SpecError:
    """One SpecError naming every problem. Our validators' SpecErrors already name their field, so
    only a nested one (a mount of a spec) gets its place in front."""
    problems = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        where = ".".join(str(p) for p in err["loc"])
        if isinstance(cause, SpecError):
            if not where:  # raised by a model's own __init__ (pydantic validates through it)
                return cause
            problems.append(f"{where}: {cause}" if len(err["loc"]) > 1 else str(cause))
        else:
            problems.append(f"{where}: {err['msg']}" if where else err["msg"])
    return SpecError(f"invalid {what}: {'; '.join(problems)}")


class _Checked(BaseModel):
    """A model whose invalid values raise `SpecError` (a `SandboxError`), built or parsed."""

    _what: ClassVar[str]

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _spec_error(exc, self._what) from None

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Build from untrusted data (API, config); SpecError naming every problem."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise _spec_error(exc, cls._what) from None


class Mount(_Checked):
    """A host folder (a dataset split) mounted read-only under /data in the sandbox."""

    _what = "mount"

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    target: str = DATA_ROOT
    read_only: bool = True

    @field_validator("source")
    @classmethod
    def _source_absolute(cls, value: str) -> str:
        return _clean_abs_path(value, "mount source")

    @field_validator("target")
    @classmethod
    def _target_under_data(cls, value: str) -> str:
        target = _clean_abs_path(value, "mount target")
        if target != DATA_ROOT and not target.startswith(DATA_ROOT + "/"):
            raise SpecError(f"mount target: expected {DATA_ROOT} or a path under it, got {value!r}")
        return target

    @field_validator("read_only")
    @classmethod
    def _must_be_read_only(cls, value: bool) -> bool:
        # Writable host folders would let sandboxed code write to the host past every quota.
        if not value:
            raise SpecError("mount read_only: data mounts are read-only; write into /workspace instead")
        return value


GpuSelection = Annotated[int, Field(ge=0)] | list[str] | None


class SandboxSpec(_Checked):
    """Limits and contents of one sandbox. Sizes are Docker-style strings (`512m`, `2g`)."""

    _what = "sandbox spec"

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str = DEFAULT_CPU_IMAGE
    cpus: float = Field(default=1.0, gt=0, le=512)
    memory: str = "1g"
    gpus: GpuSelection = None
    timeout: float = Field(default=60.0, gt=0, description="default seconds per execution")
    pids_limit: int = Field(default=256, ge=16, le=1 << 22)
    nofile: int = Field(
        default=1024,
        ge=64,
        le=1 << 20,
        description="open files per process (soft and hard limit); with pids_limit it caps the sandbox's share "
        "of the host's file table",
    )
    tmpfs_size: str = "256m"
    workspace_quota: str = "1g"
    mounts: list[Mount] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    runtime: str | None = None
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom resources a cluster node must offer to host this sandbox, e.g. {'zone_a': 0.01} (the "
        "Ray backend places by them; a single machine has no choice to make)",
    )
    output_limit: int = Field(default=1 << 20, ge=1024, description="bytes of output kept per execution")
    interrupt_grace: float = Field(default=3.0, gt=0, description="seconds an interrupt may take before a restart")
    start_timeout: float = Field(default=60.0, gt=0, description="seconds for the kernel to become ready")

    @field_validator("image")
    @classmethod
    def _image_named(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise SpecError(f"image: expected an image reference like 'cellforge-sandbox:cpu', got {value!r}")
        return value

    @field_validator("memory")
    @classmethod
    def _memory_size(cls, value: str) -> str:
        if parse_size(value, "memory") < MIN_MEMORY_BYTES:
            raise SpecError(f"memory: a kernel needs at least {MIN_MEMORY_BYTES >> 20}m, got {value!r}")
        return value

    @field_validator("tmpfs_size", "workspace_quota")
    @classmethod
    def _sizes(cls, value: str, info) -> str:
        parse_size(value, info.field_name)
        return value

    @field_validator("gpus")
    @classmethod
    def _gpu_ids(cls, value: GpuSelection) -> GpuSelection:
        if isinstance(value, list):
            if not value:
                raise SpecError("gpus: expected None, a count or a non-empty list of device ids, got []")
            for device in value:
                if not _GPU_ID_RE.match(device):
                    raise SpecError(f"gpus: expected device ids like '0' or 'GPU-<uuid>', got {device!r}")
            if len(set(value)) != len(value):
                raise SpecError(f"gpus: device ids repeat in {value!r}")
        return value

    @field_validator("env")
    @classmethod
    def _env_safe(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _ENV_KEY_RE.match(key):
                raise SpecError(f"env: expected variable names like 'MY_VAR', got {key!r}")
            if key.upper().startswith(_FORBIDDEN_ENV_PREFIXES) or key.upper() in _FORBIDDEN_ENV_KEYS:
                raise SpecError(f"env: {key!r} is not allowed (it controls how the kernel starts)")
            if "\x00" in val:
                raise SpecError(f"env: value of {key!r} contains a NUL byte")
        return value

    @field_validator("labels")
    @classmethod
    def _labels_plain(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _LABEL_KEY_RE.match(key):
                raise SpecError(f"labels: expected lowercase keys like 'tenant', got {key!r}")
            if len(val) > 256 or "\x00" in val:
                raise SpecError(f"labels: value of {key!r} must be under 256 characters without NUL")
        return value

    @field_validator("runtime")
    @classmethod
    def _runtime_name(cls, value: str | None) -> str | None:
        if value is not None and not _RUNTIME_RE.match(value):
            raise SpecError(f"runtime: expected a runtime name like 'runsc', got {value!r}")
        return value

    @field_validator("resources")
    @classmethod
    def _resources_named(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not _RESOURCE_RE.match(name) or name in _BUILTIN_RESOURCES:
                raise SpecError(
                    f"resources: expected custom resource names like 'zone_a' (cpus, memory and gpus are fields of "
                    f"their own), got {name!r}"
                )
            if not 0 < amount <= 1e6:
                raise SpecError(f"resources: amount of {name!r} must be above 0 and at most 1e6, got {amount!r}")
        return value

    @model_validator(mode="after")
    def _mount_targets_distinct(self) -> SandboxSpec:
        targets = [m.target for m in self.mounts]
        if len(set(targets)) != len(targets):
            raise SpecError(f"mounts: two mounts share a target in {targets!r}")
        return self

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory, "memory")

    @property
    def tmpfs_bytes(self) -> int:
        return parse_size(self.tmpfs_size, "tmpfs_size")

    @property
    def workspace_bytes(self) -> int:
        return parse_size(self.workspace_quota, "workspace_quota")

    @property
    def tenant(self) -> str:
        return self.labels.get("tenant", "")
