"""Request limits, the same on both transports: per-tenant rate limiting (a token bucket refilled at the
tenant's rate, holding twice that as burst) and the largest request body or message of each call."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import QuotaExceeded
from .jobs_api import BUNDLE_MAX_BYTES
from .sandboxes import MAX_FILE_BYTES

JSON_BODY_BYTES = 1 << 20
# A file put carries its path too; a regression its bundle inline, as base64.
FILE_BODY_BYTES = MAX_FILE_BYTES + (64 << 10)
REGRESSION_BODY_BYTES = BUNDLE_MAX_BYTES * 4 // 3 + (64 << 10)
# One message of a gRPC dataset upload (the client sends 1 MiB chunks); the whole upload has the
# dataset limit.
DATASET_CHUNK_BYTES = 4 << 20


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def check(self, tenant_id: str, rate: float) -> None:
        """Take one token or raise QuotaExceeded with the seconds until one is back."""
        burst = max(1.0, 2 * rate)
        now = time.monotonic()
        bucket = self._buckets.get(tenant_id)
        if bucket is None:
            bucket = self._buckets[tenant_id] = _Bucket(tokens=burst, updated=now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise QuotaExceeded(f"rate limit of {rate:g} requests/s exceeded; retry in {wait:.1f}s", retry_after=wait)
        bucket.tokens -= 1.0
