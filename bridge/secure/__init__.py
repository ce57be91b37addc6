"""Secure modes (issue 12): peers with `security = "authenticated"` or `"encrypted"`.

Rules:
- Sans-I/O like the rest of the core: bytes, addresses and `now` in; datagrams, events and
  a deadline out. No sockets, no clock, no threads. Randomness comes from `cryptography`
  (ephemeral keys) and an injectable `rng` (indices, cookie secrets and nonces).
- The encapsulation inside is unchanged: what plain mode sends as the UDP payload (GRE
  header + inner packet, or the bare inner packet for IPIP) becomes the payload of one
  transport message (docs/SECURE.md §3): 16 bytes of header in front, a 16-byte tag behind.
- Primitives only from `cryptography`: X25519, AES-256-GCM, HKDF/HMAC/SHA-256.
- Every drop is counted by reason (bridge/secure/limits.py DROP_REASONS); nothing a peer
  sends raises; every table keyed by attacker input is bounded.

Integration contract for the Bridge (bridge/pipeline.py), kept small on purpose:

Construction (once; `wall_offset` from the I/O adapter: `time.time() - now`, it dates the
handshake timestamps so a restarted process outranks its previous life):
    specs = [PeerSpec(i, peer.name, peer.security, (peer.host, peer.port))
             for i, peer in enumerate(config.peers) if peer.security.mode is not PLAIN]
    sec = SecureEndpoint(specs, now, wall_offset=wall_offset)   # only if specs
  Per secure peer the tunnel MTU is 32 bytes (OVERHEAD) smaller than the plain one.
  The I/O layer binds a second UDP socket on the secure port (SECURE_PORT = 24754 unless
  configured) for the secure peers; their `port` defaults to it.

Send (from_tun, after encapsulation, where `_send` / `_emit` now append `dgram`):
    per datagram:  d = sec.seal(i, dgram, now)
                   if d is not None: append d to out.udp[sec.endpoint(i)]
                   (None: staged inside `sec`; it comes out of datagrams_to_send later)
    per UdpRun of equal-size datagrams (the TSO path, up to ~45 of them):
                   r = sec.seal_batch(i, run, run.seg, now,
                                      alloc=lambda n: UdpRun(n, run.seg + OVERHEAD))
                   if r is not None: append r[0] (a UdpRun of segment r[1]) likewise
  Use `sec.endpoint(i)`, not the configured address: it follows a roaming peer. Flow-hash
  source ports (RFC 8086 §3.2.1) may be kept: the receiver never keys on the source port.
  In secure modes the GRE sequence number and key add nothing (the counter and window do
  anti-replay, the session identifies the peer); they may stay for compatibility.

Receive (datagrams from the secure socket; never the by-host lookup: roaming):
    res = sec.receive_datagram(payload, addr, now)
    if res is None: continue                      # counted inside sec, or a handshake step
    if sec.events_q: apply the events (below) now, before `inner`: the datagram that
                     confirms a restarted peer's session carries its first new packet
    i, inner = res                                # inner: a memoryview in authenticated mode
    if not inner: self._heard(peer i); continue   # a keepalive of the secure layer
    then the existing GRE/IPIP decode of `inner` for peer i (keys, checksum, keepalive),
    the inner-source check, TTL, loop, sequence policy, exactly as for plain peers.
  A GroBatch from the secure socket is cut into its datagrams and each goes through the
  same call. `addr` is compared as given: pass it as (canonical host, port) (e.g.
  bridge.peers.canonical_host for a dual-stack socket's IPv4-mapped or 4-tuple
  addresses), or the first datagram reports a spurious Roamed. Only a verified datagram
  may call `_heard`: in secure modes spoofed keepalives cannot keep a dead peer up.

After every from_tun / from_udp / handle_timer call (every one: a response received in
from_udp releases the datagrams staged during the handshake, and they must leave before
anything sealed later, or a sequence policy would see them late):
    for d, addr in sec.datagrams_to_send(now): append d to out.udp[addr]
    while (ev := sec.next_event()) is not None:
        Roamed(i, addr)        -> the peer's send address becomes addr (status shows it)
        SessionStarted(i, ini) -> optional: mark the peer up / log it
        PeerRestarted(i)       -> the peer process started afresh: reset its sequence
                                  receiver (SeqReceiver.reset()), so drop-late / reorder
                                  do not wait for 32 late packets (issue 12's 33.7 s);
                                  a replay cannot fake it (it needs a confirmed session)
Timers: Bridge.get_timer() = min(its own, sec.get_timer()); Bridge.handle_timer(now) calls
sec.handle_timer(now) (handshake retries every 1 s, rekeys, key expiry).

Restart: a new SecureEndpoint initiates at once to every peer whose address it knows
(`get_timer()` returns its construction time), and stages outbound datagrams until the
handshake completes (one round trip). The other side accepts the initiation because its
timestamp is newer than every earlier one from that key; datagrams of the old session
arriving at the restarted side are dropped as "unknown_session" and cost nothing. If the
first initiation is lost, the next goes 1 s later, so traffic flows within 2 s of a
restart unless two handshakes in a row are lost. Nothing recorded before the restart is
accepted after it: every key is derived from both sides' fresh ephemeral keys.

Counters: `sec.snapshot(now)` -> {"drops": {reason: n}, "events": {name: n},
"tables": {"indices", "ratelimit", "staged"}, "peers": {name: {"endpoint", "session",
"session_age", "last_rx_age", "handshake_pending"}}} for `grebe status` (a "secure" key
beside the existing ones); `sec.prometheus()` renders
`grebe_secure_drops_total{reason=...}` and `grebe_secure_events_total{event=...}` for the
metrics endpoint. `sec.force_load = True` lets the Bridge declare load (e.g. a long receive
queue) so handshakes need cookies at once.

Config: `parse_security(peer_table)` -> (PeerSecurity | None, [errors]) reads `security`,
`private_key_file`, `public_key`, `preshared_key_file` of one `[[peers]]` table
(bridge/secure/keys.py); bridge/config.py stores the result on PeerConfig. `genkey()` and
`public_key_of()` back `grebe genkey` / `grebe pubkey`.

Modules: wire (formats), replay (RFC 6479 window), noise (the handshake), limits (timers,
counters, rate limiter), session (per-peer keypairs), endpoint (the API above), keys
(key files and config), fuzz (the fuzz command).
"""

from bridge.secure.endpoint import Event, PeerRestarted, Roamed, SecureEndpoint, SessionStarted
from bridge.secure.keys import (
    PeerSecurity,
    PeerSpec,
    SecurityMode,
    genkey,
    parse_security,
    public_key_of,
)
from bridge.secure.limits import DROP_REASONS, EVENTS, Limits
from bridge.secure.wire import OVERHEAD, SECURE_PORT

__all__ = ["SecureEndpoint", "Event", "Roamed", "SessionStarted", "PeerRestarted",
           "PeerSecurity", "PeerSpec", "SecurityMode", "genkey", "public_key_of",
           "parse_security", "DROP_REASONS", "EVENTS", "Limits", "OVERHEAD", "SECURE_PORT"]
