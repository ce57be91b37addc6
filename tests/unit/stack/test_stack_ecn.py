"""ECN for TCP (RFC 3168 §6.1): negotiation, ECT marking, CE -> ECE until CWR, and the
sender's one reduction per window of data on ECE, with CWR on its next new data."""

from __future__ import annotations

from typing import Any

import pytest
from tcp_script import (
    LOCAL,
    REMOTE,
    REMOTE_SEQ,
    SEND_TEMPL,
    cfg,
    events,
    listening,
    lseq,
    rseq,
    wire,
)

from stack.connection import TcpConnection
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, CE, CWR, ECE, ECT0, FIN, PSH, SYN, TcpSegment, emit_tcp, parse_tcp

ECN = cfg(ecn=True, nagle=False)


def send(conn: TcpConnection, t: float, ecn: int = 0, **kw: Any) -> None:
    """The peer sends SEND_TEMPL with `kw`, through the wire format, its IP ECN field `ecn`
    (what the adapter read from the IP header)."""
    conn.receive_segment(wire(SEND_TEMPL._replace(**kw))._replace(ecn=ecn), t)


def out(conn: TcpConnection, t: float) -> list[TcpSegment]:
    """What the connection sends at `t`, as it gave it (the `ecn` codepoint included)."""
    return conn.segments_to_send(t)


def passive_ecn(config: TcpConfig = ECN, syn_flags: int = SYN | ECE | CWR) -> TcpConnection:
    conn = listening(config)
    send(conn, 0.0, flags=syn_flags, seq=REMOTE_SEQ, ack=0, mss=1460)
    (synack,) = out(conn, 0.0)
    assert synack.flags & (SYN | ACK) == SYN | ACK
    send(conn, 0.0, seq=rseq(1), ack=lseq(1))
    assert conn.state is State.ESTABLISHED
    return conn


def active_ecn(config: TcpConfig = ECN, synack_flags: int = SYN | ACK | ECE) -> TcpConnection:
    conn = TcpConnection(LOCAL, REMOTE, config, iss=lseq(0))
    conn.connect(0.0)
    out(conn, 0.0)
    send(conn, 0.0, flags=synack_flags, seq=REMOTE_SEQ, ack=lseq(1), mss=1460, window=65535)
    (ack,) = out(conn, 0.0)
    assert ack.flags == ACK and ack.ecn == 0  # RFC 3168 §6.1.4: no ECT on a pure ACK
    assert conn.state is State.ESTABLISHED
    return conn


# ---------------------------------------------------------------- wire


def test_parse_tcp_keeps_the_ip_ecn_field_it_is_given() -> None:
    raw = emit_tcp(SEND_TEMPL._replace(payload=b"x"), REMOTE[0], LOCAL[0])
    seg = parse_tcp(raw, REMOTE[0], LOCAL[0], ecn=CE)
    assert seg is not None and seg.ecn == CE
    seg = parse_tcp(raw, REMOTE[0], LOCAL[0])
    assert seg is not None and seg.ecn == 0


# ---------------------------------------------------------------- §6.1.1 negotiation


def test_rfc3168_6_1_1_passive_open_accepts_an_ecn_setup_syn() -> None:
    conn = listening(ECN)
    send(conn, 0.0, flags=SYN | ECE | CWR, seq=REMOTE_SEQ, ack=0, mss=1460)
    (synack,) = out(conn, 0.0)
    assert synack.flags == SYN | ACK | ECE  # an ECN-setup SYN-ACK: ECE, not CWR
    assert synack.ecn == 0  # §6.1.1: a SYN-ACK is never ECT
    send(conn, 0.0, seq=rseq(1), ack=lseq(1))
    assert conn.ecn and conn.info()["ecn"] is True


@pytest.mark.parametrize("syn_flags", [SYN, SYN | ECE, SYN | CWR])
def test_rfc3168_6_1_1_passive_open_needs_both_ece_and_cwr(syn_flags: int) -> None:
    conn = listening(ECN)
    send(conn, 0.0, flags=syn_flags, seq=REMOTE_SEQ, ack=0, mss=1460)
    (synack,) = out(conn, 0.0)
    assert synack.flags == SYN | ACK
    send(conn, 0.0, seq=rseq(1), ack=lseq(1))
    assert not conn.ecn


def test_rfc3168_6_1_1_passive_open_without_ecn_refuses() -> None:
    conn = passive_ecn(cfg(nagle=False))  # TcpConfig.ecn off
    assert not conn.ecn
    conn.send(b"data")
    (seg,) = out(conn, 0.0)
    assert seg.ecn == 0 and not seg.flags & (ECE | CWR)


