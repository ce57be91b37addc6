"""Keep-warm for the userspace termination path: a throw-away connection through a shadow.

Rules of this module (pure, sans-I/O: `now` in, nothing out)
- `WarmCycle(real)` builds a private shadow `Terminator`: one rule (port 80 of two addresses
  that never leave it, 198.18.255.1 -> 198.18.255.2), the real Terminator's TCP settings
  (TUN MTU, TSO segment size, TunFrame framing), one observer inspector that does nothing
  (so the splice's tap path runs too), a flow table of 8 entries, and a `send_to_peer` that
  keeps the packets for the shadow's own server. Nothing it makes reaches an `Output`, a
  counter, a timer or an inspector of the real Terminator, which it only reads.
- `step(now)` moves one hop of a connection between a client and a server TcpConnection (our
  own stack) on either side of the shadow, in turn: the client's SYN from the TUN (a new
  splice: flow table, Splice, both legs' set-up), the server's SYN-ACK from the tunnel
  (`from_peer`, the deferred accept), the client's ACK and request, the server's response,
  then both ends' RSTs, a drain and the reap. Every hop is one call of the real path's code:
  `from_tun`, `flush`, `from_peer`, the legs' input and output, the IP framing.
- One direction: the Terminator imports this module; this module uses only the public names
  of the Terminator it is given (`packet`, `configs_for`, `forget`, ...) and builds the
  shadow with that object's own class, so it imports nothing of terminator.py.
- Never raises on account of the shadow's traffic (it is our own); a bug of ours raises to
  the caller, whose keep-warm turns itself off (bridge/io/warm.py).

Theory of operation: measured in the lab on this 2-vCPU VM (bridge/io/warm.py explains the
effect): the first Python code a thread runs after ~1-10 ms idle is several times slower than
warm, and a new inspected connection crosses the Terminator four times (SYN, SYN-ACK, request,
response), each after such an idle wait. The Bridge's own keep-warm shadow does not touch this
code. With `Terminator.warm` called on the TUN thread's keep-warm tick (0.5 ms), paired runs
of 20 new connections (curl, log inspector) gave gw-a's SYN crossing 762 -> 573 and 703 -> 526
µs, the SYN-ACK 460 -> 370 and 481 -> 361 µs, the core call medians from_tun 306 -> 226 and
from_udp 311 -> 256 µs, and curl's time to first byte 3.62 -> 3.06 and 3.57 -> 3.10 ms. A
hop costs ~50-120 µs of CPU (one connection per five ticks), only while a splice is live or
one opened in the last second.
"""

from __future__ import annotations

from typing import Any

from bridge.flows import Backend, FlowTable, InspectRule, selector_for
from bridge.inspect.api import Inspector
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.tunframe import TunFrame
from stack.connection import TcpConnection
from stack.state import State
from stack.wire.tcp import parse_tcp
from stack.wire.vnet import VNET_HDR_LEN

__all__ = ["WarmCycle", "WARM_CLIENT", "WARM_SERVER"]

WARM_CLIENT = bytes((198, 18, 255, 1))
WARM_SERVER = bytes((198, 18, 255, 2))
_PORT = 80
_REQUEST = b"GET / HTTP/1.1\r\nHost: warm\r\n\r\n"
_RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"
_OPEN = frozenset({State.ESTABLISHED, State.CLOSE_WAIT})


class _Nothing(Inspector):
    """An observer that observes nothing: the shadow splice takes the tap path."""

    observer = True


class _Out:
    __slots__ = ("tun",)

    def __init__(self, tun: list[Any]) -> None:
        self.tun = tun


