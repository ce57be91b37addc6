"""Splice: one inspected TCP flow terminated twice, back to back, with the inspector chain between.

Rules of this module (pure, sans-I/O: segments and `now` in, segments and deadlines out)
- Two `stack` connections per flow. The *client leg* impersonates the server toward the client
  (local = the server's address and port); the *server leg* impersonates the client toward the
  server (local = the client's own address and port, so the server sees the client; its
  segments go through the tunnel like any other packet).
- Accept first (the default, as Linux TPROXY and mitmproxy behave): the client leg answers
  the client's SYN itself (passive open, RFC 9293 §3.10.7.2, its own RFC 6528 ISS), and the
  server leg opens only once the client leg is ESTABLISHED, i.e. the client completed its
  three-way handshake (RFC 9293 §3.5). A spoofed SYN, or a client that resets or goes silent
  after our SYN-ACK, therefore never reaches the server: no upstream SYN, no server
  connection (RFC 4987 §2: the flood's state stays here, bounded by the Terminator's
  half-open caps, bridge/userspace/bounds.py). Bytes the client sends meanwhile wait in the
  server leg's send buffer and leave after its handshake. The trade-off: a server that
  refuses or does not answer (ConnectionReset "refused"/"timeout", RFC 9293 §3.8.3 R2, or an
  ICMP unreachable) is seen by the client as an accepted connection that is then reset
  (<SEQ=SND.NXT><CTL=RST>, CloseReason.CONNECT_FAILED), not as "connection refused"; a
  client that tries several addresses moves on after the RST instead of after the refusal.
- `connect_first` (a rule option) keeps the deferred accept: the client's SYN is kept, and the
  client leg is only created (answering the kept SYN) once the server leg is ESTABLISHED.
  The client then sees the server's own answer: a refused or timed-out upstream is answered
  with the RST a closed port gives, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> (RFC 9293
  §3.10.7.1), and the client leg takes the server's ISN as its own ISS. Its cost: every SYN,
  spoofed or not, opens a server connection (bounded by the half-open caps all the same).
  In both modes the server leg takes the client's ISN as its ISS.
- A splice opened from a SYN cookie (`open_cookie`) builds its client leg from the cookie
  ACK directly in ESTABLISHED (only the MSS negotiated, RFC 4987 §3.6), then opens the server
  leg as in accept-first.
- ICMP errors about the server leg (`server_icmp`: from the tunnel, or our own "no route")
  go to its connection (RFC 9293 §3.9.1.4, RFC 5927 §4.1 sequence check there). While it
  is connecting, a Destination Unreachable of any code aborts the attempt like a refusal:
  a hard error resets the leg in the stack, and the soft ones (net/host unreachable, which
  RFC 9293 MUST-56 has the stack only report, SoftError) are acted on here, by the
  application, as RFC 5461 §4 describes for connection attempts; so the client gets the
  closed port's RST at once instead of after the server leg's SYN retries (~1 min).
  `flow.metadata["connect_error"]` says which ("unreachable", "icmp unreachable 1").
- flow_start runs on the SYN, before the server leg opens: Deny -> the same RST to the client,
  nothing sent upstream (CloseReason.DENIED), like the kernel backend (bridge/kernel/relay.py).
- Data: every chunk a leg delivers passes the rule's InspectorChain (pass, rewrite, drop,
  RESET). RESET, or an inspector error with fail_open false, aborts both legs (RFC 9293
  §3.10.5 ABORT: RST) with CloseReason.INSPECTOR_RESET / INSPECTOR_ERROR.
- Half-close (RFC 9293 §3.6): a FIN from one side is passed on as close() of the other leg after
  every byte queued before it, plus what `chain.eof()` still held back. The other direction
  stays open. FIN both ways -> CloseReason.CLOSED.
- Abort: an RST from one side (ConnectionReset "reset", or a data timeout) aborts the other leg
  (CLIENT_RESET / SERVER_RESET). So does a client RST before its side is established: at the
  kept SYN's RCV.NXT while the server leg connects, or the client leg's SYN-RECEIVED going
  back to LISTEN (RFC 9293 §3.10.7.4 second step, MUST-11: ResetToListen): the client gave
  up, so the server leg is aborted at once (happy-eyeballs losers, connect timeouts, SYN
  scans would otherwise hold a server connection and a splice until the idle timeout).
- Back-pressure and bounded memory: both legs run with auto_consume off. Bytes a leg delivered
  stay counted in its receive window until the other leg's bounded send buffer took them
  (then `consumed()` reopens the window, RFC 9293 §3.8.6.2.2). A slow reader therefore fills
  the other leg's send buffer, then the first leg's receive buffer, and its sender sees a zero
  window (RFC 9293 §3.8.6.1). Per direction: the receiving leg's window up to three
  quarters of the rule's max_buffer and the other leg's send buffer up to a quarter (the
  Terminator's `configs_for`), plus at most one inspector-expanded chunk.
- The flow's life (flow_start, the chain on every chunk, verdicts, half-close ordering,
  close reasons, flow_end once) is bridge/inspect/session.py's `InspectSession`, shared with
  the kernel backend; this module executes what it answers on the two legs: bytes to queue
  for the other leg, a FIN after them, or an abort of both legs.
- Observer chains (time to first byte): the session is made with `tap=True`, so when every
  inspector of the rule only watches, a chunk a leg delivers is handed to the other leg at
  once and the chain sees it TAP_DELAY later (session.py "observer tap"; the splice's
  `get_timer()` includes that deadline, `tap_due`, and `handle_timer` drains it): the
  request and the response then leave in the core call that received them, and h11 parsing
  (~0.3 ms a message warm, more cold) runs after the output left. The interpreter runs one thread at
  a time, so a request parsed at once would hold up its own response, which a LAN server
  sends within a millisecond or two; parsed a few ms later, both go through in one drain.
- Keep-alives (RFC 9293 §3.8.4) are mirrored: a probe from one peer (at its leg's RCV.NXT
  - 1) makes the other leg send one probe to its peer, so the NAT and firewall state on both
  paths sees the endpoints' keep-alive traffic; each leg also probes on its own after 2 h
  of silence (the Terminator's configuration) and a dead peer resets both legs.
- Urgent data (RFC 9293 §3.8.5, RFC 6093): bytes a leg delivered before its RCV.UP are sent
  urgent on the other leg (`send(urgent=True)`), so the pointer lands at the same stream
  offset (at the end of a chunk an inspector rewrote).
- Memory budget (the Terminator's `memory_budget`): `allow` bounds the receive window this
  flow may reopen now (None: no bound); what it may not is owed and given back later, so
  back-pressure reaches the peers as a closing window, never as a failure.
- ECN (RFC 3168 §6.1.1) mirrors the endpoints: the client leg's config accepts an ECN-setup
  SYN, so it is ECN-capable exactly when the client asked; the server leg's config asks the
  server only when the client did (the Terminator's `configs_for`). Connect first, the
  client leg is made after the server answered and accepts ECN only if the server leg got
  it (else it takes the Terminator's cached settings without ECN), so the client sees
  what the server said. ECN is per path: each leg marks its own new
  data ECT(0), echoes the CE marks its path made and reduces its own window on an echo
  (stack/send.py); no mark crosses the splice (the bytes are re-sent, not forwarded).
- Never raises on account of either peer: bad segments are the legs' business (dropped and
  counted there). Only misuse of this API raises (LocalProtocolError from the stack).

Theory of operation
`Splice(...)` keeps the SYN; `open(now)` (called by the owner right after) runs flow_start and
starts the server leg. Inputs (`from_client`, `from_server`) update a leg; `step(now)`, once per
batch, and `handle_timer(now)` drain both legs' events and move queued bytes: per direction a
deque of [bytes still to hand to the destination leg, source bytes to consume when handed over].
`to_client(now)` / `to_server(now)` pull the legs' segments. `finished` is true once the flow
ended (flow_end called); `dead` once both legs are CLOSED and nothing remains to send, when the
owner (bridge/userspace/terminator.py) forgets the splice.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace
from typing import Any

from bridge.flows import FlowKey, InspectRule
from bridge.inspect.api import C2S, S2C, CloseReason, Direction, Flow
from bridge.inspect.manager import InspectorChain
from bridge.inspect.session import TAP_DELAY, TAP_MAX, Abort, InspectSession, Phase
from stack.connection import TcpConnection, reset_reply
from stack.events import (
    Closed,
    Connected,
    ConnectionReset,
    DataReceived,
    IcmpKind,
    PeerFinished,
    ResetToListen,
    SoftError,
)
from stack.seq import MASK, seq_gt
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import RST, TcpSegment

__all__ = ["Splice", "Phase", "TAP_MAX", "TAP_DELAY"]

_CAN_SEND = frozenset({State.SYN_SENT, State.SYN_RECEIVED, State.ESTABLISHED,
                       State.CLOSE_WAIT})
_DONE = frozenset({State.CLOSED, State.TIME_WAIT})
_HALF = frozenset({State.LISTEN, State.SYN_RECEIVED})


class Splice:
    """One terminated flow: client leg <-> InspectSession (chain) <-> server leg."""

    __slots__ = ("key", "flow", "chain", "life", "client", "server", "syn", "_client_cfg",
                 "_server_cfg", "_q", "_eof", "_fin_sent", "_rst_client", "_client_addr",
                 "_server_addr", "created", "last_seen", "_server_up", "_broken", "connect_first",
                 "idle_timeout", "allow", "_owed", "_client_cfg_refused")

    def __init__(self, key: FlowKey, syn: TcpSegment, rule: InspectRule | None,
                 chain: InspectorChain | None, client_cfg: TcpConfig, server_cfg: TcpConfig,
                 now: float, *, connect_first: bool = False,
                 client_cfg_refused: TcpConfig | None = None) -> None:
        version, csrc, sdst, cport, sport = key
        self.key = key
        self.syn = syn
        self.chain = chain
        self.flow = Flow(key, rule.name if rule is not None else "-", "userspace", now)
        self.life = InspectSession(self.flow, chain, tap=True)
        self._client_cfg = client_cfg
        self._client_cfg_refused = client_cfg_refused  # connect first, server refused ECN
        self._server_cfg = server_cfg
        self._client_addr = (csrc, cport)
        self._server_addr = (sdst, sport)
        self.client: TcpConnection | None = None
        self.server = TcpConnection(self._client_addr, self._server_addr, server_cfg,
                                    iss=syn.seq)
        self._server_up = False
        self._broken = False    # a leg could not even be aborted (fail): count it closed
        # per direction: deque of [bytes to hand over, source bytes to consume then]
        self._q: dict[Direction, deque[list[Any]]] = {C2S: deque(), S2C: deque()}
        self._eof = {C2S: False, S2C: False}        # a FIN to pass on after the queue
        self._fin_sent = {C2S: False, S2C: False}   # ... and passed on (close())
        self._rst_client: list[TcpSegment] = []
        self.created = now
        self.last_seen = now
        self.connect_first = connect_first
        # memory budget (the Terminator's): None, or the window bytes we may reopen now
        self.allow: int | None = None
        self._owed = {C2S: 0, S2C: 0}   # consumed() held back under memory pressure
        self.idle_timeout = rule.idle_timeout if rule is not None else 7200.0

    @property
    def finished(self) -> bool:
        """The flow ended (flow_end ran); the legs may still be finishing."""
        return self.life.finished

    @property
    def phase(self) -> str:
        return self.life.phase

    # ------------------------------------------------------------------ opening

    def open(self, now: float) -> bool:
        """Run flow_start and, if allowed, answer the SYN (accept first) or send the server
        leg's SYN (connect first). False when denied."""
        if not self.life.start(now):
            self._refuse()
            return False
        if self.connect_first:
            self.server.connect(now)
        else:
            self._accept_client(now, None)
        return True

    def open_cookie(self, cookie: int, ack: TcpSegment, now: float) -> bool:
        """Open from a valid SYN cookie (`cookie` our ISS, `ack` the client's ACK of it): the
        client leg goes through LISTEN and SYN-RECEIVED on the kept (rebuilt) SYN, its
        SYN-ACK (already sent, statelessly) discarded, and takes the ACK. False when denied."""
        if not self.life.start(now):
            self._refuse()
            return False
        self._accept_client(now, cookie)
        client = self.client
        assert client is not None
        client.segments_to_send(now)  # the SYN-ACK the cookie already answered with
        client.receive_segment(ack, now)
        return True

    def reusable(self, syn: TcpSegment) -> bool:
        """A new SYN on this ended flow's 4-tuple may replace it (its legs in TIME-WAIT): its
        TSval is newer than the old connection's TS.Recent (RFC 6191 §2), or, without
        timestamps, its ISN lies beyond the old connection's last sequence number (RFC 9293
        §3.6.1 MAY-2, Linux tw_reuse). An old duplicate SYN is not (the TIME-WAIT leg answers
        it)."""
        c = self.client
        if c is None:
            return syn.seq != self.syn.seq
        recent = c.ts_recent
        if syn.ts is not None and recent is not None:
            return seq_gt(syn.ts[0], recent)
        return seq_gt(syn.seq, c.rcv_nxt_seq)

    @property
    def half_open(self) -> bool:
        """The client has not completed its handshake with us (and the flow is live)."""
        c = self.client
        return not self.life.finished and (c is None or c.state in _HALF)

    def _refuse(self) -> None:
        """Answer the kept SYN like a closed port (RFC 9293 §3.10.7.1)."""
        rst = reset_reply(self.syn)
        if rst is not None:
            self._rst_client.append(rst)

    def _accept_client(self, now: float, iss: int | None) -> None:
        """Open the client leg on the kept SYN: at once (accept first, its own ISS or the
        cookie's), or once the server leg is up (connect first: the server's ISN)."""
        cfg = self._client_cfg
        if self.connect_first:
            iss = (self.server.rcv_nxt_seq - 1) & MASK
            if cfg.ecn and not self.server.ecn:  # the server said no: so do we (§6.1.1)
                cfg = self._client_cfg_refused or replace(cfg, ecn=False)  # (cached)
        conn = TcpConnection(self._server_addr, self._client_addr, cfg, iss=iss)
        conn.listen()
        conn.receive_segment(self.syn, now)
        self.client = conn
        if self.connect_first:
            self.life.opened()

    # ------------------------------------------------------------------ input

    def from_client(self, seg: TcpSegment, now: float) -> None:
        """A segment from the client (inner packet read from the TUN)."""
        self.last_seen = now
        client = self.client
        if client is None:
            # A retransmitted SYN while the server leg opens: the kept one answers. A RST
            # at the kept SYN's RCV.NXT (RFC 9293 §3.10.7.4 second step, exactly in window
            # as RFC 5961 §3.2 asks) means the client gave up: end the attempt now.
            if seg.flags & RST and seg.seq == (self.syn.seq + 1) & MASK:
                self._client_gave_up(now)
            return
        if len(seg.payload) <= 1 and client.is_keepalive(seg) and self._server_up:
            self.server.keepalive_now()  # mirrored: the server's path sees it too
        client.receive_segment(seg, now)

    def _client_gave_up(self, now: float) -> None:
        """The client reset a connection that is not established on its side (while the
        server leg connects, or in the client leg's SYN-RECEIVED): abort the server leg
        (RST if it is synchronized, RFC 9293 §3.10.5) and end the flow (CLIENT_RESET)."""
        if self.life.finished:
            return
        self._abort_legs()
        self.life.reset(C2S, now)

    def from_server(self, seg: TcpSegment, now: float) -> None:
        """A segment from the server (decapsulated from the tunnel)."""
        self.last_seen = now
        server = self.server
        if len(seg.payload) <= 1 and self.client is not None and server.is_keepalive(seg):
            self.client.keepalive_now()  # mirrored: the client's path sees it too
        server.receive_segment(seg, now)

    def server_icmp(self, kind: IcmpKind, code: int, mtu: int | None, seq: int | None,
                    now: float) -> None:
        """An ICMP error quoting a server-leg segment (`seq`: the quoted sequence number, or
        None for our own errors); acted on at the next step."""
        self.server.icmp_error(kind, code, mtu, now, seq=seq)

    def step(self, now: float) -> None:
        """Act on what the legs received since the last step (once per batch, so that the
        data of a whole batch passes the inspectors as one chunk and ACKs aggregate)."""
        self._step(now)

    def get_timer(self) -> float | None:
        """The earliest deadline of either leg or of the tap's inspection, or None."""
        t = self.server.get_timer()
        if self.client is not None:
            c = self.client.get_timer()
            if c is not None and (t is None or c < t):
                t = c
        d = self.life.tap_due
        if d is not None and (t is None or d < t):
            t = d
        return t

    def handle_timer(self, now: float) -> None:
        """Inspect what the tap holds once due, then run both legs' expired timers
        (retransmission, delayed ACK, persist, TIME-WAIT)."""
        due = self.life.tap_due
        if due is not None and now >= due:
            self.drain(now)
        self.server.handle_timer(now)
        if self.client is not None:
            self.client.handle_timer(now)
        self._step(now)

    def drain(self, now: float) -> None:
        """Run the observer chain on the chunks forwarded before it saw them."""
        if self.life.drain(now) is not None:
            self._abort_legs()

    def fail(self, exc: BaseException, now: float) -> None:
        """A bug of ours broke this flow: abort both legs, record it, end the flow (SHUTDOWN)."""
        self.flow.metadata.setdefault("errors", []).append(f"internal: {exc!r}")
        for q in self._q.values():
            q.clear()
        for conn in (self.client, self.server):
            if conn is not None:
                try:
                    conn.abort()
                except Exception:  # noqa: BLE001 - nothing more can be done for this leg
                    self._broken = True
        self.life.abort(CloseReason.SHUTDOWN, now)

    def abort(self, reason: CloseReason, now: float) -> None:
        """End the flow now: RST both legs (idle timeout, shutdown)."""
        if self.client is None and not self.finished:
            self.server.abort()
            self._refuse()
            self.life.abort(reason, now)
            return
        self._abort_legs()
        self.life.abort(reason, now)

    # ------------------------------------------------------------------ output

    def to_client(self, now: float) -> list[TcpSegment]:
        """Segments for the client, in order."""
        out = self._rst_client
        if out:
            self._rst_client = []
        if self.client is not None:
            segs = self.client.segments_to_send(now)
            if out:
                out.extend(segs)
            else:
                out = segs
        return out

    def to_server(self, now: float) -> list[TcpSegment]:
        """Segments for the server, in order."""
        return self.server.segments_to_send(now)

    @property
    def dead(self) -> bool:
        """Both legs closed (TIME-WAIT over or aborted) and nothing left to send."""
        if not self.life.finished or self._rst_client:
            return False
        if self._broken:
            return True
        if self.server.state is not State.CLOSED:
            return False
        return self.client is None or self.client.state is State.CLOSED

    def held_bytes(self) -> int:
        """Bytes queued between the legs (inspected, not yet in a send buffer)."""
        n = 0
        for q in self._q.values():  # once per emit: loops, not a nested generator
            for item in q:
                n += len(item[0])
        return n

    # ------------------------------------------------------------------ the machine

    def _step(self, now: float) -> None:
        life = self.life
        server = self.server
        while (ev := server.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self._received(S2C, ev.data, now)
            elif isinstance(ev, Connected):
                self._server_up = True
                if self.client is None and not life.finished:
                    self._accept_client(now, None)
            elif isinstance(ev, PeerFinished):
                self._on_eof(S2C, now)
            elif isinstance(ev, ConnectionReset):
                if not self._server_up:
                    self.flow.metadata["connect_error"] = ev.reason
                    self._connect_failed(now)
                else:
                    self._abort_legs()  # an RST from one side aborts the other leg
                    life.reset(S2C, now)
            elif isinstance(ev, SoftError):
                if (not self._server_up and ev.kind is IcmpKind.UNREACHABLE
                        and not life.finished):  # RFC 5461 §4: a failed attempt
                    self.flow.metadata["connect_error"] = f"icmp unreachable {ev.code}"
                    self.server.abort()
                    self._connect_failed(now)
            elif isinstance(ev, Closed):
                pass
        client = self.client
        if client is not None:
            while (ev := client.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    self._received(C2S, ev.data, now)
                elif isinstance(ev, Connected):
                    if not self.connect_first and not life.finished:
                        life.opened()
                        server.connect(now)  # accept first: the client is real, go upstream
                elif isinstance(ev, PeerFinished):
                    self._on_eof(C2S, now)
                elif isinstance(ev, ConnectionReset):
                    self._abort_legs()
                    life.reset(C2S, now)
                elif isinstance(ev, ResetToListen):
                    self._client_gave_up(now)  # MUST-11 LISTEN: nobody else will come
        if not life.finished:
            self._move(C2S)
            self._move(S2C)
            if (self._fin_sent[C2S] and self._fin_sent[S2C] and client is not None
                    and client.state in _DONE and server.state in _DONE):
                if life.close(now) is not None:
                    self._abort_legs()

    def _connect_failed(self, now: float) -> None:
        """The server leg could not be opened: the client gets the closed port's RST (connect
        first), or its accepted connection is reset (accept first); CONNECT_FAILED."""
        if self.client is None:
            self._refuse()
        else:
            self.client.abort()
            for q in self._q.values():
                q.clear()
        self.life.abort(CloseReason.CONNECT_FAILED, now)

    def _received(self, d: Direction, data: bytes, now: float) -> None:
        """A leg delivered bytes: queue what the session passes on, or release them.
        Urgent data (the source leg's RCV.UP inside this chunk) stays urgent on the other
        leg: the queued item carries how many of its first bytes are urgent (all of a
        rewritten chunk that held some)."""
        flow = self.flow
        before = flow.bytes_c2s if d is C2S else flow.bytes_s2c
        out = self.life.received(d, data, now)
        if out is None or isinstance(out, Abort):
            self._release(d, len(data))
            if out is not None:
                self._abort_legs()
            return
        src = self.client if d is C2S else self.server
        up = src.urgent_up if src is not None else 0
        if up > before:
            n = len(data)
            u = min(up - before, n) if len(out) == n else len(out)
            self._q[d].append([out, n, u])
            return
        self._q[d].append([out, len(data)])

    def _on_eof(self, d: Direction, now: float) -> None:
        """A leg's peer half-closed: queue the session's tail, then the FIN (in _move)."""
        tail = self.life.eof(d, now)
        if tail is None:
            return
        if tail.__class__ is Abort:
            self._abort_legs()
            return
        self._eof[d] = True
        if tail:
            self._q[d].append([tail, 0])

    def _release(self, d: Direction, n: int) -> None:
        src = self.client if d is C2S else self.server
        if src is not None and n:
            self._give(src, d, n)

    def _give(self, src: TcpConnection, d: Direction, n: int) -> None:
        """Reopen `n` bytes of `src`'s receive window (consumed), as far as the memory
        budget allows (`allow`); the rest is owed and given back once it does."""
        if src.state is State.CLOSED:
            return
        allow = self.allow
        if allow is None:
            owed = self._owed[d]
            if owed:
                self._owed[d] = 0
                n += owed
            src.consumed(n)
            return
        n += self._owed[d]
        g = min(n, allow)
        self._owed[d] = n - g
        if g:
            self.allow = allow - g
            src.consumed(g)

    def buffered(self) -> int:
        """Payload bytes this flow holds: both legs' buffers and the queues between them."""
        n = self.server.buffered + self.held_bytes()
        return n + self.client.buffered if self.client is not None else n

    def _move(self, d: Direction) -> None:
        """Hand queued bytes to the destination leg as far as its send buffer takes them."""
        q = self._q[d]
        if not q and not self._owed[d] and not self._eof[d]:
            return  # nothing queued, owed or closing: every branch below would do nothing
        src: TcpConnection | None
        dst: TcpConnection | None
        if d is C2S:
            src, dst = self.client, self.server
        else:
            src, dst = self.server, self.client
        if dst is None or src is None:
            return          # the client leg does not exist yet: keep the server's bytes
        if self._owed[d] and (self.allow is None or self.allow > 0):
            self._give(src, d, 0)   # the memory budget allows more again
        if self._fin_sent[d] or dst.state not in _CAN_SEND:
            return
        while q:
            item = q[0]
            data = item[0]
            u = item[2] if len(item) > 2 else 0
            if u:  # the urgent part first, its end marked (RFC 9293 §3.8.5 MUST-31)
                k = dst.send(memoryview(data)[:u], urgent=True)
                item[2] = u - k
                if k < u:
                    item[0] = memoryview(data)[k:]
                    give = min(k, item[1])
                    if give:
                        item[1] -= give
                        self._give(src, d, give)
                    return
                k += dst.send(memoryview(data)[u:]) if len(data) > u else 0
            else:
                k = dst.send(data) if data else 0
            if k < len(data):
                item[0] = memoryview(data)[k:]
                give = min(k, item[1])      # reopen the window as bytes move on
                if give:
                    item[1] -= give
                    self._give(src, d, give)
                return
            q.popleft()
            if item[1]:
                self._give(src, d, item[1])
        if self._eof[d]:
            if dst.state is State.SYN_SENT:
                return  # CLOSE in SYN-SENT would delete the TCB (RFC 9293 §3.10.4): after it
            self._fin_sent[d] = True
            dst.close()     # RFC 9293 §3.6 half-close, after every queued byte

    def _abort_legs(self) -> None:
        """RST both legs (RFC 9293 §3.10.5 ABORT) and drop what was queued between them."""
        if self.client is not None:
            self.client.abort()
        self.server.abort()
        for q in self._q.values():
            q.clear()

    # ------------------------------------------------------------------ introspection

    def info(self, now: float) -> dict[str, Any]:
        """JSON-able state for `grebe flows`."""
        rec = self.life.info(now, self.created, self.last_seen)
        rec["held"] = self.held_bytes()
        rec["client_leg"] = self.client.info() if self.client is not None else None
        rec["server_leg"] = self.server.info()  # each with "ecn", "ce_marks", "ecn_cuts"
        return rec
