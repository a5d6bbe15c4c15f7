"""Errors the client raises: one type per answer class, the same for HTTP and gRPC."""

from __future__ import annotations

from service.errors import CellForgeError


class APIError(CellForgeError):
    """The server refused or failed a call. `status` is the HTTP status (gRPC codes are mapped to it)."""

    def __init__(self, status: int, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


class AuthenticationError(APIError):
    pass


class NotFoundError(APIError):
    pass


class QuotaError(APIError):
    pass


class InvalidRequestError(APIError):
    pass


_BY_STATUS = {401: AuthenticationError, 404: NotFoundError, 429: QuotaError, 400: InvalidRequestError,
              413: InvalidRequestError, 422: InvalidRequestError}


def api_error(status: int, kind: str, message: str, retry_after: float | None = None) -> APIError:
    return _BY_STATUS.get(status, APIError)(status, kind, message, retry_after)
