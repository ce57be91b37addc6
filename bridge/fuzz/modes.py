"""Fuzz the receive path of every mode: `python -m bridge.fuzz --inputs N [--mode M]
[--seed S]` (M: plain, authenticated, encrypted, all (default) or both (the secure two);
plain mode is bridge/fuzz/plain.py's).

Rules (what counts as a finding):
- An exception escaping `receive_datagram` (the rule: nothing a peer sends raises).
- A policy violation: a hostile input that delivers a payload (every input here is random,
  mutated, or a replay of something already delivered, so none may deliver); a legitimate
  datagram, sent between the hostile ones, that does not deliver (the attack cost real
  traffic); the peer's endpoint moving to an address only hostile inputs came from; a
  PeerRestarted event after the first start (neither side restarts here).
Exit status 1 if there was any finding, so a script can run it.

Theory of operation: two endpoints in one process (`make_pair`) complete a handshake; the
simulated clock advances 1 ms per input, so rekeys, cookie secret rotation and keypair expiry
happen during a long run; keys live 15 s (rekey every 5 s) so that handshakes are frequent,
and for a quarter of the run the responder is forced under load (cookie replies). The
corpus is every datagram the two exchanged (handshakes, keepalives, transport). Each input
is one of: random bytes, a corpus entry with bit flips, byte overwrites, truncation,
extension or a far-ahead counter, a verbatim replay, or a splice of two entries; its source
is the real peer's address or a random one, and it goes to either endpoint. Every
LEGIT_EVERY inputs the real peers exchange a fresh datagram each way. Not run in CI beyond
a tiny N (tests/unit/secure/test_secure_fuzz.py).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from bridge.fuzz.plain import mutate
from bridge.secure.endpoint import SecureEndpoint
from bridge.secure.keys import PeerSecurity, PeerSpec, SecurityMode
from bridge.secure.limits import Limits
from bridge.secure.noise import public_bytes

__all__ = ["make_pair", "fuzz", "main", "ADDR_A", "ADDR_B"]

ADDR_A = ("198.18.0.1", 24754)
ADDR_B = ("198.18.0.2", 24754)
LEGIT_EVERY = 50
CORPUS_MAX = 512
WALL = 1.8e9


def _raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def make_pair(mode: SecurityMode, now: float = 0.0, limits: Limits | None = None,
              ) -> tuple[SecureEndpoint, SecureEndpoint, list[tuple[int, bytes]]]:
    """Two endpoints with a session up; returns (a, b, [(to 0=a/1=b, datagram), ...])."""
    ka, kb = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    a = SecureEndpoint([PeerSpec(0, "b", PeerSecurity(mode, (_raw(ka),), (public_bytes(kb),)),
                                 ADDR_B)], now, wall_offset=WALL, limits=limits)
    b = SecureEndpoint([PeerSpec(0, "a", PeerSecurity(mode, (_raw(kb),), (public_bytes(ka),)),
                                 ADDR_A)], now, wall_offset=WALL, limits=limits)
    log: list[tuple[int, bytes]] = []
    a.handle_timer(now)
    b.handle_timer(now)
    exchange(a, b, now, log)
    return a, b, log


def exchange(a: SecureEndpoint, b: SecureEndpoint, now: float,
             log: list[tuple[int, bytes]] | None = None) -> int:
    """Run timers and move queued datagrams between a and b until quiet; return deliveries."""
    delivered = 0
    for _ in range(10):
        moved = 0
        for ep in (a, b):
            t = ep.get_timer()
            if t is not None and t <= now:
                ep.handle_timer(now)
        for src, dst, to, addr in ((a, b, 1, ADDR_A), (b, a, 0, ADDR_B)):
            for data, _dest in src.datagrams_to_send(now):
                moved += 1
                if log is not None:
                    log.append((to, bytes(data)))
                if dst.receive_datagram(data, addr, now) is not None:
                    delivered += 1
        if not moved:
            break
    return delivered


def fuzz(inputs: int, mode: SecurityMode, seed: int = 0, limits: Limits | None = None,
         ) -> dict[str, Any]:
    """Run the fuzzer; returns the report (see module docstring)."""
    rnd = random.Random(seed)
    # short key lifetimes: a handshake every 5 simulated seconds (5000 inputs) feeds the
    # corpus with initiations, responses and (under forced load) cookie replies
    a, b, corpus = make_pair(mode, 0.0, limits or Limits(rekey_after_time=5.0,
                                                          reject_after_time=15.0))
    eps = (a, b)
    exceptions = 0
    violations: list[str] = []
    first_trace = ""
    legit_sent = legit_lost = 0
    start = time.perf_counter()
    now = 0.0
    for i in range(inputs):
        now += 0.001
        if i % LEGIT_EVERY == 0:
            b.force_load = (i // 5000) % 4 == 3  # a quarter of the time: cookies required
            exchange(a, b, now, corpus)
            for src, dst, addr, tag in ((a, b, ADDR_A, 1), (b, a, ADDR_B, 0)):
                payload = b"legit %d" % i
                dgram = src.seal(0, payload, now)
                if dgram is None:
                    exchange(a, b, now, corpus)  # staged: flushed by the handshake
                    continue
                legit_sent += 1
                corpus.append((tag, bytes(dgram)))
                res = dst.receive_datagram(dgram, addr, now)
                if res is None or bytes(res[1]) != payload:
                    legit_lost += 1
                    violations.append(f"input {i}: legitimate datagram not delivered")
            if len(corpus) > CORPUS_MAX:  # a few key generations: most entries still
                del corpus[: len(corpus) - CORPUS_MAX]  # reach a live keypair
        to, data = mutate(rnd, corpus)
        addr = (ADDR_A, ADDR_B)[1 - to] if rnd.random() < 0.7 else (
            f"198.19.{rnd.randrange(256)}.{rnd.randrange(256)}", rnd.randrange(1, 65536))
        ep = eps[to]
        try:
            res = ep.receive_datagram(data, addr, now)
        except Exception:
            exceptions += 1
            if not first_trace:
                first_trace = traceback.format_exc()
            continue
        if res is not None:
            violations.append(f"input {i}: hostile input delivered {len(res[1])} bytes")
        ep.datagrams_to_send(now)  # answers to hostile handshakes go nowhere
        real = (ADDR_A, ADDR_B)[1 - to]
        if ep.endpoint(0) not in (real, None):
            violations.append(f"input {i}: endpoint moved to {ep.endpoint(0)}")
            ep.peers[0].endpoint = real
    secs = time.perf_counter() - start
    restarts = a.events["peer_restarted"] + b.events["peer_restarted"]
    if restarts != 2:  # one per side at the first start; a hostile input faked one
        violations.append(f"peer_restarted {restarts} times (expected 2: the first start)")
    drops: dict[str, int] = {}
    events: dict[str, int] = {}
    for ep in eps:
        for k, v in ep.drops.items():
            drops[k] = drops.get(k, 0) + v
        for k, v in ep.events.items():
            events[k] = events.get(k, 0) + v
    return {"mode": mode.value, "inputs": inputs, "seconds": round(secs, 3),
            "inputs_per_s": round(inputs / secs) if secs else 0, "exceptions": exceptions,
            "violations": len(violations), "violation_examples": violations[:5],
            "legit_sent": legit_sent, "legit_lost": legit_lost,
            "drops": {k: v for k, v in drops.items() if v},
            "events": {k: v for k, v in events.items() if v}, "first_exception": first_trace}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bridge.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs per mode")
    ap.add_argument("--mode", choices=("plain", "authenticated", "encrypted", "all", "both"),
                    default="all", help="all: every mode; both: the two secure ones")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    names = {"all": ["plain", "authenticated", "encrypted"],
             "both": ["authenticated", "encrypted"]}.get(args.mode, [args.mode])
    bad = False
    for name in names:
        if name == "plain":  # bridge/fuzz/plain.py: the Bridge's plain receive path
            from bridge.fuzz.plain import fuzz_plain

            r = fuzz_plain(args.inputs, args.seed)
        else:
            r = fuzz(args.inputs, SecurityMode(name), args.seed)
        print(f"{r['mode']}: {r['inputs']} inputs in {r['seconds']} s = {r['inputs_per_s']}/s;"
              f" exceptions {r['exceptions']}, policy violations {r['violations']};"
              f" legitimate {r['legit_sent']} sent, {r['legit_lost']} lost")
        print(f"  drops: {r['drops']}")
        print(f"  events: {r['events']}")
        for v in r["violation_examples"]:
            print(f"  violation: {v}")
        if r["first_exception"]:
            print(r["first_exception"])
        bad = bad or bool(r["exceptions"] or r["violations"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
