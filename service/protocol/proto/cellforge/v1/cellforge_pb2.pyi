import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SandboxSpec(_message.Message):
    __slots__ = ("image", "cpus", "memory", "gpus", "timeout", "workspace_quota", "env", "dataset_id", "runtime")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_QUOTA_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    image: str
    cpus: float
    memory: str
    gpus: int
    timeout: float
    workspace_quota: str
    env: _containers.ScalarMap[str, str]
    dataset_id: str
    runtime: str
    def __init__(self, image: _Optional[str] = ..., cpus: _Optional[float] = ..., memory: _Optional[str] = ..., gpus: _Optional[int] = ..., timeout: _Optional[float] = ..., workspace_quota: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., dataset_id: _Optional[str] = ..., runtime: _Optional[str] = ...) -> None: ...

class CreateSandboxRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: SandboxSpec
    def __init__(self, spec: _Optional[_Union[SandboxSpec, _Mapping]] = ...) -> None: ...

class Sandbox(_message.Message):
    __slots__ = ("id", "status", "created_at", "spec_json", "dataset_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: str
    created_at: _timestamp_pb2.Timestamp
    spec_json: str
    dataset_id: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spec_json: _Optional[str] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class SandboxList(_message.Message):
    __slots__ = ("sandboxes",)
    SANDBOXES_FIELD_NUMBER: _ClassVar[int]
    sandboxes: _containers.RepeatedCompositeFieldContainer[Sandbox]
    def __init__(self, sandboxes: _Optional[_Iterable[_Union[Sandbox, _Mapping]]] = ...) -> None: ...

class SandboxRef(_message.Message):
    __slots__ = ("sandbox_id",)
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    def __init__(self, sandbox_id: _Optional[str] = ...) -> None: ...

class ExecuteRequest(_message.Message):
    __slots__ = ("sandbox_id", "code", "timeout")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    code: str
    timeout: float
    def __init__(self, sandbox_id: _Optional[str] = ..., code: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...

class ExecutionResult(_message.Message):
    __slots__ = ("outcome", "stdout", "stderr", "ename", "evalue", "traceback", "died_cause", "duration_ms", "stdout_bytes", "truncated", "result", "state_lost", "exit_code")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    ENAME_FIELD_NUMBER: _ClassVar[int]
    EVALUE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    DIED_CAUSE_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    STDOUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STATE_LOST_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    stdout: str
    stderr: str
    ename: str
    evalue: str
    traceback: _containers.RepeatedScalarFieldContainer[str]
    died_cause: str
    duration_ms: float
    stdout_bytes: int
    truncated: bool
    result: str
    state_lost: bool
    exit_code: int
    def __init__(self, outcome: _Optional[str] = ..., stdout: _Optional[str] = ..., stderr: _Optional[str] = ..., ename: _Optional[str] = ..., evalue: _Optional[str] = ..., traceback: _Optional[_Iterable[str]] = ..., died_cause: _Optional[str] = ..., duration_ms: _Optional[float] = ..., stdout_bytes: _Optional[int] = ..., truncated: _Optional[bool] = ..., result: _Optional[str] = ..., state_lost: _Optional[bool] = ..., exit_code: _Optional[int] = ...) -> None: ...

class ExecuteEvent(_message.Message):
    __slots__ = ("kind", "text", "data_json", "result")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    text: str
    data_json: str
    result: ExecutionResult
    def __init__(self, kind: _Optional[str] = ..., text: _Optional[str] = ..., data_json: _Optional[str] = ..., result: _Optional[_Union[ExecutionResult, _Mapping]] = ...) -> None: ...

class PutFileRequest(_message.Message):
    __slots__ = ("sandbox_id", "path", "data")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    data: bytes
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class FileRef(_message.Message):
    __slots__ = ("sandbox_id", "path")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    path: str
    def __init__(self, sandbox_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class FileData(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class FileNames(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ...) -> None: ...

class CommandRequest(_message.Message):
    __slots__ = ("sandbox_id", "argv", "cwd", "timeout")
    SANDBOX_ID_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    sandbox_id: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    timeout: float
    def __init__(self, sandbox_id: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., timeout: _Optional[float] = ...) -> None: ...

class DatasetChunk(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "name", "size_bytes", "created_at", "layout_json", "reused")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_JSON_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    size_bytes: int
    created_at: _timestamp_pb2.Timestamp
    layout_json: str
    reused: bool
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., layout_json: _Optional[str] = ..., reused: _Optional[bool] = ...) -> None: ...

class DatasetDigest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class DatasetList(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DesignOptions(_message.Message):
    __slots__ = ("seed", "max_attempts", "max_minutes", "max_rounds", "gpus", "memory", "cpus", "max_genes", "max_nodes", "candidates", "runtime", "perturbation_key", "control", "context_key", "dose_key", "scheme", "held_out_context")
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_MINUTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENES_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_KEY_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_KEY_FIELD_NUMBER: _ClassVar[int]
    DOSE_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    seed: int
    max_attempts: int
    max_minutes: float
    max_rounds: int
    gpus: int
    memory: str
    cpus: float
    max_genes: int
    max_nodes: int
    candidates: int
    runtime: str
    perturbation_key: str
    control: str
    context_key: str
    dose_key: str
    scheme: str
    held_out_context: str
    def __init__(self, seed: _Optional[int] = ..., max_attempts: _Optional[int] = ..., max_minutes: _Optional[float] = ..., max_rounds: _Optional[int] = ..., gpus: _Optional[int] = ..., memory: _Optional[str] = ..., cpus: _Optional[float] = ..., max_genes: _Optional[int] = ..., max_nodes: _Optional[int] = ..., candidates: _Optional[int] = ..., runtime: _Optional[str] = ..., perturbation_key: _Optional[str] = ..., control: _Optional[str] = ..., context_key: _Optional[str] = ..., dose_key: _Optional[str] = ..., scheme: _Optional[str] = ..., held_out_context: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("dataset_id", "task", "options")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    task: str
    options: DesignOptions
    def __init__(self, dataset_id: _Optional[str] = ..., task: _Optional[str] = ..., options: _Optional[_Union[DesignOptions, _Mapping]] = ...) -> None: ...

class PytestRegression(_message.Message):
    __slots__ = ("bundle_zip_b64", "job_id", "dataset_id", "timeout", "memory", "cpus")
    BUNDLE_ZIP_B64_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    bundle_zip_b64: str
    job_id: str
    dataset_id: str
    timeout: float
    memory: str
    cpus: float
    def __init__(self, bundle_zip_b64: _Optional[str] = ..., job_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., timeout: _Optional[float] = ..., memory: _Optional[str] = ..., cpus: _Optional[float] = ...) -> None: ...

class CompareRegression(_message.Message):
    __slots__ = ("job_id", "tolerances", "default_tolerance")
    class TolerancesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TOLERANCES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    tolerances: _containers.ScalarMap[str, float]
    default_tolerance: float
    def __init__(self, job_id: _Optional[str] = ..., tolerances: _Optional[_Mapping[str, float]] = ..., default_tolerance: _Optional[float] = ...) -> None: ...

class SubmitRegressionRequest(_message.Message):
    __slots__ = ("pytest", "rescore", "replay")
    PYTEST_FIELD_NUMBER: _ClassVar[int]
    RESCORE_FIELD_NUMBER: _ClassVar[int]
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    pytest: PytestRegression
    rescore: CompareRegression
    replay: CompareRegression
    def __init__(self, pytest: _Optional[_Union[PytestRegression, _Mapping]] = ..., rescore: _Optional[_Union[CompareRegression, _Mapping]] = ..., replay: _Optional[_Union[CompareRegression, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "status", "phase", "error", "created_at", "started_at", "finished_at", "attempts", "params_json", "result_json", "artifacts", "final", "logs")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    status: str
    phase: str
    error: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    attempts: int
    params_json: str
    result_json: str
    artifacts: _containers.RepeatedScalarFieldContainer[str]
    final: bool
    logs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., status: _Optional[str] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., params_json: _Optional[str] = ..., result_json: _Optional[str] = ..., artifacts: _Optional[_Iterable[str]] = ..., final: _Optional[bool] = ..., logs: _Optional[_Iterable[str]] = ...) -> None: ...

class JobList(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobEventsRequest(_message.Message):
    __slots__ = ("job_id", "after_seq")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_seq: int
    def __init__(self, job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("seq", "ts", "kind", "data_json")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    ts: _timestamp_pb2.Timestamp
    kind: str
    data_json: str
    def __init__(self, seq: _Optional[int] = ..., ts: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., kind: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class ArtifactRef(_message.Message):
    __slots__ = ("job_id", "name")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...
