"""Send COUNT TCP SYNs at RATE per second from inside a lab namespace (test tooling; root).

    python synflood.py DST DPORT COUNT RATE OWN_ADDR SILENT_PREFIX

Even-numbered SYNs come from OWN_ADDR (the client's own address) on ports 20000-39999 where
nothing listens: the kernel answers the SYN-ACK with a RST (a client giving up half-way).
Odd ones come from SILENT_PREFIX.200-.249 on the same LAN, addresses nobody holds: the
SYN-ACKs find no neighbour (a client silent after its SYN, or a spoofed source). Raw IPv4
socket with our own headers (IPPROTO_RAW implies IP_HDRINCL); the rate is kept per 10 ms
slot. Prints the number sent.
"""

from __future__ import annotations

import random
import socket
import struct
import sys
import time


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def syn(src: bytes, dst: bytes, sport: int, dport: int, isn: int) -> bytes:
    opts = struct.pack("!BBH", 2, 4, 1400)  # MSS
    tcp = struct.pack("!HHIIBBHHH", sport, dport, isn, 0, (5 + 1) << 4, 0x02, 64240, 0, 0) + opts
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), random.getrandbits(16), 0x4000,
                     64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return ip + tcp


def main() -> None:
    dst_s, dport_s, count_s, rate_s, own_s, silent_s = sys.argv[1:7]
    dst = socket.inet_aton(dst_s)
    own = socket.inet_aton(own_s)
    base = silent_s.rsplit(".", 1)[0]
    count, rate, dport = int(count_s), float(rate_s), int(dport_s)
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    per_slot = max(1, int(rate / 100))
    t0 = time.monotonic()
    sent = 0
    while sent < count:
        for _ in range(min(per_slot, count - sent)):
            if sent % 2 == 0:
                src, sport = own, 20000 + (sent // 2) % 20000
            else:
                src = socket.inet_aton(f"{base}.{200 + (sent // 2) % 50}")
                sport = 1024 + (sent // 2) % 60000
            s.sendto(syn(src, dst, sport, dport, random.getrandbits(32)), (dst_s, 0))
            sent += 1
        wait = t0 + sent / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    print(sent)


if __name__ == "__main__":
    main()
