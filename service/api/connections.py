"""Connection-level defences of the HTTP server, which uvicorn does not have:

- a header timeout: a connection must deliver a complete request head (request line and headers)
  within `header_timeout` seconds of connecting or of its previous response, else it is closed
  (uvicorn's keep-alive timer only starts after a first response, and any byte resets it);
- connection caps: over `max_connections` open connections, or `max_per_client` from one address, a
  new connection is closed at once, so half-open clients cannot use up the file descriptors;
- a lingering close: a connection answered before its request body was read (401, 413 from the headers) is
  half-closed after the answer and closed `linger` seconds later, reading nothing more; closing at once with
  the unread body in the socket resets the connection, and a client still sending lost the answer with it;
- throttled logging: a flood of failing connections writes a few lines, not one per connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr

log = logging.getLogger("cellforge.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    max_connections: int = 1000
    max_per_client: int = 256
    linger: float = 2.0


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: closing it while the client is still sending the request
    body sends the answer's end (FIN) first, stops reading, and closes the socket `linger` seconds later, so the
    client reads the answer before the reset that unread data causes. Everything else is the transport's."""

    def __init__(self, transport: Any, protocol: H11Protocol, linger: float) -> None:
        self._transport, self._protocol, self._linger = transport, protocol, linger
        self._lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if self._protocol.conn.their_state is not h11.SEND_BODY or not self._transport.can_write_eof():
            self._transport.close()
            return
        self._lingering = True
        self._transport.pause_reading()
        self._transport.write_eof()  # after what is buffered: the answer
        self._protocol.loop.call_later(self._linger, self._transport.close)


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """An h11 protocol class enforcing `limits` (one per server: it counts that server's connections)."""
    per_client: Counter[str] = Counter()

    class GuardedH11Protocol(H11Protocol):
        _timer: Any = None
        _counted: str | None = None

        def connection_made(self, transport: Any) -> None:
            # Checked before uvicorn counts the connection: a refused one never counts against the
            # requests in flight (uvicorn's limit_concurrency counts open connections too).
            address = get_remote_addr(transport)
            host = address[0] if address else "?"
            if len(self.connections) >= limits.max_connections or per_client[host] >= limits.max_per_client:
                log.warning("refused a connection from %s: connection limit reached", host)
                self.transport = transport
                transport.abort()
                return
            super().connection_made(transport)
            self.transport = cast(asyncio.Transport, _LingeringTransport(transport, self, limits.linger))
            per_client[host] += 1
            self._counted = host
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._counted is not None:
                per_client[self._counted] -= 1
                if per_client[self._counted] <= 0:
                    del per_client[self._counted]
                self._counted = None
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request head arrived (or the connection ended)
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's head has the same time to arrive
            super().on_response_complete()
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._disarm()

        def send_400_response(self, msg: str) -> None:
            # h11 refused the request (garbage, a head too large): answer in the API's one error shape,
            # not uvicorn's plain text.
            body = json.dumps({"error": {"type": "BadRequest", "message": msg}}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")) or b"")
                self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
                self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError:  # h11 cannot frame a response in this state: the plain one
                super().send_400_response(msg)
                return
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(limits.header_timeout, self._header_timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _header_timed_out(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                log.warning("closed a connection from %s: no complete request head in %gs",
                            self.client[0] if self.client else "?", limits.header_timeout)
                self.transport.abort()

    return GuardedH11Protocol


class Throttle(logging.Filter):
    """At most `burst` records of one message template per `window` seconds; the first record after a
    window says how many were dropped."""

    def __init__(self, burst: int = 5, window: float = 10.0) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self._seen: dict[tuple[str, Any], list[float | int]] = {}  # key -> [window start, count]

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = (record.name, record.msg)
        start, count = self._seen.get(key, (now, 0))
        if now - start >= self.window:
            dropped = max(0, int(count) - self.burst)
            self._seen[key] = [now, 1]
            if dropped:
                record.msg = f"{record.msg} ({dropped} more like this in the last {self.window:g}s not logged)"
            return True
        self._seen[key] = [start, int(count) + 1]
        return count < self.burst


def throttle_logs(*names: str, burst: int = 5, window: float = 10.0) -> None:
    """Throttle the records of these loggers (uvicorn's error log, ours) to `burst` per message per window."""
    throttle = Throttle(burst, window)
    for name in names:
        logging.getLogger(name).addFilter(throttle)
