"""The transition table (stack/state.py): the RFC 9293 Figure 5 diagram as data."""

from __future__ import annotations

import pytest
from tcp_script import BASE

from stack.connection import TcpConnection
from stack.state import TRANSITIONS, Ev, State, TransitionError, next_state
from stack.wire.tcp import ACK, SYN, TcpSegment

L = (bytes([198, 18, 0, 1]), 80)
R = (bytes([198, 18, 0, 2]), 40000)

# RFC 9293 Figure 5, edge by edge (from, label, to).
FIGURE_5 = [
    (State.CLOSED, Ev.PASSIVE_OPEN, State.LISTEN),
    (State.CLOSED, Ev.ACTIVE_OPEN, State.SYN_SENT),
    (State.LISTEN, Ev.RCV_SYN, State.SYN_RECEIVED),
    (State.LISTEN, Ev.CLOSE, State.CLOSED),
    (State.SYN_SENT, Ev.RCV_SYN, State.SYN_RECEIVED),
    (State.SYN_SENT, Ev.RCV_SYN_ACK, State.ESTABLISHED),
    (State.SYN_SENT, Ev.CLOSE, State.CLOSED),
    (State.SYN_RECEIVED, Ev.RCV_ACK_OF_SYN, State.ESTABLISHED),
    (State.ESTABLISHED, Ev.CLOSE, State.FIN_WAIT_1),
    (State.ESTABLISHED, Ev.RCV_FIN, State.CLOSE_WAIT),
    (State.FIN_WAIT_1, Ev.RCV_ACK_OF_FIN, State.FIN_WAIT_2),
    (State.FIN_WAIT_1, Ev.RCV_FIN, State.CLOSING),
    (State.FIN_WAIT_2, Ev.RCV_FIN, State.TIME_WAIT),
    (State.CLOSE_WAIT, Ev.CLOSE, State.LAST_ACK),
    (State.CLOSING, Ev.RCV_ACK_OF_FIN, State.TIME_WAIT),
    (State.LAST_ACK, Ev.RCV_ACK_OF_FIN, State.CLOSED),
    (State.TIME_WAIT, Ev.TIMEOUT_2MSL, State.CLOSED),
]


@pytest.mark.parametrize(("frm", "ev", "to"), FIGURE_5, ids=lambda x: str(x))
def test_every_edge_of_the_figure_is_in_the_table(frm: State, ev: Ev, to: State) -> None:
    assert next_state(frm, ev) is to


def test_every_state_is_reachable_from_closed_and_leads_back_to_it() -> None:
    reach = {State.CLOSED}
    while True:
        more = {to for (frm, _ev), to in TRANSITIONS.items() if frm in reach} - reach
        if not more:
            break
        reach |= more
    assert reach == set(State)
    for st in State:
        if st is not State.CLOSED:
            assert (st, Ev.ABORT) in TRANSITIONS  # RFC 9293 §3.10.5: ABORT from anywhere


def test_a_missing_edge_raises() -> None:
    with pytest.raises(TransitionError):
        next_state(State.CLOSED, Ev.RCV_FIN)
    with pytest.raises(TransitionError):
        next_state(State.SYN_RECEIVED, Ev.CLOSE)  # deferred until ESTABLISHED (§3.10.4)


def test_a_close_in_syn_received_goes_through_established() -> None:
    conn = TcpConnection(L, R, BASE)
    seen = []
    orig = conn._move

    def spy(ev: Ev) -> None:  # white box: the edges the connection takes
        orig(ev)
        seen.append(conn.state)

    conn._move = spy  # type: ignore[method-assign]
    conn.listen()
    conn.receive_segment(TcpSegment(R[1], L[1], 7, 0, SYN, 65535), 0.0)
    synack = conn.segments_to_send(0.0)[0]
    conn.close()
    assert conn.state is State.SYN_RECEIVED
    ack = TcpSegment(R[1], L[1], 8, (synack.seq + 1) & 0xFFFFFFFF, ACK, 65535)
    conn.receive_segment(ack, 0.1)
    assert seen == [State.LISTEN, State.SYN_RECEIVED, State.ESTABLISHED, State.FIN_WAIT_1]