def test_rfc3168_6_1_1_active_open_asks_and_is_ecn_capable_on_an_ecn_setup_syn_ack() -> None:
    conn = TcpConnection(LOCAL, REMOTE, ECN, iss=lseq(0))
    conn.connect(0.0)
    (syn,) = out(conn, 0.0)
    assert syn.flags == SYN | ECE | CWR and syn.ecn == 0  # §6.1.1: a SYN is never ECT
    send(conn, 0.0, flags=SYN | ACK | ECE, seq=REMOTE_SEQ, ack=lseq(1), mss=1460)
    out(conn, 0.0)
    assert conn.state is State.ESTABLISHED and conn.ecn


@pytest.mark.parametrize("synack_flags", [SYN | ACK, SYN | ACK | ECE | CWR, SYN | ACK | CWR])
def test_rfc3168_6_1_1_active_open_without_an_ecn_setup_syn_ack_is_not_ecn(
        synack_flags: int) -> None:
    conn = active_ecn(synack_flags=synack_flags)
    assert not conn.ecn
    conn.send(b"data")
    (seg,) = out(conn, 0.0)
    assert seg.ecn == 0 and not seg.flags & CWR


def test_rfc3168_6_1_1_active_open_without_ecn_does_not_ask() -> None:
    conn = TcpConnection(LOCAL, REMOTE, cfg(), iss=lseq(0))
    conn.connect(0.0)
    (syn,) = out(conn, 0.0)
    assert syn.flags == SYN
    send(conn, 0.0, flags=SYN | ACK | ECE, seq=REMOTE_SEQ, ack=lseq(1), mss=1460)
    out(conn, 0.0)
    assert not conn.ecn


# ---------------------------------------------------------------- ECT marking


def test_rfc3168_6_1_new_data_is_ect0_pure_acks_and_fin_are_not() -> None:
    conn = passive_ecn()
    conn.send(b"a" * 3000)
    segs = out(conn, 0.0)
    assert [s.ecn for s in segs] == [ECT0, ECT0, ECT0]
    send(conn, 0.1, seq=rseq(1), ack=lseq(1), payload=b"req")
    events(conn)
    conn.close()
    segs = out(conn, 0.1)  # the FIN carries the ACK of "req": no data, no ECT
    assert segs and all(s.ecn == 0 for s in segs)
    assert segs[-1].flags & FIN


def test_rfc3168_6_1_4_pure_ack_is_not_ect() -> None:
    conn = passive_ecn()
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), payload=b"x" * 1460)
    send(conn, 0.0, seq=rseq(1461), ack=lseq(1), payload=b"x" * 1460)
    (ack,) = out(conn, 0.0)
    assert not ack.payload and ack.ecn == 0


def test_rfc3168_6_1_5_retransmissions_are_not_ect() -> None:
    conn = passive_ecn()
    conn.send(b"a" * 1000)
    (first,) = out(conn, 0.0)
    assert first.ecn == ECT0
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    (again,) = out(conn, t)
    assert bytes(again.payload) == bytes(first.payload) and again.seq == first.seq
    assert again.ecn == 0 and conn.retransmissions == 1


def test_rfc3168_6_1_6_window_probes_are_not_ect() -> None:
    conn = passive_ecn()
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), window=0)
    conn.send(b"a" * 100)
    assert out(conn, 0.0) == []
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    (probe,) = out(conn, t)
    assert len(probe.payload) == 1 and probe.ecn == 0 and not probe.flags & CWR


# ---------------------------------------------------------------- §6.1.3 receiver


def test_rfc3168_6_1_3_ce_sets_ece_on_every_ack_until_cwr() -> None:
    conn = passive_ecn()
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 100, ecn=CE)
    (ack,) = out(conn, 0.0)  # the first mark is ACKed at once
    assert ack.flags == ACK | ECE and ack.ack == rseq(101) and ack.ecn == 0
    send(conn, 0.01, seq=rseq(101), ack=lseq(1), payload=b"b" * 1460, ecn=ECT0)
    send(conn, 0.01, seq=rseq(1561), ack=lseq(1), payload=b"c" * 1460, ecn=ECT0)
    (ack,) = out(conn, 0.01)
    assert ack.flags & ECE  # still echoing: no CWR yet
    conn.send(b"reply")
    (data,) = out(conn, 0.01)
    assert data.flags & ECE and data.ecn == ECT0  # our data segments echo it too
    send(conn, 0.02, seq=rseq(3021), ack=lseq(6), payload=b"d" * 1460, flags=ACK | CWR,
         ecn=ECT0)
    send(conn, 0.02, seq=rseq(4481), ack=lseq(6), payload=b"e" * 1460, ecn=ECT0)
    (ack,) = out(conn, 0.02)
    assert not ack.flags & ECE  # CWR received: the echo ends
    assert conn.ce_marks == 1
    got = b"".join(e.data for e in events(conn) if hasattr(e, "data"))
    assert got == b"a" * 100 + b"b" * 1460 + b"c" * 1460 + b"d" * 1460 + b"e" * 1460


