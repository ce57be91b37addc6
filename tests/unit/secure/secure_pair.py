"""Two SecureEndpoints joined by an in-memory wire that records every datagram.

Name: Pair / Scope: per test / Depends: bridge.secure only (no sockets, no clock).
`pair.pump(now)` runs timers and moves datagrams both ways until nothing is left;
`pair.wire` holds every (destination side, datagram, source address) ever sent, so a test
can replay any of them; `pair.got[side]` holds every inner payload delivered (keepalives
excluded). `pair.restart(side, now)` replaces one side by a fresh endpoint with the same
keys, as a killed and restarted process would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.secure import Limits, PeerSecurity, PeerSpec, SecureEndpoint, SecurityMode
from bridge.secure.keys import decode_key, genkey

ADDR = {"a": ("198.18.0.1", 24754), "b": ("198.18.0.2", 24754)}
OTHER = {"a": "b", "b": "a"}
WALL = 1.8e9  # UNIX time at now = 0


def keypair() -> tuple[bytes, bytes]:
    priv, pub = genkey()
    a, b = decode_key(priv), decode_key(pub)
    assert a is not None and b is not None
    return a, b


@dataclass
class Keys:
    priv: dict[str, tuple[bytes, ...]]
    pub: dict[str, tuple[bytes, ...]]
    psk: dict[str, tuple[bytes, ...]] = field(default_factory=lambda: {"a": (), "b": ()})


def make_keys(psk: bytes | None = None) -> Keys:
    sa, pa = keypair()
    sb, pb = keypair()
    k = Keys({"a": (sa,), "b": (sb,)}, {"a": (pa,), "b": (pb,)})
    if psk is not None:
        k.psk = {"a": (psk,), "b": (psk,)}
    return k


class Pair:
    def __init__(self, mode: SecurityMode = SecurityMode.ENCRYPTED, *, keys: Keys | None = None,
                 limits: Limits | None = None, known: tuple[str, ...] = ("a", "b"),
                 now: float = 0.0, modes: dict[str, SecurityMode] | None = None) -> None:
        self.keys = keys or make_keys()
        self.limits = limits or Limits()
        self.known = known  # sides that have the other's address configured
        self.modes = modes or {"a": mode, "b": mode}
        self.ep: dict[str, SecureEndpoint] = {}
        self.wire: list[tuple[str, bytes, tuple[str, int]]] = []
        self.got: dict[str, list[bytes]] = {"a": [], "b": []}
        self.keepalives = {"a": 0, "b": 0}
        for side in ("a", "b"):
            self.ep[side] = self.build(side, now)

    def spec(self, side: str) -> PeerSpec:
        other = OTHER[side]
        sec = PeerSecurity(self.modes[side], self.keys.priv[side], self.keys.pub[other],
                           self.keys.psk[side])
        return PeerSpec(0, other, sec, ADDR[other] if side in self.known else None)

    def build(self, side: str, now: float) -> SecureEndpoint:
        return SecureEndpoint([self.spec(side)], now, wall_offset=WALL, limits=self.limits)

    def restart(self, side: str, now: float) -> None:
        self.ep[side] = self.build(side, now)

    def deliver(self, to: str, data: bytes, now: float, src: tuple[str, int] | None = None,
                record: bool = True) -> bool:
        """Hand one datagram to `to`; True if it delivered an inner payload or keepalive."""
        src = src or ADDR[OTHER[to]]
        if record:
            self.wire.append((to, bytes(data), src))
        res = self.ep[to].receive_datagram(data, src, now)
        if res is None:
            return False
        _, payload = res
        if len(payload):
            self.got[to].append(bytes(payload))
        else:
            self.keepalives[to] += 1
        return True

    def flush(self, side: str, now: float) -> int:
        """Move what `side` wants to send to the other side; return how many."""
        out = self.ep[side].datagrams_to_send(now)
        for data, dest in out:
            to = "a" if dest == ADDR["a"] else "b" if dest == ADDR["b"] else None
            if to is not None and to != side:
                self.deliver(to, bytes(data), now, src=ADDR[side])
        return len(out)

    def pump(self, now: float, rounds: int = 1000) -> None:
        """Run every timer due by `now` at its own deadline, in order (as an event loop
        would), moving datagrams after each; then move what is left at `now`."""
        for _ in range(rounds):
            due = [(t, side) for side in ("a", "b")
                   if (t := self.ep[side].get_timer()) is not None and t <= now]
            if due:
                t, side = min(due)
                self.ep[side].handle_timer(t)
                while self.flush("a", t) + self.flush("b", t):
                    pass
                continue
            if not (self.flush("a", now) + self.flush("b", now)):
                return

    def send(self, side: str, payload: bytes, now: float) -> bool:
        """Seal `payload` at `side` and deliver it (or stage it); True if sealed now."""
        ep = self.ep[side]
        dgram = ep.seal(0, payload, now)
        if dgram is None:
            self.pump(now)
            return False
        dest = ep.endpoint(0)
        assert dest == ADDR[OTHER[side]]
        self.deliver(OTHER[side], bytes(dgram), now, src=ADDR[side])
        return True

    def up(self, now: float = 0.0) -> None:
        self.pump(now)
        assert self.ep["a"].peers[0].current is not None
        assert self.ep["b"].peers[0].current is not None
