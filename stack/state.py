"""TCP connection states and their transitions, as data (RFC 9293 §3.3.2, Figure 5).

Rules:
- The eleven states and their RFC names: `str(State.SYN_RECEIVED) == "SYN-RECEIVED"`.
- Every state change of a connection is one entry of `TRANSITIONS`: (state, event) -> next
  state, the events named after the labels of RFC 9293 Figure 5 ("rcv SYN", "CLOSE",
  "rcv ACK of FIN", "Timeout=2MSL", ...) plus the exits the figure leaves out: a reset
  (§3.10.7.4 "second, check the RST bit"; a passive open's SYN-RECEIVED returns to LISTEN,
  MUST-11), ABORT (§3.10.5), and giving up (R2 retransmission limit MUST-20..23, keep-alive
  MUST-29, a hard ICMP error SHLD-26). A pair missing from the table is a bug of ours:
  `next_state` raises TransitionError (never for what a peer sends: the input checks
  decide which event happened, the table only says where it leads).
- Deviations from the figure, on purpose: CLOSE in SYN-RECEIVED queues the FIN until
  ESTABLISHED (§3.10.4 allows it), so that pair is absent (the connection goes
  SYN-RECEIVED -> ESTABLISHED -> FIN-WAIT-1); "SEND" in LISTEN (an active open from a
  listening TCB, §3.10.2 MAY) is not offered.
- "Synchronized" states (RFC 9293 §3.5.2 and §3.10.7.4): ESTABLISHED and every state
  after it; in them an unacceptable segment gets an ACK and a SYN gets a challenge ACK
  (RFC 5961 §4). Before them (LISTEN, SYN-SENT, SYN-RECEIVED) a bad ACK gets a RST.
- States in which our side may still send data: ESTABLISHED and CLOSE-WAIT (RFC 9293
  §3.10.2 SEND). States in which the peer may still send data: ESTABLISHED, FIN-WAIT-1,
  FIN-WAIT-2 (§3.10.7.4, "sixth, check the URG bit" / "seventh, process the segment text").

Theory of operation: the connection keeps one `State` member and changes it only through
`next_state(state, event)` (h11 keeps its transitions as data the same way). Reading the
table below is reading the state diagram; the per-state handlers of stack/arrives.py
and stack/handshake.py decide *which* event a segment or a call is, and consult the sets
at the end for the rules that depend on the state.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "State",
    "Ev",
    "TRANSITIONS",
    "TransitionError",
    "next_state",
    "SYNCHRONIZED",
    "CAN_SEND",
    "CAN_RECEIVE",
    "FIN_RECEIVED",
]


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


class Ev(Enum):
    """What moves a connection: the labels of RFC 9293 Figure 5 and the exits it omits."""

    PASSIVE_OPEN = "passive OPEN"
    ACTIVE_OPEN = "active OPEN"
    RCV_SYN = "rcv SYN"
    RCV_SYN_ACK = "rcv SYN,ACK"
    RCV_ACK_OF_SYN = "rcv ACK of SYN"
    CLOSE = "CLOSE"
    RCV_FIN = "rcv FIN"
    RCV_ACK_OF_FIN = "rcv ACK of FIN"
    TIMEOUT_2MSL = "Timeout=2MSL"
    RCV_RST = "rcv RST"
    RCV_RST_PASSIVE = "rcv RST (passive open)"
    ABORT = "ABORT"
    GIVE_UP = "give up (R2, keep-alive, ICMP unreachable)"

    def __str__(self) -> str:
        return self.value

    __hash__ = object.__hash__


class TransitionError(RuntimeError):
    """A (state, event) pair the table does not have: a bug in this stack, not the peer's."""


_S = State
_ENDS = {Ev.RCV_RST: _S.CLOSED, Ev.ABORT: _S.CLOSED, Ev.GIVE_UP: _S.CLOSED}

TRANSITIONS: dict[tuple[State, Ev], State] = {
    # RFC 9293 §3.10.1 OPEN.
    (_S.CLOSED, Ev.PASSIVE_OPEN): _S.LISTEN,
    (_S.CLOSED, Ev.ACTIVE_OPEN): _S.SYN_SENT,
    # §3.10.7.2 LISTEN: a SYN, and the user's CLOSE / ABORT (delete TCB).
    (_S.LISTEN, Ev.RCV_SYN): _S.SYN_RECEIVED,
    (_S.LISTEN, Ev.CLOSE): _S.CLOSED,
    (_S.LISTEN, Ev.ABORT): _S.CLOSED,
    # §3.10.7.3 SYN-SENT: the SYN-ACK, or a bare SYN (simultaneous open, MUST-10).
    (_S.SYN_SENT, Ev.RCV_SYN_ACK): _S.ESTABLISHED,
    (_S.SYN_SENT, Ev.RCV_SYN): _S.SYN_RECEIVED,
    (_S.SYN_SENT, Ev.CLOSE): _S.CLOSED,
    **{(_S.SYN_SENT, ev): to for ev, to in _ENDS.items()},
    # §3.10.7.4 SYN-RECEIVED: the ACK of our SYN; a reset of a passive open (MUST-11).
    (_S.SYN_RECEIVED, Ev.RCV_ACK_OF_SYN): _S.ESTABLISHED,
    (_S.SYN_RECEIVED, Ev.RCV_FIN): _S.CLOSE_WAIT,
    (_S.SYN_RECEIVED, Ev.RCV_RST_PASSIVE): _S.LISTEN,
    **{(_S.SYN_RECEIVED, ev): to for ev, to in _ENDS.items()},
    # The synchronized states: closing from our side (§3.10.4) or the peer's (eighth step).
    (_S.ESTABLISHED, Ev.CLOSE): _S.FIN_WAIT_1,
    (_S.ESTABLISHED, Ev.RCV_FIN): _S.CLOSE_WAIT,
    **{(_S.ESTABLISHED, ev): to for ev, to in _ENDS.items()},
    (_S.FIN_WAIT_1, Ev.RCV_ACK_OF_FIN): _S.FIN_WAIT_2,
    (_S.FIN_WAIT_1, Ev.RCV_FIN): _S.CLOSING,
    **{(_S.FIN_WAIT_1, ev): to for ev, to in _ENDS.items()},
    (_S.FIN_WAIT_2, Ev.RCV_FIN): _S.TIME_WAIT,
    **{(_S.FIN_WAIT_2, ev): to for ev, to in _ENDS.items()},
    (_S.CLOSE_WAIT, Ev.CLOSE): _S.LAST_ACK,
    **{(_S.CLOSE_WAIT, ev): to for ev, to in _ENDS.items()},
    (_S.CLOSING, Ev.RCV_ACK_OF_FIN): _S.TIME_WAIT,
    **{(_S.CLOSING, ev): to for ev, to in _ENDS.items()},
    (_S.LAST_ACK, Ev.RCV_ACK_OF_FIN): _S.CLOSED,
    **{(_S.LAST_ACK, ev): to for ev, to in _ENDS.items()},
    (_S.TIME_WAIT, Ev.TIMEOUT_2MSL): _S.CLOSED,  # MUST-13
    **{(_S.TIME_WAIT, ev): to for ev, to in _ENDS.items()},
}


def next_state(state: State, ev: Ev) -> State:
    """Where `ev` leads from `state`; raises TransitionError if the table has no such edge."""
    new = TRANSITIONS.get((state, ev))
    if new is None:
        raise TransitionError(f"no transition from {state} on {ev!r}")
    return new


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
