"""Sandboxes and datasets as they travel over HTTP (the request for a new sandbox is checked by the
server's `SandboxRequest`, which knows the tenant's limits)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ExecuteRequest(BaseModel):
    code: str
    timeout: float | None = Field(default=None, gt=0, le=86400, description="seconds; default: the sandbox's")


class SandboxInfo(BaseModel):
    id: str
    status: str
    created_at: float
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
    created_at: float
    layout: dict[str, Any] = Field(description="what the server detected: perturbation column, controls, kind")


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]