class WarmCycle:
    """One shadow Terminator with a client and a server; `step` moves one hop."""

    def __init__(self, real: Any) -> None:
        # connect first: the hops below follow the deferred accept's packet order
        rule = InspectRule(name="warm", dst_ports=((_PORT, _PORT),), connect_first=True)
        mgr = InspectorManager(())
        mgr.chains[rule.name] = InspectorChain(rule, [_Nothing()])
        self.to_server: list[bytes] = []
        self.to_client: list[Any] = []
        self.term = type(real)((rule,), self._send, lambda dst: int(real.tun_mtu()),
                               real.tun_mtu, manager=mgr)
        self.term.table = FlowTable(selector_for((rule,), Backend.USERSPACE), max_flows=8)
        self.term.tun_offload = real.tun_offload
        self.term.tx_max_segment = real.tx_max_segment
        self.port = 1024
        self.phase = 0
        self.client: TcpConnection | None = None
        self.server: TcpConnection | None = None

    def _send(self, pkt: bytes, now: float, out: Any) -> bool:
        self.to_server.append(pkt)
        return True

    def step(self, now: float) -> None:
        """One hop of the shadow connection (see the module docstring)."""
        phase = self.phase
        self.phase = (phase + 1) % 5
        if phase == 0 or self.client is None or self.server is None:
            self._open(now)
            return
        client, server = self.client, self.server
        if phase == 1:  # the server gets the SYN; its SYN-ACK comes back from the tunnel
            self._server_in(server, now)
            self._server_out(server, now)
        elif phase == 2:  # the client gets its SYN-ACK and sends a request
            self._client_in(client, now)
            if client.state in _OPEN:
                client.send(_REQUEST)
            self._client_out(client, now)
        elif phase == 3:  # the server answers
            self._server_in(server, now)
            while server.next_event() is not None:
                pass
            if server.state in _OPEN:
                server.send(_RESPONSE)
            self._server_out(server, now)
        else:  # both ends reset; the shadow drains its tap and forgets the splice
            self._client_in(client, now)
            for conn in (client, server):
                if conn.state is not State.CLOSED and conn.state is not State.LISTEN:
                    conn.abort()
            self._client_out(client, now)
            self._server_out(server, now)
            term = self.term
            term.handle_timer(now + 1.0, _Out(self.to_client))
            for sp in list(term.splices.values()):
                term.forget(sp)
            self.to_client.clear()
            self.to_server.clear()
            self.client = self.server = None

    def _open(self, now: float) -> None:
        self.port = self.port + 1 if self.port < 65000 else 1025
        ccfg, _scfg = self.term.configs_for((4, WARM_CLIENT, WARM_SERVER, self.port, _PORT),
                                             None)
        client = TcpConnection((WARM_CLIENT, self.port), (WARM_SERVER, _PORT), ccfg)
        server = TcpConnection((WARM_SERVER, _PORT), (WARM_CLIENT, self.port), ccfg)
        server.listen()
        client.connect(now)
        self.client, self.server = client, server
        self.to_client.clear()
        self.to_server.clear()
        self._client_out(client, now)

    def _client_out(self, client: TcpConnection, now: float) -> None:
        term = self.term
        for seg in client.segments_to_send(now):
            pkt = term.packet(WARM_CLIENT, WARM_SERVER, seg)
            term.from_tun(pkt, len(pkt), now)
        term.flush(now, _Out(self.to_client))

    def _server_out(self, server: TcpConnection, now: float) -> None:
        term = self.term
        pkts = [term.packet(WARM_SERVER, WARM_CLIENT, seg) for seg in server.segments_to_send(now)]
        term.from_peer(pkts, now, _Out(self.to_client))

    def _client_in(self, client: TcpConnection, now: float) -> None:
        for pkt in self.to_client:
            mv = memoryview(pkt)[VNET_HDR_LEN:] if type(pkt) is TunFrame else memoryview(pkt)
            seg = parse_tcp(mv[20:], WARM_SERVER, WARM_CLIENT, verify_checksum=False)
            if seg is not None:
                client.receive_segment(seg, now)
        self.to_client.clear()

    def _server_in(self, server: TcpConnection, now: float) -> None:
        for pkt in self.to_server:
            seg = parse_tcp(memoryview(pkt)[20:], WARM_CLIENT, WARM_SERVER)
            if seg is not None:
                server.receive_segment(seg, now)
        self.to_server.clear()
