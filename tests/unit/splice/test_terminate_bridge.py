"""The Terminator wired into the Bridge: client -> Bridge A (terminates) => tunnel => Bridge B ->
server, every hop real bytes (IP packets, GRE-in-UDP datagrams)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from bridge.config import loads_config
from bridge.pipeline import Bridge, Output
from stack.connection import TcpConnection
from stack.events import DataReceived
from stack.state import State
from stack.tcp_config import TcpConfig
from stack.wire.tcp import ACK, RST, SYN, parse_tcp

CLIENT = ipaddress.ip_address("198.18.10.5").packed
SERVER = ipaddress.ip_address("198.18.20.7").packed
CLIENT6 = ipaddress.ip_address("2001:db8:10::5").packed
SERVER6 = ipaddress.ip_address("2001:db8:20::7").packed

SITE = """
[tun]
name = "gb{side}"
addresses = ["{tun4}", "{tun6}"]
[listen]
address = "{listen}"
port = 4754
[pmtu]
underlay_mtu = 1500
[[peers]]
name = "other"
endpoint = "{endpoint}:4754"
prefixes = [{prefixes}]
key = 42
sequence = "{seq}"
"""

INSPECT = """
[[inspect]]
name = "web"
dst_ports = [80]
inspectors = ["replace"]
replace = [["secret", "SECRET"]]
backend = "userspace"
"""


def bridges(seq: str = "drop-late") -> tuple[Bridge, Bridge]:
    a = loads_config(SITE.format(side="a", tun4="198.18.100.1/30", tun6="2001:db8:100::1/64",
                                 listen="198.18.0.1", endpoint="198.18.0.2", seq=seq,
                                 prefixes='"198.18.20.0/24", "2001:db8:20::/48"') + INSPECT)
    b = loads_config(SITE.format(side="b", tun4="198.18.100.2/30", tun6="2001:db8:100::2/64",
                                 listen="198.18.0.2", endpoint="198.18.0.1", seq=seq,
                                 prefixes='"198.18.10.0/24", "2001:db8:10::/48"'))
    return Bridge(a, 0.0), Bridge(b, 0.0)


def ip_packet(bridge: Bridge, src: bytes, dst: bytes, seg: Any) -> bytes:
    assert bridge.terminator is not None
    return bridge.terminator.packet(src, dst, seg)


def tcp_of(pkt: bytes) -> Any:
    off = 40 if pkt[0] >> 4 == 6 else (pkt[0] & 15) * 4
    src, dst = (pkt[8:24], pkt[24:40]) if off == 40 else (pkt[12:16], pkt[16:20])
    return parse_tcp(memoryview(pkt)[off:], bytes(src), bytes(dst))


class World:
    """client <-> Bridge A <=> Bridge B <-> server, no loss, 1 ms per hop, run to quiescence."""

    def __init__(self, port: int, v6: bool = False) -> None:
        self.a, self.b = bridges()
        c, s = (CLIENT6, SERVER6) if v6 else (CLIENT, SERVER)
        self.client = TcpConnection((c, 40001), (s, port), TcpConfig(msl=1.0))
        self.server = TcpConnection((s, port), (c, 40001), TcpConfig(msl=1.0))
        self.server.listen()
        self.c, self.s = c, s
        self.now = 0.0
        self.at_server: list[Any] = []      # every segment the server received
        self.client_sent: list[Any] = []    # every segment the client sent
        self.client_rx = bytearray()
        self.server_rx = bytearray()
        self.client.connect(0.0)

    def step(self) -> bool:
        now = self.now
        moved = False
        oa, ob = Output(), Output()
        segs = self.client.segments_to_send(now)
        self.client_sent += segs
        pk = [ip_packet(self.a, self.c, self.s, seg) for seg in segs]
        self.a.from_tun(pk, now, oa)
        pk = [ip_packet(self.a, self.s, self.c, seg)
              for seg in self.server.segments_to_send(now)]
        self.b.from_tun(pk, now, ob)
        for br, o in ((self.a, oa), (self.b, ob)):
            t = br.get_timer()
            if t is not None and t <= now:
                br.handle_timer(now, o)
        # the tunnel, both ways (what a from_udp produces toward the tunnel goes on too)
        to_b = [d for dgs in oa.udp.values() for d in dgs]
        to_a = [d for dgs in ob.udp.values() for d in dgs]
        to_client = list(oa.tun)
        to_server = list(ob.tun)
        while to_a or to_b:
            moved = True
            ia, ib = Output(), Output()
            self.b.from_udp([(d, ("198.18.0.1", 4754)) for d in to_b], now, ib)
            self.a.from_udp([(d, ("198.18.0.2", 4754)) for d in to_a], now, ia)
            to_b = [d for dgs in ia.udp.values() for d in dgs]
            to_a = [d for dgs in ib.udp.values() for d in dgs]
            to_client += ia.tun
            to_server += ib.tun
        for pkt in to_client:
            self.client.receive_segment(tcp_of(bytes(pkt)), now)
            moved = True
        for pkt in to_server:
            seg = tcp_of(bytes(pkt))
            self.at_server.append(seg)
            self.server.receive_segment(seg, now)
            moved = True
        for conn, rx in ((self.client, self.client_rx), (self.server, self.server_rx)):
            t = conn.get_timer()
            if t is not None and t <= now:
                conn.handle_timer(now)
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    rx += ev.data
        return moved

    def run(self, until: Any, limit: float = 30.0) -> bool:
        while self.now < limit:
            if until():
                return True
            if not self.step():
                ts = [t for t in (self.a.get_timer(), self.b.get_timer(),
                                  self.client.get_timer(), self.server.get_timer())
                      if t is not None]
                self.now = max(self.now + 0.001, min(ts)) if ts else self.now + 0.001
            else:
                self.now += 0.001
        return until()


def test_inspected_flow_is_terminated_and_rewritten_v4() -> None:
    w = World(80)
    w.run(lambda: w.server.state is State.ESTABLISHED)
    body = b"the secret is " + os.urandom(200_000) + b" secret"
    w.server.send(body)
    w.client.send(b"GET /secret HTTP/1.0\r\n\r\n")
    assert w.run(lambda: len(w.client_rx) >= len(body))
    assert bytes(w.client_rx) == body.replace(b"secret", b"SECRET")
    assert bytes(w.server_rx) == b"GET /SECRET HTTP/1.0\r\n\r\n"
    (flow,) = w.a.flows(w.now)
    assert flow["rule"] == "web" and flow["inspectors"] == ["ReplaceInspector"]
    assert w.a.status(w.now)["inspect"]["live"] == 1
    # the server's SYN came from the server leg: the client's ISN, our options
    syn = w.at_server[0]
    assert syn.flags & SYN and syn.seq == w.client._snd.iss
    w.client.close()
    w.server.close()
    assert w.run(lambda: not w.a.flows(w.now), limit=60)


def test_inspected_flow_v6() -> None:
    w = World(80, v6=True)
    w.run(lambda: w.server.state is State.ESTABLISHED)
    w.server.send(b"secret v6")
    assert w.run(lambda: len(w.client_rx) >= 9)
    assert bytes(w.client_rx) == b"SECRET v6"


def test_unselected_flow_passes_untouched() -> None:
    """Port 8080 matches no rule: the server gets the client's SYN as the client sent it."""
    w = World(8080)
    # an MSS below the tunnel's, so that the Bridge's MSS clamp has no reason to touch it
    w.client = TcpConnection((w.c, 40001), (w.s, 8080), TcpConfig(mss=1380, msl=1.0))
    w.client.connect(0.0)
    w.run(lambda: w.server.state is State.ESTABLISHED)
    syn, mine = w.at_server[0], w.client_sent[0]
    assert (syn.seq, syn.mss, syn.wscale, syn.sack_perm, syn.window) == (
        mine.seq, mine.mss, mine.wscale, mine.sack_perm, mine.window)
    assert syn.ts is not None and mine.ts is not None and syn.ts[0] == mine.ts[0]
    w.server.send(b"secret")
    assert w.run(lambda: len(w.client_rx) >= 6)
    assert bytes(w.client_rx) == b"secret"       # not rewritten: not terminated
    assert not w.a.flows(w.now)
    assert w.a.status(w.now)["inspect"]["flow_table"]["forward"] == 1


