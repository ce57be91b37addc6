"""Scripted TCP traces with explicit time (smoltcp send!/recv! style).

A test feeds a TcpConnection segments built from SEND_TEMPL with `_replace()`,
and checks what it answers against RECV_TEMPL variants. LOCAL is the connection under
test, REMOTE the scripted peer. REMOTE_SEQ sits just below 2**32 so that every script
crosses the sequence-number wrap.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stack.connection import TcpConnection
from stack.events import Event
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, SYN, TcpSegment, emit_tcp, parse_tcp

LOCAL = (bytes([198, 18, 0, 1]), 80)
REMOTE = (bytes([198, 18, 0, 2]), 49152)
LOCAL_SEQ = 10_000
REMOTE_SEQ = 0xFFFF_FFF0  # wraps after 15 bytes
MASK = 0xFFFF_FFFF

SEND_TEMPL = TcpSegment(REMOTE[1], LOCAL[1], 0, 0, ACK, 4096)
RECV_TEMPL = TcpSegment(LOCAL[1], REMOTE[1], 0, 0, ACK, 0)

# Scripted tests use no options by default, a 64 KB buffer (shift 0), RFC timers and the
# RFC 5681 / RFC 6582 congestion control and RFC 6675 loss detection (no RACK) their
# window arithmetic is written for.
BASE = TcpConfig(
    congestion="newreno",
    rack=False,
    mss=1460,
    recv_buffer=65535,
    send_buffer=65536,
    window_scaling=False,
    timestamps=False,
    sack=False,
    isn_key=b"grebe-test-key",
)


def rseq(n: int) -> int:
    """The peer's sequence number n octets after its ISN (SYN = 0)."""
    return (REMOTE_SEQ + n) & MASK


def lseq(n: int) -> int:
    """Our sequence number n octets after LOCAL_SEQ (SYN = 0)."""
    return (LOCAL_SEQ + n) & MASK


def cfg(**kw: Any) -> TcpConfig:
    return replace(BASE, **kw)


def wire(seg: TcpSegment, src: bytes = REMOTE[0], dst: bytes = LOCAL[0]) -> TcpSegment:
    """Round-trip a segment through emit_tcp/parse_tcp (the bytes a real peer would send)."""
    parsed = parse_tcp(emit_tcp(seg, src, dst), src, dst)
    assert parsed is not None
    return parsed


def send(conn: TcpConnection, t: float, **kw: Any) -> None:
    """The peer sends SEND_TEMPL with `kw` replaced, through the wire format."""
    conn.receive_segment(wire(SEND_TEMPL._replace(**kw)), t)


def recv(conn: TcpConnection, t: float) -> list[TcpSegment]:
    """Everything the connection sends at time t (each checked through the wire format)."""
    return [wire(s, LOCAL[0], REMOTE[0]) for s in conn.segments_to_send(t)]


def recv_one(conn: TcpConnection, t: float) -> TcpSegment:
    segs = recv(conn, t)
    assert len(segs) == 1, segs
    return segs[0]


def recv_nothing(conn: TcpConnection, t: float) -> None:
    segs = recv(conn, t)
    assert segs == [], segs


def expect(seg: TcpSegment, **kw: Any) -> None:
    """Assert the named fields of `seg` (payload compared as bytes)."""
    for name, want in kw.items():
        got = getattr(seg, name)
        if name == "payload":
            got = bytes(got)
        assert got == want, f"{name}: got {got!r}, want {want!r} in {seg!r}"


def events(conn: TcpConnection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def listening(config: TcpConfig = BASE) -> TcpConnection:
    """A connection in LISTEN, ISS = LOCAL_SEQ."""
    conn = TcpConnection(LOCAL, REMOTE, config, iss=LOCAL_SEQ)
    conn.listen()
    return conn


def syn_sent(config: TcpConfig = BASE, t: float = 0.0) -> TcpConnection:
    """A connection in SYN-SENT (ISS = LOCAL_SEQ) whose SYN has been taken from it."""
    conn = TcpConnection(LOCAL, REMOTE, config, iss=LOCAL_SEQ)
    conn.connect(t)
    syn = recv_one(conn, t)
    assert syn.flags == SYN
    return conn


def run_timers_while(conn: TcpConnection, state: State) -> float:
    """Fire each timer (taking what it sends) while `conn` stays in `state`; return the time
    of the last one."""
    last = 0.0
    while conn.state is state:
        t = conn.get_timer()
        assert t is not None
        conn.handle_timer(t)
        recv(conn, t)
        last = t
    return last


def passive(config: TcpConfig = BASE, t: float = 0.0, **syn: Any) -> TcpConnection:
    """A connection brought to ESTABLISHED by a scripted peer's SYN and ACK."""
    conn = listening(config)
    send(conn, t, flags=SYN, seq=REMOTE_SEQ, ack=0, mss=syn.pop("mss", 1460), **syn)
    synack = recv_one(conn, t)
    assert synack.flags == SYN | ACK
    ack_kw: dict[str, Any] = {}
    if synack.ts is not None:
        ack_kw["ts"] = (syn.get("ts", (1, 0))[0] + 1, synack.ts[0])
    send(conn, t, seq=rseq(1), ack=lseq(1), **ack_kw)
    assert conn.state is State.ESTABLISHED
    return conn


def active(config: TcpConfig = BASE, t: float = 0.0, **synack: Any) -> TcpConnection:
    """A connection brought to ESTABLISHED by connect() and a scripted SYN-ACK."""
    conn = syn_sent(config, t)
    send(conn, t, flags=SYN | ACK, seq=REMOTE_SEQ, ack=lseq(1), mss=synack.pop("mss", 1460),
         **synack)
    ack = recv_one(conn, t)
    assert ack.flags == ACK
    assert conn.state is State.ESTABLISHED
    return conn


ALL_OPTIONS = cfg(window_scaling=True, timestamps=True, sack=True, recv_buffer=1 << 20)