def test_rfc3168_6_1_3_ce_on_the_cwr_segment_starts_a_new_echo() -> None:
    conn = passive_ecn()
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 100, ecn=CE)
    out(conn, 0.0)
    send(conn, 0.0, seq=rseq(101), ack=lseq(1), payload=b"b", flags=ACK | CWR | PSH, ecn=CE)
    send(conn, 0.0, seq=rseq(102), ack=lseq(1), payload=b"c" * 1460)
    (ack,) = out(conn, 0.0)
    assert ack.flags & ECE and conn.ce_marks == 2


def test_rfc3168_6_1_5_ce_outside_the_window_is_ignored() -> None:
    conn = passive_ecn()
    send(conn, 0.0, seq=rseq(900_000), ack=lseq(1), payload=b"x" * 100, ecn=CE)
    segs = out(conn, 0.0)  # the unacceptable segment is ACKed, without ECE
    assert segs and all(not s.flags & ECE for s in segs)
    assert conn.ce_marks == 0


def test_ce_on_a_connection_without_ecn_is_ignored() -> None:
    conn = passive_ecn(cfg())
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 100, ecn=CE)
    send(conn, 0.0, seq=rseq(101), ack=lseq(1), payload=b"a" * 2920)
    (ack,) = out(conn, 0.0)
    assert not ack.flags & ECE and conn.ce_marks == 0


# ---------------------------------------------------------------- §6.1.2 sender


@pytest.mark.parametrize("cc", ["newreno", "cubic"])
def test_rfc3168_6_1_2_ece_reduces_cwnd_once_per_window_and_sets_cwr(cc: str) -> None:
    conn = active_ecn(cfg(ecn=True, nagle=False, congestion=cc, initial_cwnd=10 * 1460,
                          send_buffer=1 << 20))
    conn.send(b"z" * 200_000)
    segs = out(conn, 0.0)
    assert len(segs) == 10 and all(s.ecn == ECT0 and not s.flags & CWR for s in segs)
    cwnd0 = conn.info()["cwnd"]
    assert isinstance(cwnd0, int)
    # The peer saw a CE mark: its ACK of the first segment carries ECE.
    send(conn, 0.01, seq=rseq(1), ack=lseq(1 + 1460), flags=ACK | ECE, window=65535)
    info = conn.info()
    assert conn.ecn_cuts == 1 and not info["in_recovery"]
    cwnd1 = info["cwnd"]
    assert isinstance(cwnd1, int) and cwnd1 < cwnd0 and info["ssthresh"] == cwnd1
    assert out(conn, 0.01) == []  # the smaller window is full: nothing new yet
    # Further echoes for the same window of data (the peer echoes until it sees CWR): no
    # further reduction; the first new data segment they let out carries CWR, once.
    top = lseq(1 + 14600)
    sent: list[TcpSegment] = []
    for i in range(2, 11):
        send(conn, 0.02, seq=rseq(1), ack=lseq(1 + 1460 * i), flags=ACK | ECE, window=65535)
        sent += out(conn, 0.02)
    assert conn.ecn_cuts == 1
    assert sent and sent[0].seq == top and sent[0].flags & CWR and sent[0].ecn == ECT0
    assert all(not s.flags & CWR and s.ecn == ECT0 for s in sent[1:])
    # An echo that acknowledges past that window is news: a second reduction.
    send(conn, 0.03, seq=rseq(1), ack=(top + 1460) & 0xFFFFFFFF, flags=ACK | ECE,
         window=65535)
    assert conn.ecn_cuts == 2
    end = (sent[-1].seq + len(sent[-1].payload)) & 0xFFFFFFFF
    send(conn, 0.04, seq=rseq(1), ack=end, window=65535)
    again = out(conn, 0.03) + out(conn, 0.04)
    assert again and again[0].seq == end and again[0].flags & CWR
    assert conn.retransmissions == 0  # ECN is no loss: nothing was sent again


def test_rfc3168_6_1_2_ece_without_ecn_negotiated_changes_nothing() -> None:
    conn = active_ecn(cfg(nagle=False, initial_cwnd=10 * 1460))
    conn.send(b"z" * 30_000)
    out(conn, 0.0)
    cwnd0 = conn.info()["cwnd"]
    send(conn, 0.01, seq=rseq(1), ack=lseq(1 + 1460), flags=ACK | ECE, window=65535)
    assert conn.ecn_cuts == 0 and conn.info()["cwnd"] >= cwnd0  # type: ignore[operator]
    segs = out(conn, 0.01)
    assert segs and all(not s.flags & CWR for s in segs)