def test_bridge_without_userspace_rules_has_no_terminator() -> None:
    a, b = bridges()
    assert a.terminator is not None and b.terminator is None
    assert b.flows(0.0) == [] and "inspect" not in b.status(0.0)


def test_midstream_packet_of_inspected_port_is_forwarded_untouched() -> None:
    """A connection that began before the rule (or before grebe) is not terminated."""
    from stack.wire.tcp import ACK, TcpSegment

    a, _b = bridges()
    pkt = ip_packet(a, CLIENT, SERVER, TcpSegment(40002, 80, 1000, 2000, ACK, 500, b"late"))
    out = Output()
    a.from_tun([pkt], 0.0, out)
    assert not out.tun and not a.flows(0.0)
    (dgram,) = out.udp[("198.18.0.2", 4754)]
    assert bytes(dgram).endswith(b"late")
    assert a.status(0.0)["inspect"]["flow_table"]["midstream"] == 1


def test_userspace_drop_rule_answers_the_syn_with_rst() -> None:
    from bridge.config import loads_config
    from stack.wire.tcp import SYN, TcpSegment

    text = SITE.format(side="a", tun4="198.18.100.1/30", tun6="2001:db8:100::1/64",
                       listen="198.18.0.1", endpoint="198.18.0.2", seq="off",
                       prefixes='"198.18.20.0/24"') + """
[[inspect]]
name = "no-telnet"
dst_ports = [23]
action = "drop"
backend = "userspace"
"""
    a = Bridge(loads_config(text), 0.0)
    assert a.terminator is not None
    pkt = ip_packet(a, CLIENT, SERVER, TcpSegment(40003, 23, 1, 0, SYN, 500, mss=1400))
    out = Output()
    a.from_tun([pkt], 0.0, out)
    assert not out.udp and a.status(0.0)["inspect"]["drops"] == {"rule_drop": 1}
    (reply,) = out.tun                  # RFC 9293 §3.10.7.1: a closed port's answer
    rst = tcp_of(bytes(reply))
    assert rst.flags & RST and rst.flags & ACK and rst.ack == 2
    assert (rst.src_port, rst.dst_port) == (23, 40003)


