"""Sandboxes and datasets as they travel over HTTP (the request for a new sandbox is checked by the
server's `SandboxRequest`, which knows the tenant's limits)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .times import Timestamp


class ExecuteRequest(BaseModel):
    code: str
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds; default: the sandbox's")


class CommandRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1, description="the program and its arguments (no shell)")
    cwd: str | None = Field(default=None, description="a folder in the workspace; default: the workspace")
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds; default: the sandbox's")


class FileList(BaseModel):
    files: list[str] = Field(description="regular files under the folder, recursively, relative to it, sorted")


class SandboxInfo(BaseModel):
    id: str
    status: str
    created_at: Timestamp
    spec: dict[str, Any] = Field(description="what the sandbox was created with")
    dataset_id: str | None = Field(default=None, description="the dataset mounted read-only at /data")


class SandboxList(BaseModel):
    sandboxes: list[SandboxInfo]


class SandboxStatus(BaseModel):
    status: str


class DatasetInfo(BaseModel):
    id: str
    name: str
    size_bytes: int
    created_at: Timestamp
    layout: dict[str, Any] = Field(description="what the server detected: perturbation column, controls, kind")
    reused: bool = Field(default=False, description="an upload of bytes the tenant had stored already: that "
                         "dataset, its storage counted once")


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]
