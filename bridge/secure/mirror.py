"""Mirror: the receive keys of a SecureEndpoint, handed to a process that only receives.

Why: with `split_directions` (bridge/io/split.py) an endpoint's UDP->TUN direction runs in a
child process, so that each direction has its own interpreter lock and core. For secure
peers that direction is mostly one AEAD open per datagram. WireGuard separates the same
way: the handshake is one job, the data path (decrypt, replay window) another, and the
handshake hands the data path a keypair (wireguard-go device/noise-protocol.go,
`BeginSymmetricSession`; the receive path only looks keypairs up by index).

Rules:
- The parent (authority) keeps the whole SecureEndpoint: handshakes, cookies, send keys
  and counters, timers, staging, rekeying. The child (mirror) holds, per secure peer, only
  what receiving needs: each keypair's receiver index, receive key, mode, expiry, slot
  (current, next or retired) and its replay window (RFC 6479). Send keys never cross.
- A keypair crosses *before* the datagram that lets the peer use it leaves the parent
  (`export` runs at the end of every core call, before the I/O layer sends its Output):
  the responder's response, the initiator's first datagram after a response. So the
  child never sees a transport datagram for a keypair it has not been given, as long as
  it applies what is waiting on the channel before it opens a batch.
- A replay window lives in one process only: the child's. The parent never opens a
  transport datagram while split (the child forwards only handshake messages), so no
  counter is accepted twice across the two processes.
- The child only moves forward: `apply` never demotes a keypair the child confirmed
  (`next` -> current on its first datagram) back to `next`; it reports the confirmation,
  and any verified roaming, to the parent (bridge/securelink.py), which switches its send
  keypair (or endpoint) as the whole endpoint would have.
- PeerRestarted for an initiator happens in the parent (the response verified); `export`
  carries it as a `reset` flag, applied before the child opens anything on the new keys.

- The parent's timers need what the child hears: `rx_times` (child) and `note_child`
  (parent) carry when each peer last verified and first sent data, so keepalives answer
  data and the silence timer (a new handshake when nothing verifies) stops.

Theory of operation: `signature(p)` is the receiver indices of a peer's keypairs by slot;
`export(ep, seen, resets)` returns the peers whose signature changed since `seen` (updated)
as plain tuples, `apply(ep, peers)` installs them in the child's SecureEndpoint, keeping the
Keypair (and window) of every index it already holds.
"""

from __future__ import annotations

from bridge.secure.endpoint import SecureEndpoint
from bridge.secure.session import Keypair, PeerSession

__all__ = ["signature", "export", "apply", "confirm", "roam_to", "rx_times", "note_child",
           "KeyRow", "PeerKeys"]

_INF = float("inf")

# (receiver index, receive key, message type, created, expires, slot, peer_fresh); slot
# "c" current, "n" next, "r" retired
KeyRow = tuple[int, bytes, int, float, float, str, bool]
PeerKeys = tuple[int, tuple[KeyRow, ...], bool]  # (peer index, keypairs, reset sequence)
Sig = tuple[int, int, tuple[int, ...]]


def signature(p: PeerSession) -> Sig:
    cur, nxt = p.current, p.next
    return (cur.local if cur is not None else -1, nxt.local if nxt is not None else -1,
            tuple(k.local for k in p.retired))


def export(ep: SecureEndpoint, seen: dict[int, Sig], resets: set[int]) -> list[PeerKeys]:
    """The keysets that changed since `seen` (which is updated), plus every peer in
    `resets` (cleared): what the child must apply."""
    got: list[PeerKeys] = []
    for i, p in ep.peers.items():
        sig = signature(p)
        if seen.get(i) == sig and i not in resets:
            continue
        seen[i] = sig
        rows: list[KeyRow] = []
        for slot, kps in (("c", (p.current,)), ("n", (p.next,)), ("r", tuple(p.retired))):
            for kp in kps:
                if kp is not None:
                    rows.append((kp.local, kp.recv_key, kp.msg_type, kp.created, kp.expires,
                                 slot, kp.peer_fresh))
        got.append((i, tuple(rows), i in resets))
    resets.clear()
    return got


def apply(ep: SecureEndpoint, peers: list[PeerKeys]) -> list[int]:
    """Install keysets from the parent in the child's endpoint; returns the peers whose
    sequence receiver must be reset (an initiator saw the peer restart)."""
    reset: list[int] = []
    for i, rows, r in peers:
        p = ep.peers.get(i)
        if p is None:
            continue
        have = {kp.local: kp for kp in p.keypairs()}  # reused: their windows go on
        mine = p.current  # confirmed here perhaps before the parent knew
        cur: Keypair | None = None
        nxt: Keypair | None = None
        retired: list[Keypair] = []
        for local, key, msg_type, created, expires, slot, fresh in rows:
            kp = have.pop(local, None)
            if kp is None:
                kp = Keypair(key, key, local, 0, created, False, msg_type, expires)
                kp.peer_fresh = fresh
            if slot == "c":
                cur = kp
            elif slot == "n":
                nxt = kp
            else:
                retired.append(kp)
        if mine is not None and nxt is mine:  # never demote what the child confirmed
            if cur is not None:
                retired.append(cur)
            cur, nxt = mine, None
        ep.set_keypairs(p, cur, nxt, retired)  # what the parent dropped is forgotten
        if r:
            reset.append(i)
    return reset


def confirm(ep: SecureEndpoint, i: int, local: int, now: float) -> bool:
    """The parent's side of a confirmation the child saw (the first datagram under `next`):
    switch the send keypair and seal what was staged, as `SecureEndpoint` does on receive.
    The child counted the event and reset its sequence receiver; nothing is counted here."""
    p = ep.peers.get(i)
    kp = p.next if p is not None else None
    if p is None or kp is None or kp.local != local:
        return False
    ep.retire(p, p.current)
    p.current = kp
    p.next = None
    p.fresh = False
    ep.flush(p, now)
    return True


def roam_to(ep: SecureEndpoint, i: int, addr: tuple[str, int]) -> None:
    """The child verified a datagram of peer `i` from `addr`: send there (counted there)."""
    p = ep.peers.get(i)
    if p is not None:
        p.endpoint = addr


def rx_times(ep: SecureEndpoint) -> list[tuple[int, float, float]]:
    """Child: per secure peer (index, when a datagram last verified, when data first
    verified since the last call or -inf). The child's keepalive clock is only a marker
    here: armed by data (a keepalive does not arm it), read and disarmed."""
    got = []
    for i, p in ep.peers.items():
        data = -_INF
        if p.keepalive_at != _INF:
            data = p.keepalive_at - ep.limits.keepalive_after
            p.keepalive_at = _INF
        got.append((i, p.last_rx, data))
    return got


def note_child(ep: SecureEndpoint, data_seen: dict[int, float], i: int, last: float,
               data: float) -> None:
    """Parent: the child's `rx_times` for peer i, applied as if received here: heard (the
    silence timer stops if it started before), and data answered with a keepalive unless
    we send first (`data_seen`: the data times already applied)."""
    p = ep.peers.get(i)
    if p is None:
        return
    if last > p.last_rx:
        p.last_rx = last
        if last >= p.unanswered_at:
            p.unanswered_at = _INF
    if data > data_seen.get(i, -_INF):
        data_seen[i] = data
        if p.keepalive_at == _INF:
            p.keepalive_at = data + ep.limits.keepalive_after