def test_rfc3168_6_1_6_a_ce_marked_window_probe_is_echoed() -> None:
    """A zero-window probe is not acceptable text, but its CE mark counts (§6.1.6)."""
    conn = passive_ecn(cfg(ecn=True, recv_buffer=4096, auto_consume=False))
    send(conn, 0.0, seq=rseq(1), ack=lseq(1), payload=b"a" * 4096)
    (ack,) = out(conn, 0.0)
    assert ack.window == 0 and not ack.flags & ECE
    send(conn, 0.5, seq=rseq(4097), ack=lseq(1), payload=b"p", ecn=CE)
    (ack,) = out(conn, 0.5)
    assert ack.flags & ECE and ack.ack == rseq(4097) and conn.ce_marks == 1


def test_rfc3168_6_1_1_1_a_resent_syn_no_longer_asks_for_ecn() -> None:
    """A middlebox may drop ECN-setup SYNs: the retransmitted SYN is a plain one (as
    Linux's tcp_ecn_fallback), and an ECE in the SYN-ACK that follows does not count."""
    conn = TcpConnection(LOCAL, REMOTE, ECN, iss=lseq(0))
    conn.connect(0.0)
    (syn,) = out(conn, 0.0)
    assert syn.flags == SYN | ECE | CWR
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    (again,) = out(conn, t)
    assert again.flags == SYN
    send(conn, t, flags=SYN | ACK | ECE, seq=REMOTE_SEQ, ack=lseq(1), mss=1460)
    out(conn, t)
    assert conn.state is State.ESTABLISHED and not conn.ecn


def _ecn_flight() -> tuple[TcpConnection, list[TcpSegment]]:
    conn = active_ecn(cfg(ecn=True, nagle=False, congestion="newreno",
                          initial_cwnd=10 * 1460, send_buffer=1 << 20))
    conn.send(b"z" * 100_000)
    segs = out(conn, 0.0)
    assert len(segs) == 10 and all(not s.flags & CWR for s in segs)
    return conn, segs


def _loss_by_rto(conn: TcpConnection) -> float:
    t = conn.get_timer()
    assert t is not None
    conn.handle_timer(t)
    (again,) = out(conn, t)
    assert again.seq == lseq(1) and again.ecn == 0 and not again.flags & CWR
    return t


def _loss_by_dupacks(conn: TcpConnection) -> float:
    for _ in range(3):  # RFC 5681 §3.2: the third duplicate ACK
        send(conn, 0.01, seq=rseq(1), ack=lseq(1), window=65535)
    again = out(conn, 0.01)
    assert again and again[0].seq == lseq(1) and conn.info()["in_recovery"]
    return 0.01


@pytest.mark.parametrize("loss", [_loss_by_rto, _loss_by_dupacks])
def test_rfc3168_6_1_2_a_loss_reduction_is_the_windows_one_and_owes_cwr(loss: Any) -> None:
    """A loss reduced cwnd: the next new data carries CWR though no ECE came, and an ECE
    for the data of that window (the same congestion) does not reduce a second time once
    the recovery is over (before: no CWR, and a second cut)."""
    conn, _segs = _ecn_flight()
    t = loss(conn)
    assert conn.ecn_cuts == 0
    # The whole window is acknowledged (recovery over), the ACK echoing a CE mark of it.
    send(conn, t + 0.01, seq=rseq(1), ack=lseq(1 + 14600), flags=ACK | ECE, window=65535)
    assert conn.ecn_cuts == 0 and not conn.info()["in_recovery"]
    new = out(conn, t + 0.01)
    assert new and new[0].seq == lseq(1 + 14600) and new[0].ecn == ECT0
    assert new[0].flags & CWR and all(not s.flags & CWR for s in new[1:])
    # An echo for data sent after the reduction is a new congestion event.
    end = (new[-1].seq + len(new[-1].payload)) & 0xFFFFFFFF
    send(conn, t + 0.02, seq=rseq(1), ack=end, flags=ACK | ECE, window=65535)
    assert conn.ecn_cuts == 1


def test_rfc3168_6_1_2_a_loss_without_ecn_owes_no_cwr() -> None:
    conn = active_ecn(cfg(nagle=False, congestion="newreno", initial_cwnd=10 * 1460))
    conn.send(b"z" * 100_000)
    out(conn, 0.0)
    t = _loss_by_rto(conn)
    send(conn, t + 0.01, seq=rseq(1), ack=lseq(1 + 14600), window=65535)
    new = out(conn, t + 0.01)
    assert new and all(not s.flags & (CWR | ECE) and s.ecn == 0 for s in new)
