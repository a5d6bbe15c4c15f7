"""Errors of the service core; each transport maps them to its own status (HTTP code, gRPC status)."""

from __future__ import annotations

# What a caller hears of a database error (the statement and its parameters stay in the server log).
DATABASE_UNAVAILABLE = "the service's database is busy or unavailable; retry in a few seconds"


class ServiceError(Exception):
    """Base class: a message meant for the API caller."""

    http_status = 500
    grpc_code = "INTERNAL"


class Unauthenticated(ServiceError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class NotFound(ServiceError):
    """Also the answer for another tenant's resources: a caller cannot tell them from absent ones."""

    http_status = 404
    grpc_code = "NOT_FOUND"


class BadRequest(ServiceError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class InvalidDataset(BadRequest):
    """An uploaded file is not a usable perturbation dataset (names what is wrong)."""

    http_status = 422


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class RequestTimeout(ServiceError):
    """The client stopped sending its request body."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class Conflict(ServiceError):
    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class QuotaExceeded(ServiceError):
    """A quota or the rate limit was hit; `retry_after` seconds is when trying again makes sense."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


class Unavailable(ServiceError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
