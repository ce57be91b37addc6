"""TCP connection states (RFC 9293 §3.3.2, Figure 5).

Rules:
- The eleven states and their RFC names: `str(State.SYN_RECEIVED) == "SYN-RECEIVED"`.
- "Synchronized" states (RFC 9293 §3.5.2 and §3.10.7.4): ESTABLISHED and every state
  after it; in them an unacceptable segment gets an ACK and a SYN gets a challenge ACK
  (RFC 5961 §4). Before them (LISTEN, SYN-SENT, SYN-RECEIVED) a bad ACK gets a RST.
- States in which our side may still send data: ESTABLISHED and CLOSE-WAIT (RFC 9293
  §3.10.2 SEND). States in which the peer may still send data: ESTABLISHED, FIN-WAIT-1,
  FIN-WAIT-2 (§3.10.7.4, "sixth, check the URG bit" / "seventh, process the segment text").

Theory of operation: the connection keeps a `State` member and dispatches on it; the sets
below are the data the per-state handlers consult, so that the rules sit in one place.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["State", "SYNCHRONIZED", "CAN_SEND", "CAN_RECEIVE", "FIN_RECEIVED"]


class State(Enum):
    """RFC 9293 §3.3.2 connection states."""

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"

    def __str__(self) -> str:
        return self.value

    # Members are singletons compared by identity: hash them by identity too, in C.
    # (Enum.__hash__ is Python code hashing the name; `state in SOME_SET` runs per segment.)
    __hash__ = object.__hash__


SYNCHRONIZED = frozenset(
    {
        State.ESTABLISHED,
        State.FIN_WAIT_1,
        State.FIN_WAIT_2,
        State.CLOSE_WAIT,
        State.CLOSING,
        State.LAST_ACK,
        State.TIME_WAIT,
    }
)
CAN_SEND = frozenset({State.ESTABLISHED, State.CLOSE_WAIT})
CAN_RECEIVE = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})
# States reached after the peer's FIN was accepted: its text is over.
FIN_RECEIVED = frozenset({State.CLOSE_WAIT, State.CLOSING, State.LAST_ACK, State.TIME_WAIT})
