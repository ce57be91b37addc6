"""A misbehaving peer never raises: hypothesis state machines drive a TcpConnection and a
TcpDemux through random traces (plausible and garbage segments, application calls, timers,
ICMP errors) in every state, and check the invariants after every step.

Plausible segments are built around the connection's own RCV.NXT and SND.UNA/SND.NXT, so
the trace reaches ESTABLISHED, the closing states and recovery; garbage ones take any
flags, sequence and acknowledgment numbers, options and payload.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from tcp_demux import TcpDemux
from tcp_script import LOCAL, LOCAL_SEQ, REMOTE, REMOTE_SEQ, active, cfg, passive

from stack.connection import TcpConnection
from stack.events import Closed, Event, LocalProtocolError
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, URG, TcpSegment, emit_tcp

MASK = 0xFFFFFFFF
U32 = st.integers(0, MASK)
PLAUSIBLE_FLAGS = st.one_of(st.just(ACK), st.just(ACK | PSH), st.just(ACK | FIN),
                            st.integers(0, 0xFF))
FLAGS = st.one_of(
    st.sampled_from([SYN, SYN | ACK, ACK, ACK | PSH, ACK | FIN, RST, RST | ACK, ACK | URG,
                     FIN, 0]),
    st.integers(0, 0xFF),
)
NEAR = st.sampled_from([0, 0, 0, 1, -1, 2, 100, 536, 1460, -1460, 4000, 65535, 70000,
                        -70000, 1 << 31])
TS = st.one_of(st.none(), st.tuples(U32, U32))
SACK = st.lists(st.tuples(U32, U32), max_size=4).map(tuple)

CONFIGS = [
    cfg(),
    cfg(window_scaling=True, timestamps=True, sack=True, recv_buffer=1 << 18,
        tx_max_segment=8760),
    cfg(recv_buffer=4096, send_buffer=5000, reassembly_cap=3000, reassembly_ranges=3,
        nagle=False, sack=True, keepalive=True, keepalive_idle=5.0, keepalive_interval=1.0,
        keepalive_probes=2, msl=3.0, auto_consume=False),
    cfg(timestamps=True, max_retries=2, syn_retries=1, msl=1.0),
]


def check_invariants(conn: TcpConnection, now: float) -> None:
    """The variables a trace can never break, whatever the peer sent."""
    assert conn._snd.una <= conn._snd.nxt or conn.state in (State.CLOSED, State.LISTEN,
                                                             State.SYN_SENT,
                                                             State.SYN_RECEIVED)
    assert conn._snd.nxt <= conn._snd.max or conn._snd.max == 0
    assert conn._snd.una <= conn._snd.max or conn._snd.max == 0
    if conn.state not in (State.CLOSED, State.LISTEN, State.SYN_SENT, State.SYN_RECEIVED):
        assert conn._snd.una >= 1  # our SYN is acknowledged in every synchronized state
        assert conn._snd.nxt >= 1
    assert conn._rcv.adv >= conn._rcv.nxt or conn._rcv.adv == 0
    assert 0 <= conn._rcv.ooo.nbytes <= conn._rcv.ooo.cap_bytes
    assert len(conn._rcv.ooo) <= conn._rcv.ooo.cap_ranges
    assert 0 <= len(conn._snd.buf) <= conn._snd.buf.capacity
    # What we hold for the application stays within what we advertised.
    assert conn._rcv.rx_len + conn._rcv.rx_held <= conn.config.recv_buffer + 65535
    assert len(conn._snd.board.sacked) <= 32
    assert conn.urgent_remaining >= 0
    t = conn.get_timer()
    assert t is None or math.isfinite(t)


def drain(conn: TcpConnection, now: float) -> None:
    for out in conn.segments_to_send(now):
        assert out.src_port == LOCAL[1] and out.dst_port == REMOTE[1]
        emit_tcp(out, LOCAL[0], REMOTE[0])  # everything we send is well-formed
    while (ev := conn.next_event()) is not None:
        assert isinstance(ev, Event)


class ConnectionMachine(RuleBasedStateMachine):
    """One connection against a random peer."""

    conn: TcpConnection
    now: float
    tsval: int

    @initialize(kind=st.integers(0, 3), config=st.sampled_from(CONFIGS))
    def open(self, kind: int, config: TcpConfig) -> None:
        self.now = 0.0
        self.tsval = 100
        if kind == 0:
            self.conn = TcpConnection(LOCAL, REMOTE, config, iss=LOCAL_SEQ)
            self.conn.listen()
        elif kind == 1:
            self.conn = TcpConnection(LOCAL, REMOTE, config, iss=LOCAL_SEQ)
            self.conn.connect(0.0)
        elif kind == 2:
            self.conn = passive(config, ts=(99, 0), sack_perm=True, wscale=2)
        else:
            self.conn = active(config, ts=(99, 0), sack_perm=True, wscale=2)

    def _ts(self, choice: int) -> tuple[int, int] | None:
        """A valid timestamp option when one is expected (choice 0, 1), else garbage."""
        if choice < 2:
            self.tsval += choice
            return (self.tsval, 0)
        return None if choice == 2 else ((self.tsval - 1000) & MASK, 5)

    def _base(self, frac: float = 0.0) -> tuple[int, int]:
        c = self.conn
        seq = c.rcv_nxt_seq if c.state not in (State.LISTEN, State.SYN_SENT) else REMOTE_SEQ
        una = c._snd.una
        pos = una + int(frac * max(c._snd.nxt - una, 0))
        if c.state in (State.SYN_SENT, State.SYN_RECEIVED):
            pos = 1
        return seq, (LOCAL_SEQ + pos) & MASK

    @rule(frac=st.sampled_from([0.0, 0.5, 1.0, 1.0]), n=st.sampled_from([0, 0, 100, 1460]),
          fin=st.booleans(), wnd=st.sampled_from([0, 65535, 65535]), tsc=st.integers(0, 3))
    def peer_ack(self, frac: float, n: int, fin: bool, wnd: int, tsc: int) -> None:
        """The well-behaved peer: SYN, SYN-ACK or ACK as the state asks, in-order data."""
        c = self.conn
        seq, ack = self._base(frac)
        if c.state is State.LISTEN:
            flags, ack = SYN, 0
        elif c.state is State.SYN_SENT:
            flags = SYN | ACK
        else:
            flags = ACK | (FIN if fin else 0)
        seg = TcpSegment(REMOTE[1], LOCAL[1], seq, ack, flags, wnd,
                         b"" if flags & SYN else b"q" * n, 0,
                         1460 if flags & SYN else None, 2 if flags & SYN else None,
                         bool(flags & SYN), self._ts(tsc), ())
        c.receive_segment(seg, self.now)

    @rule(flags=PLAUSIBLE_FLAGS, dseq=NEAR, dack=st.one_of(NEAR, st.integers(0, 3000)),
          n=st.sampled_from([0, 0, 1, 10, 536, 1460, 3000]), wnd=st.sampled_from(
              [0, 1, 100, 4096, 65535]), ts=TS, sack_perm=st.booleans(),
          mss=st.one_of(st.none(), st.sampled_from([0, 1, 536, 1460, 65535])),
          wscale=st.one_of(st.none(), st.integers(0, 20)), urg=st.integers(0, 0xFFFF),
          tsc=st.integers(0, 4))
    def plausible(self, flags: int, dseq: int, dack: int, n: int, wnd: int,
                  ts: tuple[int, int] | None, sack_perm: bool, mss: int | None,
                  wscale: int | None, urg: int, tsc: int) -> None:
        seq, ack = self._base()
        if tsc < 4:
            ts = self._ts(tsc)
        if flags & SYN and self.conn.state in (State.LISTEN, State.SYN_SENT):
            dseq = 0 if dseq > 2 else dseq
        seg = TcpSegment(REMOTE[1], LOCAL[1], (seq + dseq) & MASK, (ack + dack) & MASK,
                         flags, wnd, b"p" * n, urg, mss, wscale, sack_perm, ts, ())
        self.conn.receive_segment(seg, self.now)

    @rule(flags=FLAGS, seq=U32, ack=U32, wnd=st.integers(0, 0xFFFF),
          payload=st.binary(max_size=2000), urg=st.integers(0, 0xFFFF),
          mss=st.one_of(st.none(), st.integers(0, 0xFFFF)),
          wscale=st.one_of(st.none(), st.integers(0, 255)), sack_perm=st.booleans(), ts=TS,
          sack=SACK)
    def garbage(self, flags: int, seq: int, ack: int, wnd: int, payload: bytes, urg: int,
                mss: int | None, wscale: int | None, sack_perm: bool,
                ts: tuple[int, int] | None, sack: tuple[tuple[int, int], ...]) -> None:
        seg = TcpSegment(REMOTE[1], LOCAL[1], seq, ack, flags, wnd, payload, urg, mss,
                         wscale, sack_perm, ts, sack)
        self.conn.receive_segment(seg, self.now)

    @rule(dack=st.integers(0, 6000), blocks=st.lists(
        st.tuples(st.integers(0, 8000), st.integers(1, 3000)), min_size=1, max_size=4))
    def sack_ack(self, dack: int, blocks: list[tuple[int, int]]) -> None:
        """A (duplicate) ACK with SACK blocks near what is in flight."""
        seq, ack = self._base()
        una = LOCAL_SEQ + self.conn._snd.una
        sack = tuple(((una + s) & MASK, (una + s + ln) & MASK) for s, ln in blocks)
        ts = self._ts(0)
        seg = TcpSegment(REMOTE[1], LOCAL[1], seq, (ack + dack) & MASK, ACK, 65535, b"", 0,
                         None, None, False, ts, sack)
        self.conn.receive_segment(seg, self.now)

    @rule(dt=st.sampled_from([0.0, 0.001, 0.04, 0.2, 1.0, 3.0, 30.0, 300.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def fire_timer(self) -> None:
        t = self.conn.get_timer()
        if t is None:
            return
        self.now = max(self.now, t)
        self.conn.handle_timer(self.now)
        self.conn.segments_to_send(self.now)
        after = self.conn.get_timer()
        # Sane: nothing stays due at `now` once handled, so a loop never spins.
        assert after is None or after > self.now, (t, after, self.now)

    @rule()
    def output(self) -> None:
        drain(self.conn, self.now)

    @rule(n=st.integers(0, 20000), urgent=st.booleans())
    def app_send(self, n: int, urgent: bool) -> None:
        try:
            self.conn.send(b"s" * n, urgent=urgent)
        except LocalProtocolError:
            pass

    @rule()
    def app_close(self) -> None:
        try:
            self.conn.close()
        except LocalProtocolError:
            pass

    @rule(die=st.integers(0, 9))
    def app_abort(self, die: int) -> None:
        if die == 0:  # rarely, or the traces end early
            self.conn.abort()

    @rule(k=st.integers(1, 5), sack=st.booleans(), gap=st.integers(0, 3000))
    def dupacks(self, k: int, sack: bool, gap: int) -> None:
        """Duplicate ACKs for SND.UNA (fast retransmit, recovery), SACKing beyond a gap."""
        c = self.conn
        seq, ack = self._base()
        una = LOCAL_SEQ + c._snd.una
        for i in range(k):
            blocks = (((una + gap) & MASK, (una + gap + 1460 * (i + 1)) & MASK),) if sack else ()
            c.receive_segment(TcpSegment(REMOTE[1], LOCAL[1], seq, ack, ACK, 65535, b"", 0,
                                         None, None, False, self._ts(0), blocks), self.now)

    @rule(n=st.integers(-1, 5000))
    def app_read(self, n: int) -> None:
        data = self.conn.read(n)
        if not self.conn.config.auto_consume and data:
            self.conn.consumed(len(data))

    @rule(kind=st.sampled_from(["unreachable", "time_exceeded", "parameter_problem",
                                "packet_too_big", "source_quench"]),
          code=st.integers(0, 255), mtu=st.one_of(st.none(), st.integers(0, 70000)))
    def icmp(self, kind: str, code: int, mtu: int | None) -> None:
        self.conn.icmp_error(kind, code, mtu, self.now)

    @invariant()
    def holds(self) -> None:
        check_invariants(self.conn, self.now)


ConnectionMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestConnectionTrace = ConnectionMachine.TestCase


class DemuxMachine(RuleBasedStateMachine):
    """A demux with listeners and active opens against random peers on a few 4-tuples."""

    demux: TcpDemux
    now: float

    @initialize(config=st.sampled_from(CONFIGS), accept_any=st.booleans())
    def open(self, config: TcpConfig, accept_any: bool) -> None:
        self.demux = TcpDemux(config, accept_any=accept_any, max_connections=6)
        self.demux.listen(LOCAL[1])
        self.now = 0.0

    @rule(port=st.integers(49152, 49156), flags=FLAGS, dseq=NEAR, dack=NEAR,
          n=st.sampled_from([0, 1, 1000]), ts=TS)
    def segment(self, port: int, flags: int, dseq: int, dack: int, n: int,
                ts: tuple[int, int] | None) -> None:
        conn = self.demux.connections.get((LOCAL[0], LOCAL[1], REMOTE[0], port))
        seq, ack = REMOTE_SEQ, LOCAL_SEQ
        if conn is not None:
            seq, ack = conn.rcv_nxt_seq, (conn._snd.iss + conn._snd.una) & MASK
        seg = TcpSegment(port, LOCAL[1], (seq + dseq) & MASK, (ack + dack) & MASK, flags,
                         65535, b"d" * n, 0, 1460 if flags & SYN else None, None, False, ts)
        self.demux.receive(REMOTE[0], LOCAL[0], seg, self.now)

    @rule(raw=st.binary(max_size=80))
    def raw_bytes(self, raw: bytes) -> None:
        self.demux.receive_packet(REMOTE[0], LOCAL[0], raw, self.now)

    @rule(port=st.integers(49152, 49156))
    def connect(self, port: int) -> None:
        try:
            self.demux.connect((LOCAL[0], 40000), (REMOTE[0], port), self.now)
        except LocalProtocolError:
            pass

    @rule(dt=st.sampled_from([0.0, 0.05, 1.0, 10.0, 300.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def timers(self) -> None:
        t = self.demux.get_timer()
        if t is not None:
            self.now = max(self.now, t)
            self.demux.handle_timer(self.now)
        self.demux.segments_to_send(self.now)
        after = self.demux.get_timer()
        assert after is None or after > self.now

    @rule()
    def output(self) -> None:
        for src, dst, seg in self.demux.segments_to_send(self.now):
            emit_tcp(seg, src, dst)
        while (c := self.demux.accept()) is not None:
            while (ev := c.next_event()) is not None:
                if isinstance(ev, Closed):
                    break

    @invariant()
    def holds(self) -> None:
        d = self.demux
        assert len(d.connections) <= d.max_connections + 5  # + the active opens
        best = None
        for conn in d.connections.values():
            check_invariants(conn, self.now)
            t = conn.get_timer()
            if t is not None and (best is None or t < best):
                best = t
        got = d.get_timer()
        # The demux's deadline is never later than any connection's (else a timer is lost).
        assert best is None or (got is not None and got <= best), (got, best)


DemuxMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDemuxTrace = DemuxMachine.TestCase
