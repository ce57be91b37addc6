"""Built-in `pcap` inspector and the pure pcap writer / TCP stream synthesizer behind it.

Rules
- File format: classic libpcap (magic 0xa1b2c3d4, version 2.4, microsecond stamps), link type
  LINKTYPE_RAW (101): every record is a bare IPv4 or IPv6 packet, so inner packets and outer
  (GRE-in-UDP) datagrams can share one file and Wireshark/tshark dissect both.
- The writer is pure: `PcapWriter` appends records to an in-memory buffer; `take()` hands the
  bytes out and the inspector's `flush()` appends them to `pcap_path` (off the data path).
- The kernel backend has byte streams, not packets, so `TcpStreamSynth` rebuilds a plausible
  conversation: a three-way handshake at flow start, data cut into MSS-sized segments with
  correct sequence and acknowledgment numbers (RFC 9293 §3.4: SEG.SEQ advances by the payload
  length, SYN and FIN count one), FIN or RST at the end, valid IPv4 header and TCP checksums
  (RFC 791 §3.1, RFC 9293 §3.1 pseudo-header, via stack/wire/checksum.py). Wireshark's
  "Follow TCP stream" then shows exactly the bytes this inspector saw.
- Position in the chain decides what is recorded: first in `inspectors` = the bytes as received,
  after a `replace` = the rewritten bytes.
- `write_packet()` / `write_outer()` take real packets (the userspace backend's inner packets,
  the loop's outer datagrams); `udp_packet()` wraps a datagram payload in IP/UDP when only
  addresses are known.
"""

from __future__ import annotations

import ipaddress
import os
import struct

from bridge.flows import InspectRule
from bridge.inspect.api import Allow, CloseReason, Deny, Direction, Flow, Inspector
from bridge.inspect.options import Option, integer, text
from stack.wire.checksum import checksum, pseudo_sum_v4, pseudo_sum_v6, udp_fixup

LINKTYPE_RAW = 101
PCAP_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def file_header(snaplen: int = 262144, linktype: int = LINKTYPE_RAW) -> bytes:
    """The 24-byte libpcap global header."""
    return PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, linktype)


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    """An IPv4 (4-byte addresses) or IPv6 (16-byte) header + payload; v4 header checksummed."""
    if len(src) == 4:
        hdr = bytearray(_IPV4.pack(0x45, 0, 20 + len(payload), ident & 0xFFFF, 0x4000, 64,
                                   proto, 0, src, dst))
        struct.pack_into("!H", hdr, 10, checksum(hdr))
        return bytes(hdr) + payload
    return _IPV6.pack(0x60000000, len(payload), proto, 64, src, dst) + payload


