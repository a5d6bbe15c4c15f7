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
    JobLogs,
    PytestRegression,
    RegressionRequest,
    RegressionRequestAdapter,
)
from .sandboxes import (
    CommandRequest,
    DatasetInfo,
    DatasetList,
    ExecuteRequest,
    FileList,
    SandboxInfo,
    SandboxList,
    SandboxStatus,
)
from .times import Timestamp

__all__ = [
    "FINAL_JOB_STATES",
    "CommandRequest",
    "CompareRegression",
    "DatasetInfo",
    "DatasetList",
    "DesignJobRequest",
    "DesignOptions",
    "ErrorBody",
    "ErrorDetail",
    "ExecuteRequest",
    "FileList",
    "JobEvent",
    "JobInfo",
    "JobList",
    "JobLogs",
    "PytestRegression",
    "RegressionRequest",
    "RegressionRequestAdapter",
    "SandboxInfo",
    "SandboxList",
    "SandboxStatus",
    "Timestamp",
    "problems",
    "unknown_fields",
]
