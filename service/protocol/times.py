"""Times on the wire: ISO-8601 in UTC (`2026-12-01T04:50:00.123456Z`). The server keeps epoch seconds;
a number given for a timestamp is read as such."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_utc)]