class _TsoWorld(World):
    """The client's data segments of each step reach Bridge A as one TSO super-packet, as
    the TUN hands them (vnet header NEEDS_CSUM + GSO, the pseudo-header sum in the field)."""

    frames = 0

    def step(self) -> bool:
        from bridge.gso import SuperPacket
        from bridge.io.offload import split_frame
        from stack.wire.checksum import pseudo_sum_v4
        from stack.wire.vnet import VNET

        segs = self.client.segments_to_send(self.now)
        data = [s for s in segs if s.payload and not s.flags & SYN]
        if len(data) < 2:  # nothing to merge: the ordinary path
            return self._step_with(segs)
        pkts = [ip_packet(self.a, self.c, self.s, s) for s in data]
        first = pkts[0]
        hl = 20 + (first[32] >> 4) * 4
        payload = b"".join(p[hl:] for p in pkts)
        h = bytearray(first[:hl])
        h[2:4] = (hl + len(payload)).to_bytes(2, "big")
        h[36:38] = pseudo_sum_v4(self.c, self.s, 6, hl - 20 + len(payload)).to_bytes(2, "big")
        frame = VNET.pack(1, 1, hl, len(first) - hl, 20, 16) + bytes(h) + payload
        self.frames += 1
        rest = [s for s in segs if s not in data]
        return self._step_with(rest, SuperPacket(frame, 10, len(first) - hl, split_frame))

    def _step_with(self, segs: list[Any], sp: Any = None) -> bool:
        orig = self.client.segments_to_send
        self.client.segments_to_send = lambda now: segs  # type: ignore[method-assign]
        real_from_tun = self.a.from_tun

        def from_tun(pk: list[Any], now: float, out: Output) -> None:
            real_from_tun(([sp] if sp is not None else []) + pk, now, out)

        self.a.from_tun = from_tun  # type: ignore[method-assign]
        try:
            return super().step() or sp is not None
        finally:
            self.client.segments_to_send = orig  # type: ignore[method-assign]
            del self.a.from_tun


def test_client_tso_super_packet_is_taken_whole_by_the_terminator() -> None:
    w = _TsoWorld(80)
    assert w.run(lambda: w.server.state is State.ESTABLISHED)
    term = w.a.terminator
    assert term is not None
    taken: list[bool] = []
    real = term.from_tun_super

    def spy(sp: Any, now: float) -> bool:
        taken.append(real(sp, now))
        return taken[-1]

    term.from_tun_super = spy  # type: ignore[method-assign]
    body = os.urandom(200_000).replace(b"secret", b"xxxxxx") + b"a secret"
    w.client.send(body)
    assert w.run(lambda: len(w.server_rx) >= len(body))
    assert bytes(w.server_rx) == body.replace(b"secret", b"SECRET")
    assert w.frames > 0 and len(taken) == w.frames and all(taken)
    assert term.drops == {}
