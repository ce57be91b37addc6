"""offload.coalesce and a local eBPF sender's packets: a TCP packet written alone whose
checksum field holds only the pseudo-header sum goes to the TUN with NEEDS_CSUM, and one
above the TUN's MTU (an unsegmented TSO super-packet) also with TCP GSO; packets with a
complete checksum, or a damaged one, keep the empty vnet header (docs/DESIGN.md, "The
inspected-flow stall")."""

from __future__ import annotations

import os
import struct

from bridge.io.offload import coalesce
from stack.wire.checksum import checksum, pseudo_sum_v4, pseudo_sum_v6
from stack.wire.vnet import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET, VNET_NONE

SRC4, DST4 = bytes([198, 18, 2, 10]), bytes([198, 18, 1, 10])
SRC6, DST6 = bytes.fromhex("20010db8000200000000000000000010"), \
    bytes.fromhex("20010db8000100000000000000000010")


def tcp_packet(payload: bytes, v6: bool = False, flags: int = 0x10, seq: int = 1000,
               state: str = "complete") -> bytes:
    tcp = bytearray(struct.pack("!HHIIBBHHH", 80, 40000, seq, 1, 5 << 4, flags, 512, 0, 0))
    tcp += payload
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    ps = (pseudo_sum_v6 if v6 else pseudo_sum_v4)(src, dst, 6, len(tcp))
    if state == "complete":
        tcp[16:18] = checksum(tcp, ps).to_bytes(2, "big")
    elif state == "partial":
        tcp[16:18] = ps.to_bytes(2, "big")
    else:
        tcp[16:18] = ((ps + 7) % 0xFFFF).to_bytes(2, "big")
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst)
    else:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6,
                                   0, src, dst))
        ip[10:12] = checksum(ip).to_bytes(2, "big")
    return bytes(ip) + bytes(tcp)


def test_a_partial_checksum_alone_is_left_to_the_kernel() -> None:
    for v6 in (False, True):
        ihl = 40 if v6 else 20
        for flags in (0x10, 0x11, 0x02):  # ACK, FIN (never grouped), SYN
            p = tcp_packet(os.urandom(100), v6, flags, state="partial")
            out: list[bytes] = []
            coalesce([p], out, 1400)
            assert out == [VNET.pack(F_NEEDS_CSUM, GSO_NONE, ihl + 20, 0, ihl, 16) + p]


def test_a_partial_super_packet_is_segmented_by_the_kernel_at_the_tun_mtu() -> None:
    for v6, gso in ((False, GSO_TCPV4), (True, GSO_TCPV6)):
        ihl = 40 if v6 else 20
        p = tcp_packet(os.urandom(7000), v6, state="partial")
        out: list[bytes] = []
        coalesce([p], out, 1400)
        assert out == [VNET.pack(F_NEEDS_CSUM, gso, ihl + 20, 1400 - ihl - 20, ihl, 16) + p]


def test_complete_and_damaged_checksums_keep_the_plain_header() -> None:
    for state in ("complete", "damaged"):
        p = tcp_packet(os.urandom(7000), state=state)
        out: list[bytes] = []
        coalesce([p], out, 1400)
        assert out == [VNET_NONE + p]


def test_a_run_of_partial_segments_fails_the_group_check_and_goes_one_by_one() -> None:
    pkts = [tcp_packet(os.urandom(1000), seq=1000 + 1000 * i, state="partial")
            for i in range(4)]
    out: list[bytes] = []
    coalesce(pkts, out, 1400)
    assert out == [VNET.pack(F_NEEDS_CSUM, GSO_NONE, 40, 0, 20, 16) + p for p in pkts]
    good = [tcp_packet(os.urandom(1000), seq=1000 + 1000 * i) for i in range(4)]
    out = []
    coalesce(good, out, 1400)
    assert len(out) == 1 and out[0][1] == GSO_TCPV4  # merged as before
