"""Hot reload of a running Bridge: peers added, removed or changed, [[inspect]] rules.

Rules of this module
- `reconfigure(bridge, config, now)` makes the running Bridge behave as if built from
  `config`, keeping every state the change does not concern: a peer whose wire identity is
  unchanged (`same_wire`: endpoint, encapsulation, keys, sequence, checksum, source port,
  security; a host name only by the address it resolves to) keeps its PeerState object:
  GRE sequence numbers (RFC 2890 §2.2: a receiver that saw its sender restart numbering
  would drop until it resynchronises), reorder buffer, liveness, learned path MTU, counters.
  Its prefixes and its keepalive, dead_after and down_action are taken in place. A peer
  whose wire identity changed starts afresh, as at start-up (new encoder, sequence from 0,
  liveness clock from `now`); its counters stay (counters are per peer name). Removed peers
  go, with their counters.
- Peers are renumbered to the new order; the counters' per-peer lists, the peer table
  (longest-prefix match, AllowedIPs, loop guard) and the fast paths follow. The list
  `bridge.peers` is changed in place: the SecureLink and the split child's closures hold it.
- Secure peers (bridge/securelink.py, bridge/secure/endpoint.py: sessions keyed by peer
  index) follow the same rule: an unchanged secure peer keeps its PeerSession (keys of the
  current session, replay window, roamed endpoint), renumbered; a new or changed one gets
  a fresh PeerSession and handshakes (as at start-up); a removed one's session and its
  receiver indices go. `needs_secure_socket(old, new)`: the first secure peer of an
  endpoint that had none needs the secure UDP socket, a restart (bridge/reload.py).
- Userspace [[inspect]] rules: new SYNs follow the new rules, flows already terminated
  keep their decision and their inspector chain (`set_rules`): an unchanged rule keeps its
  chain, a new or changed one gets a new chain (its inspectors loaded again), a retired
  chain is flushed and stays, named "NAME~N", until the endpoint closes it. A Bridge built
  without a terminator cannot grow one (the I/O layer orders TUN writes and runs one
  process only with one), so `needs_terminator(old, new)` is the caller's restart case.
- Pure: no I/O. The routes into the TUN and the TUN MTU are the I/O layer's
  (bridge/io/live.py), from the returned `Reconfigured`.

Theory of operation: build the new PeerState list by name (kept objects re-indexed, new
ones from bridge/peers.py `new_state`, the one constructor Bridge.__init__ uses too), swap
the counters' per-peer lists, rebuild the PeerTable over the new list, point the fast path
at it, then the selector of uncovered packets and the terminator's rules. Called with the
I/O layer's lock held, so no packet sees a half-built Bridge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from bridge.config import Config, DownAction, PeerConfig
from bridge.flows import Backend
from bridge.peers import PeerState, PeerTable, new_state, secure_key
from bridge.pipeline import Bridge

if TYPE_CHECKING:
    from bridge.flows import InspectRule
    from bridge.securelink import SecureLink
    from bridge.userspace.terminator import Terminator

__all__ = ["Reconfigured", "reconfigure", "same_wire", "needs_secure_socket",
           "needs_terminator", "set_rules"]

_LIVE_FIELDS = {"prefixes": (), "keepalive": 0.0, "dead_after": 0.0,
                "down_action": DownAction.NONE, "hostname": None}  # the address is `host`


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """What `reconfigure` did, by peer name, and the TUN MTU now wanted."""

    kept: tuple[str, ...]
    renewed: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    tun_mtu: int


def _wire(p: PeerConfig) -> PeerConfig:
    return replace(p, **_LIVE_FIELDS)  # type: ignore[arg-type]


def same_wire(a: PeerConfig, b: PeerConfig) -> bool:
    """True when `a` and `b` differ at most in prefixes and liveness (kept state)."""
    return _wire(a) == _wire(b)


def needs_secure_socket(old: Config, new: Config) -> bool:
    """`new` has secure peers and `old` (what the endpoint was started with) none."""
    return any(p.secure for p in new.peers) and not any(p.secure for p in old.peers)


def _userspace(c: Config) -> bool:
    return any(r.backend is Backend.USERSPACE for r in c.inspect_rules())


def needs_terminator(old: Config, new: Config) -> bool:
    """`new` has userspace [[inspect]] rules and `old` (what the Bridge was built from) none."""
    return _userspace(new) and not _userspace(old)


def reconfigure(bridge: Bridge, new: Config, now: float) -> Reconfigured:
    """Apply `new`'s peers, [[inspect]] rules and mss_clamp to the running `bridge` (module
    docstring). Raises ValueError, touching nothing, for what needs a restart."""
    old = bridge.config
    if bridge.secure is None and any(p.secure for p in new.peers):
        raise ValueError("the first secure peer: restart to apply (the secure socket)")
    pubs = [k for p in new.peers if p.secure for k in p.security.public_keys]
    if len(pubs) != len(set(pubs)):
        raise ValueError("a public key used by two secure peers")
    if needs_terminator(old, new) and bridge.terminator is None:
        raise ValueError("the first userspace [[inspect]] rule: restart to apply")
    before = {p.name: (st, p) for st, p in zip(bridge.peers, old.peers, strict=True)}
    c = bridge.counters
    per_peer = {name: (c.rx_packets[i], c.rx_bytes[i], c.tx_packets[i], c.tx_bytes[i])
                for i, name in enumerate(c.peer_names)}
    states: list[PeerState] = []
    kept: list[str] = []
    renewed: list[str] = []
    added: list[str] = []
    for i, p in enumerate(new.peers):
        hit = before.get(p.name)
        if hit is not None and same_wire(hit[1], p):
            st = hit[0]
            st.index = i
            st.keepalive, st.dead_after = p.keepalive, p.dead_after
            st.withdraw = p.down_action is DownAction.WITHDRAW
            kept.append(p.name)
        else:
            st = new_state(i, p, now, bridge.underlay_mtu, new.tun.mtu)
            (renewed if hit is not None else added).append(p.name)
        states.append(st)
    removed = tuple(sorted(before.keys() - {p.name for p in new.peers}))
    zero = (0, 0, 0, 0)
    rows = [per_peer.get(p.name, zero) for p in new.peers]
    c.peer_names = tuple(p.name for p in new.peers)
    c.rx_packets, c.rx_bytes, c.tx_packets, c.tx_bytes = (
        [r[k] for r in rows] for k in range(4))
    bridge.peers[:] = states
    if bridge.secure is not None:
        _secure(bridge.secure, old, new, states, now)
    bridge.table = PeerTable(new.peers, local=[new.listen.address], states=bridge.peers,
                             tun=new.tun.addresses)
    bridge.fast.table = bridge.table
    bridge.fast.peers = bridge.table.states
    if states and not new.tun.mtu:
        bridge.tun_mtu = min(s.mtu for s in states)
    bridge.mss_clamp = new.mss_clamp
    bridge.bind_scrub(new, now)  # [[scrub]] rules index peers by position: rebuilt
    if new.inspect != old.inspect:
        bridge.bind_covers(new)
        if bridge.terminator is not None:
            set_rules(bridge.terminator, new.inspect_rules())
    bridge.config = new
    return Reconfigured(tuple(kept), tuple(renewed), tuple(added), removed, bridge.tun_mtu)


def _secure(link: SecureLink, old: Config, new: Config, states: list[PeerState],
            now: float) -> None:
    """Renumber the secure peers' sessions (module docstring)."""
    from bridge.secure import PeerSpec
    from bridge.secure.session import PeerSession

    ep = link.ep
    before = {p.name: (i, p) for i, p in enumerate(old.peers) if p.secure}
    sessions: dict[int, PeerSession] = {}
    for i, p in enumerate(new.peers):
        if not p.secure:
            continue
        hit = before.get(p.name)
        if hit is not None and same_wire(hit[1], p) and hit[0] in ep.peers:
            sessions[i] = ep.peers[hit[0]]
        else:
            sessions[i] = PeerSession(PeerSpec(i, p.name, p.security, p.endpoint), now)
    ep.renumber(sessions)  # public keys are unique: checked before anything changed
    link.addrs = [(i, states[i].addr) for i in sessions]
    link.keys = {i: secure_key(i) for i in sessions}
    link.modes = {new.peers[i].name: (i, new.peers[i].security.mode.value) for i in sessions}
    link.resync()  # split: the parent hands the child every keyset again


def set_rules(term: Terminator, rules: tuple[InspectRule, ...]) -> None:
    """New SYNs of `term` follow `rules`; cached flows keep their decision and chain."""
    from bridge.flows import selector_for
    from bridge.inspect.manager import InspectorManager

    before = {r.name: r for r in term.rules}
    chains = term.manager.chains
    fresh = InspectorManager([r for r in rules if before.get(r.name) != r])
    for name, chain in list(chains.items()):
        if "~" not in name and (name in fresh.chains or name not in {r.name for r in rules}):
            chain_flush(chain)
            n = 1
            while f"{name}~{n}" in chains:
                n += 1
            chains[f"{name}~{n}"] = chains.pop(name)
    chains.update(fresh.chains)
    term.rules = rules
    term.table.set_selector(selector_for(rules, Backend.USERSPACE))


def chain_flush(chain: object) -> None:
    """Write what a retired chain's inspectors buffered (errors are theirs to log)."""
    for insp in getattr(chain, "inspectors", ()):
        try:
            insp.flush()
        except Exception:  # noqa: BLE001, S110 - an inspector's error never stops a reload
            pass
