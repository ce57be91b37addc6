"""Events a TcpConnection reports to its user, and the error for API misuse.

Rules:
- Events are frozen slotted values; the user polls them with `conn.next_event()` until it
  returns None (aioquic `next_event`, h11 `Event`).
- Order: `Connected` first; `DataReceived` in stream order; `PeerFinished` after the last
  byte of the peer's stream (RFC 9293 §3.10.7.4 "eighth, check the FIN bit": the FIN is
  signalled after all preceding text); `ConnectionReset` when the peer reset or the
  connection timed out (RFC 9293 MUST-12: aborts are reported); `Closed` is always last.
  `ResetToListen`: a passive open's SYN-RECEIVED was reset back to LISTEN (MUST-11).
- `UrgentData` marks urgent data (RFC 9293 §3.8.5, MUST-30..33): it is queued when the
  peer's urgent pointer first appears or advances (MUST-32), before the DataReceived that
  carries those bytes; the bytes themselves stay inline in the stream.
- `SoftError` reports an ICMP soft error (RFC 9293 §3.9.1.4 SHLD-25: make the information
  available to the application); the connection goes on (MUST-56).
- What an ICMP error means for a connection (RFC 9293 §3.9.1.4, `icmp_effect`):
  Destination Unreachable codes 0, 1, 5, Time Exceeded and Parameter Problem are soft
  errors: never abort (MUST-56). Unreachable codes 2 and 3 (protocol, port) are hard and
  abort (SHLD-26); so is ICMPv6 code 4 (port unreachable, RFC 4443 §3.1), the other
  ICMPv6 codes are soft. IPv4 code 4 is Fragmentation Needed: path MTU discovery
  (RFC 1191), never an abort (aborting would let PMTUD kill the connection), as is
  ICMPv6 Packet Too Big (RFC 8201). Source Quench is ignored (MUST-55, RFC 6633).
- `LocalProtocolError` is raised only for misuse of our own API (sending after close,
  connecting twice, ...); a misbehaving peer never raises (h11 `LocalProtocolError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

__all__ = [
    "Event",
    "Connected",
    "DataReceived",
    "PeerFinished",
    "ConnectionReset",
    "ResetToListen",
    "Closed",
    "SoftError",
    "UrgentData",
    "IcmpKind",
    "IcmpEffect",
    "icmp_effect",
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
    RFC 9293 §3.8.3), "refused" (RST answering our SYN) or "unreachable" (an ICMP hard
    error, RFC 9293 §3.9.1.4 SHLD-26)."""

    reason: str = "reset"


@dataclass(frozen=True, slots=True)
class ResetToListen(Event):
    """An acceptable RST in SYN-RECEIVED of a passive open: the connection is back in
    LISTEN (RFC 9293 §3.10.7.4 second step, MUST-11). The RFC says the user "need not be
    informed"; a user that listens for one given SYN (the splice's client leg) must be,
    or it waits for a client that already gave up."""


@dataclass(frozen=True, slots=True)
class Closed(Event):
    """The connection reached CLOSED; no event follows."""


class IcmpKind(StrEnum):
    """What an ICMP/ICMPv6 error said about a connection (`conn.icmp_error`)."""

    UNREACHABLE = "unreachable"  # ICMP type 3 / ICMPv6 type 1 (code in the family's terms)
    PACKET_TOO_BIG = "packet_too_big"  # ICMPv6 type 2 (IPv4: unreachable code 4 with MTU)
    TIME_EXCEEDED = "time_exceeded"  # ICMP type 11 / ICMPv6 type 3
    PARAMETER_PROBLEM = "parameter_problem"  # ICMP type 12 / ICMPv6 type 4
    SOURCE_QUENCH = "source_quench"  # ICMP type 4 (deprecated, RFC 6633)


class IcmpEffect(Enum):
    """What an ICMP error does to a connection (RFC 9293 §3.9.1.4)."""

    IGNORE = "ignored (Source Quench, MUST-55)"
    PATH_MTU = "path MTU discovery (RFC 1191, RFC 8201)"
    HARD = "abort (SHLD-26)"
    SOFT = "report, go on (MUST-56, SHLD-25)"


def icmp_effect(kind: IcmpKind, code: int, v4: bool) -> IcmpEffect:
    """Classify one ICMP (`v4`) or ICMPv6 error by kind and code."""
    if kind is IcmpKind.SOURCE_QUENCH:
        return IcmpEffect.IGNORE
    if kind is IcmpKind.PACKET_TOO_BIG or (kind is IcmpKind.UNREACHABLE and v4 and code == 4):
        return IcmpEffect.PATH_MTU
    if kind is IcmpKind.UNREACHABLE and (code in (2, 3) if v4 else code == 4):
        return IcmpEffect.HARD
    return IcmpEffect.SOFT


@dataclass(frozen=True, slots=True)
class SoftError(Event):
    """An ICMP soft error arrived for this connection (RFC 9293 §3.9.1.4, SHLD-25); it
    goes on (MUST-56). `kind` and `code` are as passed to `icmp_error`."""

    kind: IcmpKind
    code: int


@dataclass(frozen=True, slots=True)
class UrgentData(Event):
    """The peer's urgent data now extends to stream offset `end` (exclusive: the urgent
    pointer names the first non-urgent octet, MUST-31). The urgent bytes are delivered
    inline, in order, by DataReceived / read(); `conn.urgent_remaining` says how many of
    them are still to be read (MUST-33)."""

    end: int
