"""Events a TcpConnection reports to its user, and the error for API misuse.

Rules:
- Events are frozen slotted values; the user polls them with `conn.next_event()` until it
  returns None (aioquic `next_event`, h11 `Event`).
- Order: `Connected` first; `DataReceived` in stream order; `PeerFinished` after the last
  byte of the peer's stream (RFC 9293 §3.10.7.4 "eighth, check the FIN bit": the FIN is
  signalled after all preceding text); `ConnectionReset` when the peer reset or the
  connection timed out (RFC 9293 MUST-12: aborts are reported); `Closed` is always last.
- `LocalProtocolError` is raised only for misuse of our own API (sending after close,
  connecting twice, ...); a misbehaving peer never raises (h11 `LocalProtocolError`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Event",
    "Connected",
    "DataReceived",
    "PeerFinished",
    "ConnectionReset",
    "Closed",
    "LocalProtocolError",
]


class LocalProtocolError(Exception):
    """Our own caller used the API wrongly (never raised for peer behaviour)."""


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of connection events. Do not subclass outside this module."""


@dataclass(frozen=True, slots=True)
class Connected(Event):
    """The three-way handshake completed (RFC 9293 §3.5): the state is ESTABLISHED."""


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """In-order bytes from the peer. Without auto-consume, call `conn.consumed(len(data))`."""

    data: bytes


@dataclass(frozen=True, slots=True)
class PeerFinished(Event):
    """The peer sent FIN: its stream is over; ours may go on (half-close, RFC 9293 §3.6)."""


@dataclass(frozen=True, slots=True)
class ConnectionReset(Event):
    """The connection was aborted: `reason` is "reset" (peer RST), "timeout" (R2 reached,
    RFC 9293 §3.8.3) or "refused" (RST answering our SYN)."""

    reason: str = "reset"


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The connection reached CLOSED; no event follows."""