def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    pseudo = pseudo_sum_v4 if len(src) == 4 else pseudo_sum_v6
    return checksum(segment, pseudo(src, dst, proto, len(segment)))


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
               payload: bytes = b"", window: int = 65535) -> bytes:
    """A complete IP/TCP packet with correct checksums."""
    seg = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                              window, 0, 0))
    seg += payload
    struct.pack_into("!H", seg, 16, _l4_checksum(src, dst, 6, bytes(seg)))
    return ip_packet(src, dst, 6, bytes(seg))


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """An IP/UDP packet around `payload` (for outer datagrams known only by address)."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    seg = bytearray(_UDP.pack(sport, dport, 8 + len(payload), 0)) + payload
    struct.pack_into("!H", seg, 6, udp_fixup(_l4_checksum(s, d, 17, bytes(seg))))
    return ip_packet(s, d, 17, bytes(seg))


class PcapWriter:
    """Accumulates pcap records in memory; `take()` returns the bytes to append to a file."""

    def __init__(self, with_header: bool = True) -> None:
        self._buf = bytearray(file_header() if with_header else b"")

    def write_packet(self, ts: float, pkt: bytes) -> None:
        sec = int(ts)
        usec = int(round((ts - sec) * 1e6))
        if usec >= 1_000_000:
            sec, usec = sec + 1, usec - 1_000_000
        self._buf += RECORD_HEADER.pack(sec, usec, len(pkt), len(pkt)) + pkt

    def __len__(self) -> int:
        return len(self._buf)

    def take(self) -> bytes:
        """Hand out the buffered bytes (swapped, so a writer thread may call it safely)."""
        buf, self._buf = self._buf, bytearray()
        return bytes(buf)


class TcpStreamSynth:
    """Synthesized packets of one TCP connection, from its two byte streams."""

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, mss: int = 1460,
                 isn_client: int = 1000, isn_server: int = 5000) -> None:
        self.ends = {Direction.CLIENT_TO_SERVER: (src, dst, sport, dport),
                     Direction.SERVER_TO_CLIENT: (dst, src, dport, sport)}
        self.mss = mss
        # next sequence number each side sends
        self.nxt = {Direction.CLIENT_TO_SERVER: isn_client, Direction.SERVER_TO_CLIENT: isn_server}

    def _pkt(self, d: Direction, flags: int, payload: bytes = b"") -> bytes:
        s, t, sp, dp = self.ends[d]
        ack = self.nxt[d.other] if flags & TCP_ACK else 0
        pkt = tcp_packet(s, t, sp, dp, self.nxt[d], ack, flags, payload)
        self.nxt[d] = (self.nxt[d] + len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)) \
            & 0xFFFFFFFF
        return pkt

    def handshake(self) -> list[bytes]:
        c, s = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
        return [self._pkt(c, TCP_SYN), self._pkt(s, TCP_SYN | TCP_ACK), self._pkt(c, TCP_ACK)]

    def data(self, d: Direction, payload: bytes) -> list[bytes]:
        out = []
        for i in range(0, len(payload), self.mss):
            out.append(self._pkt(d, TCP_ACK | TCP_PSH, payload[i:i + self.mss]))
        return out

    def fin(self, d: Direction) -> list[bytes]:
        return [self._pkt(d, TCP_FIN | TCP_ACK)]

    def rst(self, d: Direction) -> list[bytes]:
        return [self._pkt(d, TCP_RST | TCP_ACK)]


class PcapInspector(Inspector):
    """Records inspected flows (synthesized from the streams) into `pcap_path`."""

    name = "pcap"
    options = (
        Option("pcap_path", text, None, "the pcap file records are appended to ($VARS "
               "expanded)", table=True, required=True),
        Option("pcap_mss", integer(1, 65535), 1460,
               "payload bytes per synthesized segment (kernel backend's streams)"),
        Option("pcap_max_buffer", integer(0, 1 << 40), 64 << 20,
               "bytes buffered between flushes; beyond it a flow's records are cut"),
    )
    observer = True  # only watches (bridge/inspect/api.py)

    def __init__(self, rule: InspectRule) -> None:
        o = rule.options
        self.path = os.path.expandvars(o["pcap_path"])
        self.mss = o["pcap_mss"]
        self.max_buffered = o["pcap_max_buffer"]
        self.writer = PcapWriter(with_header=False)
        self.truncated_flows = 0
        self._header_written = False

    def _write(self, flow: Flow, pkts: list[bytes]) -> None:
        if len(self.writer) > self.max_buffered:
            if not flow.metadata.get("pcap_truncated"):
                flow.metadata["pcap_truncated"] = True
                self.truncated_flows += 1
            return
        for pkt in pkts:
            self.writer.write_packet(flow.last_seen, pkt)

    def flow_start(self, flow: Flow) -> Allow | Deny:
        _, src, dst, sport, dport = flow.key
        synth = flow.state[self] = TcpStreamSynth(src, dst, sport, dport, mss=self.mss)
        self._write(flow, synth.handshake())
        return super().flow_start(flow)

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        synth: TcpStreamSynth | None = flow.state.get(self)
        if synth is not None:
            self._write(flow, synth.data(direction, data))
        return None

    def eof(self, flow: Flow, direction: Direction) -> None:
        synth: TcpStreamSynth | None = flow.state.get(self)
        if synth is not None:
            self._write(flow, synth.fin(direction))
            flow.state[(self, "fin", direction)] = True
        return None

    def flow_end(self, flow: Flow, reason: CloseReason) -> None:
        synth: TcpStreamSynth | None = flow.state.get(self)
        if synth is None:
            return
        if reason is CloseReason.CLOSED:
            return
        side = (Direction.SERVER_TO_CLIENT if reason is CloseReason.SERVER_RESET
                else Direction.CLIENT_TO_SERVER)
        self._write(flow, synth.rst(side))

    def write_packet(self, ts: float, pkt: bytes) -> None:
        """Record a real IP packet (inner packet of the userspace backend, or an outer one)."""
        self.writer.write_packet(ts, pkt)

    write_outer = write_packet

    def flush(self) -> None:
        data = self.writer.take()
        if not self._header_written:
            exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
            data = (b"" if exists else file_header()) + data
            self._header_written = True
        if data:
            with open(self.path, "ab") as f:
                f.write(data)
