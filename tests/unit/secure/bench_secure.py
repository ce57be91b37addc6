"""Micro-benchmark of the secure layer: µs per datagram to seal and open, per 64 KB batch.

    .venv/bin/python tests/unit/secure/bench_secure.py [--packets N] [--size BYTES]

Rows, all measured in this run on `--size`-byte payloads (1400: a GRE datagram of a
full-size inner packet):
- anchors: `copy` (bytearray of the sealed size, the least any sealer does) and `aesgcm`
  (one bare AESGCM.encrypt from `cryptography`, the primitive's floor);
- `seal` / `open` per datagram (`SecureEndpoint.seal`, `receive_datagram`), per mode;
- `seal_batch` of a 64 KB run (the UdpRun a TSO frame becomes: 46 datagrams of 1400) and the
  open of every datagram in it, per batch and per datagram.
Each row prints µs of CPU per datagram (process time, best of 3), the ratio to the aesgcm
anchor, and the in-process ceiling in Mb/s of payload (8 * size / µs): what one core could
seal or open if it did nothing else. No assertions on time: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bridge.fuzz.modes import ADDR_A, make_pair
from bridge.secure import OVERHEAD, SecurityMode

BATCH = 65536
NOW = 1.0


def _time(fn: Callable[[], object], reps: int) -> float:
    """µs of CPU per call, best of 3 (process time: on 2 cores shared by several agents,
    wall time mostly measures the neighbours)."""
    best = float("inf")
    for _ in range(3):
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        best = min(best, time.process_time() - t0)
    return best / reps * 1e6


def _mode_rows(mode: SecurityMode, payload: bytes, packets: int) -> list[tuple[str, float]]:
    size = len(payload)
    a, b, _ = make_pair(mode)
    name = mode.value[:4] + "."
    rows = [(name + "seal", _time(lambda: a.seal(0, payload, NOW), packets))]
    it = iter([bytes(a.seal(0, payload, NOW) or b"") for _ in range(packets * 3)])
    rows.append((name + "open", _time(lambda: b.receive_datagram(next(it), ADDR_A, NOW),
                                      packets)))
    per = max(1, BATCH // size)
    run_buf = payload * per
    reps = max(1, packets // per)
    us = _time(lambda: a.seal_batch(0, run_buf, size, NOW), reps)
    rows.append((f"{name}seal_batch/{per}", us / per))
    fresh = []
    for _ in range(reps * 3):
        r = a.seal_batch(0, run_buf, size, NOW)
        assert r is not None
        fresh.append([bytes(r[0][o:o + r[1]]) for o in range(0, len(r[0]), r[1])])
    fit = iter(fresh)

    def open_batch() -> None:
        recv = b.receive_datagram
        for d in next(fit):
            recv(d, ADDR_A, NOW)

    rows.append((f"{name}open_batch/{per}", _time(open_batch, reps) / per))
    assert b.drops["bad_mac"] == 0 and b.drops["replay"] == 0, b.drops
    return rows


def run(packets: int, size: int) -> list[tuple[str, float]]:
    """[(row name, µs per datagram)]; batch rows are per datagram too (count in the name)."""
    payload = os.urandom(size)
    rows: list[tuple[str, float]] = []
    rows.append(("copy", _time(lambda: bytearray(size + OVERHEAD), packets)))
    aead = AESGCM(os.urandom(32))
    nonce = bytes(12)
    rows.append(("aesgcm", _time(lambda: aead.encrypt(nonce, payload, b""), packets)))
    for mode in (SecurityMode.AUTHENTICATED, SecurityMode.ENCRYPTED):
        rows += _mode_rows(mode, payload, packets)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=20000)
    ap.add_argument("--size", type=int, default=1400)
    args = ap.parse_args(argv)
    rows = run(args.packets, args.size)
    anchor = dict(rows)["aesgcm"]
    print(f"{'row':<22}{'us/datagram':>12}{'x aesgcm':>10}{'Mb/s ceiling':>14}")
    for name, us in rows:
        print(f"{name:<22}{us:>12.2f}{us / anchor:>10.2f}{8 * args.size / us:>14.0f}")
    per = max(1, BATCH // args.size)
    for name, us in rows:
        if "batch" in name:
            print(f"{name:<22} {us * per:.1f} us per 64 KB batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
