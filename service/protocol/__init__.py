"""The wire protocol: the typed requests and answers the HTTP routes and gRPC methods exchange, and the
generated gRPC stubs (`service.protocol.proto`).

Depends on pydantic only (the stubs on protobuf and grpcio), so a client installs it without the server.
"""

from .errors import ErrorBody, ErrorDetail, problems, unknown_fields
from .jobs import (
    FINAL_JOB_STATES,
    CompareRegression,
    DesignJobRequest,
    DesignOptions,
    JobEvent,
    JobInfo,
    JobList,
    PytestRegression,
    RegressionRequest,
)
from .sandboxes import DatasetInfo, DatasetList, ExecuteRequest, SandboxInfo, SandboxList, SandboxStatus

__all__ = [
    "FINAL_JOB_STATES",
    "CompareRegression",
    "DatasetInfo",
    "DatasetList",
    "DesignJobRequest",
    "DesignOptions",
    "ErrorBody",
    "ErrorDetail",
    "ExecuteRequest",
    "JobEvent",
    "JobInfo",
    "JobList",
    "PytestRegression",
    "RegressionRequest",
    "SandboxInfo",
    "SandboxList",
    "SandboxStatus",
    "problems",
    "unknown_fields",
]
