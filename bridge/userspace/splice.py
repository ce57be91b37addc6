"""Splice: one inspected TCP flow terminated twice, back to back, with the inspector chain between.

Rules of this module (pure, sans-I/O: segments and `now` in, segments and deadlines out)
- Two `stack` connections per flow. The *client leg* impersonates the server toward the client
  (local = the server's address and port); the *server leg* impersonates the client toward the
  server (local = the client's own address and port, so the server sees the client; its
  segments go through the tunnel like any other packet).
- Deferred accept: the client's SYN is kept, and the client leg is only created (passive open,
  RFC 9293 §3.10.7.2, answering the kept SYN) once the server leg is ESTABLISHED (RFC 9293
  §3.5). The client therefore sees the server's own answer to its connection attempt: a refused
  or timed-out upstream (ConnectionReset "refused"/"timeout", RFC 9293 §3.8.3 R2) is answered
  with the RST a closed port gives, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK> (RFC 9293
  §3.10.7.1), CloseReason.CONNECT_FAILED. The client leg takes the server's ISN as its own ISS,
  and the server leg the client's ISN, so both ends see the sequence numbers they would have seen.
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
  (CLIENT_RESET / SERVER_RESET).
- Back-pressure and bounded memory: both legs run with auto_consume off. Bytes a leg delivered
  stay counted in its receive window until the other leg's bounded send buffer took them
  (then `consumed()` reopens the window, RFC 9293 §3.8.6.2.2). A slow reader therefore fills
  the other leg's send buffer, then the first leg's receive buffer, and its sender sees a zero
  window (RFC 9293 §3.8.6.1). Per flow: four buffers of `max_buffer // 4` (the rule's
  max_buffer), plus at most one inspector-expanded chunk per direction.
- Observer chains (time to first byte): when every inspector of the rule only watches
  (`InspectorChain.observe_only`: `observer = True` on each, fail_open), a chunk a leg delivers
  is handed to the other leg at once, and the chain sees it just after, in `drain(now)`:
  the request and the response then leave in the core call that received them, and h11
  parsing (~0.3 ms a message warm, more cold) runs after the output left. The chunks wait
  in a tap, in arrival order, at most TAP_MAX bytes; a chunk that would overflow it drains
  the tap and is inspected inline (bulk transfers keep today's path and bounded memory).
  The tap is due TAP_DELAY after its first chunk arrived (`get_timer()`; the owner's timer
  runs `drain`): the interpreter runs one thread at a time, so a request parsed at once
  would hold up its own response, which a LAN server sends within a millisecond or two;
  parsed a few ms later, both go through in one drain. A FIN is passed on at once too (an
  observer holds back no tail) and `chain.eof` joins the tap behind the chunks before it, so a
  response that carries the FIN (nginx with keepalive_timeout 0) is not held up by parsing.
  The tap is drained before `flow_end`, so the inspectors see every byte and each eof, in
  order, with `flow.last_seen` at the chunk's arrival.
- Never raises on account of either peer: bad segments are the legs' business (dropped and
  counted there). Only misuse of this API raises (LocalProtocolError from the stack).

Theory of operation
`Splice(...)` keeps the SYN; `open(now)` (called by the owner right after) runs flow_start and
starts the server leg. Inputs (`from_client`, `from_server`) update a leg; `step(now)`, once per
batch, and `handle_timer(now)` drain both legs' events and move queued bytes: per direction a
deque of [bytes still to hand to the destination leg, source bytes to consume when handed over].
`to_client(now)` / `to_server(now)` pull the legs' segments. `finished` is set once the flow
ended (flow_end called); `dead` once both legs are CLOSED and nothing remains to send, when the
owner (bridge/userspace/terminator.py) forgets the splice.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from bridge.flows import FlowKey, InspectRule
from bridge.inspect.api import C2S, RESET, S2C, CloseReason, Deny, Direction, Flow
from bridge.inspect.manager import InspectorChain
from stack.connection import TcpConnection, reset_reply
from stack.events import (
    Closed,
    Connected,
    ConnectionReset,
    DataReceived,
    IcmpKind,
    PeerFinished,
    SoftError,
)
from stack.seq import MASK
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import TcpSegment

__all__ = ["Splice", "Phase", "TAP_MAX", "TAP_DELAY"]

TAP_MAX = 16 * 1024  # bytes an observer chain may be behind the forwarded stream (per flow)
TAP_DELAY = 0.005  # seconds from a tap's first chunk to its inspection (drain)

_CAN_SEND = frozenset({State.SYN_SENT, State.SYN_RECEIVED, State.ESTABLISHED,
                       State.CLOSE_WAIT})
_DONE = frozenset({State.CLOSED, State.TIME_WAIT})


class Phase:
    """Where a splice is in its life (plain strings for `grebe flows`)."""

    CONNECTING = "connecting"       # SYN kept, server leg opening
    OPEN = "open"                   # both legs exist
    ENDED = "ended"                 # flow_end called; legs finishing (TIME-WAIT, RSTs out)


class Splice:
    """One terminated flow: client leg <-> InspectorChain <-> server leg."""

    __slots__ = ("key", "flow", "chain", "client", "server", "syn", "phase", "finished",
                 "_client_cfg", "_server_cfg", "_q", "_eof", "_fin_sent", "_rst_client",
                 "_client_addr", "_server_addr", "created", "last_seen", "_server_up",
                 "_observe", "_tap", "_tap_bytes")

    def __init__(self, key: FlowKey, syn: TcpSegment, rule: InspectRule | None,
                 chain: InspectorChain | None, client_cfg: TcpConfig, server_cfg: TcpConfig,
                 now: float) -> None:
        version, csrc, sdst, cport, sport = key
        self.key = key
        self.syn = syn
        self.chain = chain
        self.flow = Flow(key, rule.name if rule is not None else "-", "userspace", now)
        self._client_cfg = client_cfg
        self._server_cfg = server_cfg
        self._client_addr = (csrc, cport)
        self._server_addr = (sdst, sport)
        self.client: TcpConnection | None = None
        self.server = TcpConnection(self._client_addr, self._server_addr, server_cfg,
                                    iss=syn.seq)
        self.phase = Phase.CONNECTING
        self.finished = False
        self._server_up = False
        # per direction: deque of [bytes to hand over, source bytes to consume then]
        self._q: dict[Direction, deque[list[Any]]] = {C2S: deque(), S2C: deque()}
        self._eof = {C2S: False, S2C: False}        # the sender's FIN arrived
        self._fin_sent = {C2S: False, S2C: False}   # ... and was passed on (close())
        self._rst_client: list[TcpSegment] = []
        # observer chains: chunks forwarded before inspection, (arrival, direction, bytes)
        self._observe = chain is not None and chain.observe_only
        self._tap: deque[tuple[float, Direction, bytes | None]] = deque()  # None: EOF
        self._tap_bytes = 0
        self.created = now
        self.last_seen = now

    # ------------------------------------------------------------------ opening

    def open(self, now: float) -> bool:
        """Run flow_start and, if allowed, send the server leg's SYN. False when denied."""
        if self.chain is not None and isinstance(self.chain.start(self.flow), Deny):
            self._refuse(CloseReason.DENIED, now)
            return False
        self.server.connect(now)
        return True

    def _refuse(self, reason: CloseReason, now: float) -> None:
        """Answer the kept SYN like a closed port (RFC 9293 §3.10.7.1) and end the flow."""
        rst = reset_reply(self.syn)
        if rst is not None:
            self._rst_client.append(rst)
        self._finish(reason, now)

    def _accept_client(self, now: float) -> None:
        """The server leg is up: open the client leg on the kept SYN (deferred accept)."""
        irs = (self.server.rcv_nxt_seq - 1) & MASK
        conn = TcpConnection(self._server_addr, self._client_addr, self._client_cfg, iss=irs)
        conn.listen()
        conn.receive_segment(self.syn, now)
        self.client = conn
        self.phase = Phase.OPEN

    # ------------------------------------------------------------------ input

    def from_client(self, seg: TcpSegment, now: float) -> None:
        """A segment from the client (inner packet read from the TUN)."""
        self.last_seen = now
        client = self.client
        if client is None:
            return      # a retransmitted SYN while the server leg opens: the kept one answers
        client.receive_segment(seg, now)

    def from_server(self, seg: TcpSegment, now: float) -> None:
        """A segment from the server (decapsulated from the tunnel)."""
        self.last_seen = now
        self.server.receive_segment(seg, now)

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
        if self._tap:
            d = self._tap[0][0] + TAP_DELAY
            if t is None or d < t:
                t = d
        return t

    def handle_timer(self, now: float) -> None:
        """Inspect what the tap holds once due, then run both legs' expired timers
        (retransmission, delayed ACK, persist, TIME-WAIT)."""
        if self._tap and now >= self._tap[0][0] + TAP_DELAY:
            self.drain(now)
        self.server.handle_timer(now)
        if self.client is not None:
            self.client.handle_timer(now)
        self._step(now)

    def drain(self, now: float) -> None:
        """Run the observer chain on the chunks that were forwarded before it saw them, in
        arrival order. A RESET (an observer that broke its word) aborts both legs."""
        tap = self._tap
        chain = self.chain
        if not tap or chain is None:
            return
        flow = self.flow
        last = flow.last_seen
        while tap:
            t, d, data = tap.popleft()
            flow.last_seen = t
            if data is None:  # the sender's FIN (_on_eof); an observer's tail is ignored
                res: Any = chain.eof(flow, d)
            else:
                self._tap_bytes -= len(data)
                res = chain.data(flow, d, data)
            if res is RESET and not self.finished:
                tap.clear()
                self._tap_bytes = 0
                flow.last_seen = last
                self._abort_both(flow.close_reason or CloseReason.INSPECTOR_RESET, now)
                return
        flow.last_seen = last

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
                    conn._state = State.CLOSED
        self._finish(CloseReason.SHUTDOWN, now)

    def abort(self, reason: CloseReason, now: float) -> None:
        """End the flow now: RST both legs (idle timeout, shutdown)."""
        if self.client is None and not self.finished:
            self.server.abort()
            self._refuse(reason, now)
            return
        self._abort_both(reason, now)

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
        if not self.finished or self._rst_client:
            return False
        if self.server.state is not State.CLOSED:
            return False
        return self.client is None or self.client.state is State.CLOSED

    def held_bytes(self) -> int:
        """Bytes queued between the legs (inspected, not yet in a send buffer)."""
        return sum(len(item[0]) for q in self._q.values() for item in q)

    # ------------------------------------------------------------------ the machine

    def _step(self, now: float) -> None:
        server = self.server
        while (ev := server.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self._inspect(S2C, ev.data, now)
            elif isinstance(ev, Connected):
                self._server_up = True
                if self.client is None and not self.finished:
                    self._accept_client(now)
            elif isinstance(ev, PeerFinished):
                self._on_eof(S2C, now)
            elif isinstance(ev, ConnectionReset):
                if not self._server_up:
                    self.flow.metadata["connect_error"] = ev.reason
                    self._refuse(CloseReason.CONNECT_FAILED, now)
                else:
                    self._abort_both(CloseReason.SERVER_RESET, now)
            elif isinstance(ev, SoftError):
                if (not self._server_up and ev.kind is IcmpKind.UNREACHABLE
                        and not self.finished):  # RFC 5461 §4: a failed attempt
                    self.flow.metadata["connect_error"] = f"icmp unreachable {ev.code}"
                    self.server.abort()
                    self._refuse(CloseReason.CONNECT_FAILED, now)
            elif isinstance(ev, Closed):
                pass
            if self.finished and self.phase is Phase.CONNECTING:
                break
        client = self.client
        if client is not None:
            while (ev := client.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    self._inspect(C2S, ev.data, now)
                elif isinstance(ev, PeerFinished):
                    self._on_eof(C2S, now)
                elif isinstance(ev, ConnectionReset):
                    self._abort_both(CloseReason.CLIENT_RESET, now)
        if not self.finished:
            self._move(C2S)
            self._move(S2C)
            if (self._fin_sent[C2S] and self._fin_sent[S2C] and client is not None
                    and client.state in _DONE and server.state in _DONE):
                self._finish(CloseReason.CLOSED, now)

    def _inspect(self, d: Direction, data: bytes, now: float) -> None:
        flow = self.flow
        flow.last_seen = now
        n = len(data)
        if d is C2S:
            flow.bytes_c2s += n
        else:
            flow.bytes_s2c += n
        if self.finished:
            self._release(d, n)
            return
        if self._observe:
            if self._tap_bytes + n <= TAP_MAX:  # forward now, inspect in drain()
                self._tap.append((now, d, data))
                self._tap_bytes += n
                self._q[d].append([data, n])
                return
            self.drain(now)  # order: the tapped chunks first
            if self.finished:
                self._release(d, n)
                return
        out: Any = data if self.chain is None else self.chain.data(flow, d, data)
        if out is RESET:
            self._release(d, n)
            self._abort_both(flow.close_reason or CloseReason.INSPECTOR_RESET, now)
            return
        self._q[d].append([out, n])

    def _on_eof(self, d: Direction, now: float) -> None:
        if self._eof[d] or self.finished:
            return
        self._eof[d] = True
        if self._observe:
            # an observer holds nothing back (bridge/inspect/api.py), so its eof() cannot add
            # bytes before the FIN: the FIN goes on now and chain.eof runs in drain(), after
            # the tapped chunks (a response that carries the FIN is not held up by parsing)
            self._tap.append((now, d, None))
            return
        if self.chain is not None:
            if self._tap:
                self.drain(now)  # the inspectors see every byte before the end of stream
                if self.finished:
                    return
            tail: Any = self.chain.eof(self.flow, d)
            if tail is RESET:
                self._abort_both(self.flow.close_reason or CloseReason.INSPECTOR_RESET, now)
                return
            if tail:
                self._q[d].append([tail, 0])

    def _release(self, d: Direction, n: int) -> None:
        src = self.client if d is C2S else self.server
        if src is not None and n and src.state is not State.CLOSED:
            src.consumed(n)

    def _move(self, d: Direction) -> None:
        """Hand queued bytes to the destination leg as far as its send buffer takes them."""
        q = self._q[d]
        src: TcpConnection | None
        dst: TcpConnection | None
        if d is C2S:
            src, dst = self.client, self.server
        else:
            src, dst = self.server, self.client
        if dst is None or src is None:
            return          # the client leg does not exist yet: keep the server's bytes
        if self._fin_sent[d] or dst.state not in _CAN_SEND:
            return
        while q:
            item = q[0]
            data = item[0]
            k = dst.send(data) if data else 0
            if k < len(data):
                item[0] = memoryview(data)[k:]
                give = min(k, item[1])      # reopen the window as bytes move on
                if give:
                    item[1] -= give
                    src.consumed(give)
                return
            q.popleft()
            if item[1]:
                src.consumed(item[1])
        if self._eof[d]:
            self._fin_sent[d] = True
            dst.close()     # RFC 9293 §3.6 half-close, after every queued byte

    def _abort_both(self, reason: CloseReason, now: float) -> None:
        if self.client is not None:
            self.client.abort()
        self.server.abort()
        for q in self._q.values():
            q.clear()
        self._finish(reason, now)

    def _finish(self, reason: CloseReason, now: float) -> None:
        if self.finished:
            return
        if self._tap:
            self.drain(now)  # flow_end after the inspectors saw every forwarded byte
            if self.finished:
                return
        self.finished = True
        self.phase = Phase.ENDED
        flow = self.flow
        flow.end = now
        if self.chain is not None:
            if reason in (CloseReason.INSPECTOR_RESET, CloseReason.INSPECTOR_ERROR):
                reason = flow.close_reason or reason
            self.chain.end(flow, reason)
        else:
            flow.close_reason = reason

    # ------------------------------------------------------------------ introspection

    def info(self, now: float) -> dict[str, Any]:
        """JSON-able state for `grebe flows`."""
        flow = self.flow
        return {
            "id": flow.id, "src": flow.src, "sport": flow.sport, "dst": flow.dst,
            "dport": flow.dport, "ip": flow.version, "proto": "tcp", "rule": flow.rule,
            "phase": self.phase, "age": round(now - self.created, 3),
            "idle": round(now - self.last_seen, 3),
            "inspectors": list(self.chain.names) if self.chain is not None else [],
            "bytes_c2s": flow.bytes_c2s, "bytes_s2c": flow.bytes_s2c,
            "held": self.held_bytes(),
            "close": flow.close_reason.value if flow.close_reason is not None else None,
            "client_leg": self.client.info() if self.client is not None else None,
            "server_leg": self.server.info(),
        }
