"""pcap writer and stream synthesizer, checked by reading the file back with scapy and tshark."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from helpers_inspect import flow, rule

from bridge.inspect.api import C2S, S2C, CloseReason
from bridge.inspect.manager import InspectorManager
from bridge.inspect.pcap import PcapWriter, udp_packet

REQ = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
BODY = bytes(range(256)) * 20       # 5120 bytes: several 1460-byte segments


def make_pcap(tmp_path, v6: bool = False, reason=CloseReason.CLOSED):  # type: ignore[no-untyped-def]
    path = tmp_path / "x.pcap"
    m = InspectorManager([rule(f'inspectors=["pcap"]\npcap_path="{path}"')])
    chain = m.chain("r")
    f = flow(src="2001:db8:1::10", dst="2001:db8:2::10") if v6 else flow()
    chain.start(f)
    f.last_seen += 0.001
    chain.data(f, C2S, REQ)
    f.last_seen += 0.001
    chain.data(f, S2C, BODY)
    if reason is CloseReason.CLOSED:
        chain.eof(f, S2C)
        chain.eof(f, C2S)
    chain.end(f, reason)
    m.flush()
    # outer datagram written by the loop, into the same file
    pc = chain.inspectors[0]
    pc.write_outer(f.last_seen, udp_packet("198.18.0.1", "198.18.0.2", 50000, 4754, b"\x00" * 12))
    m.close()
    return path


@pytest.mark.parametrize("v6", [False, True])
def test_scapy_reads_valid_packets_with_consistent_seq_ack(tmp_path, v6) -> None:  # type: ignore[no-untyped-def]
    from scapy.all import IP, TCP, UDP, IPv6, rdpcap

    pkts = rdpcap(str(make_pcap(tmp_path, v6)))
    tcp = [p for p in pkts if TCP in p]
    assert [p[TCP].flags for p in tcp[:3]] == ["S", "SA", "A"]
    ip = IPv6 if v6 else IP
    for p in tcp:      # checksums: rebuild with scapy and compare
        fresh = p.__class__(bytes(p))
        del fresh[TCP].chksum
        if not v6:
            del fresh[IP].chksum
        fresh = ip(bytes(fresh))
        assert fresh[TCP].chksum == p[TCP].chksum
    syn, synack = tcp[0][TCP], tcp[1][TCP]
    assert synack.ack == syn.seq + 1
    client_data = b"".join(bytes(p[TCP].payload) for p in tcp if p[TCP].sport == 40000)
    server_data = b"".join(bytes(p[TCP].payload) for p in tcp if p[TCP].sport == 80)
    assert client_data == REQ and server_data == BODY
    # every server segment starts where the previous ended
    nxt = synack.seq + 1
    for p in tcp[3:]:
        if p[TCP].sport == 80 and len(p[TCP].payload):
            assert p[TCP].seq == nxt
            assert p[TCP].ack == syn.seq + 1 + len(REQ)
            nxt += len(p[TCP].payload)
    assert any(p[TCP].flags == "FA" for p in tcp)
    assert UDP in pkts[-1] and pkts[-1][UDP].dport == 4754


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_follows_the_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = make_pcap(tmp_path)
    out = subprocess.run(["tshark", "-r", str(path), "-q", "-z", "follow,tcp,raw,0"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    hexdata = "".join(line.strip() for line in out.splitlines()
                      if line.strip() and all(c in "0123456789abcdef" for c in line.strip()))
    assert REQ.hex() in hexdata and BODY[:1000].hex() in hexdata
    # no analysis complaints about the synthesized sequence numbers
    warn = subprocess.run(["tshark", "-r", str(path), "-Y",
                           "tcp.analysis.flags && !tcp.analysis.window_update"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert warn.strip() == ""


def test_reset_flow_ends_with_rst(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scapy.all import TCP, rdpcap

    pkts = rdpcap(str(make_pcap(tmp_path, reason=CloseReason.SERVER_RESET)))
    last_tcp = [p for p in pkts if TCP in p][-1]
    assert "R" in str(last_tcp[TCP].flags) and last_tcp[TCP].sport == 80


def test_writer_header_and_timestamps() -> None:
    w = PcapWriter()
    w.write_packet(1.9999999, b"\x45" + bytes(19))
    raw = w.take()
    assert raw[:4] == bytes.fromhex("d4c3b2a1") and len(raw) == 24 + 16 + 20
    assert int.from_bytes(raw[24:28], "little") == 2 and raw[28:32] == bytes(4)
    assert w.take() == b""
