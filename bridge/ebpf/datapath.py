"""The eBPF fast path's control: choose it, load and attach it, keep it live, count, remove.

Rules:
- `datapath = "python"`: nothing here runs. `"ebpf"`: the fast path or `grebe up` fails
  with the reason. `"auto"` (default): the fast path when it can be built, loaded and
  attached (clang + libbpf headers, libbpf.so.1, CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN,
  cls_bpf), else one log line saying why and the Python path, as before. `grebe status`
  says which one runs ("datapath").
- The Python path stays the reference and keeps running beside the program: the program
  passes what it does not do (bridge/ebpf/grebe_tc.c) and the TUN and UDP socket take it.
- Start: remove a dead owner's filters (bridge/ebpf/attach.py), load, write the maps
  (bridge/ebpf/maps.py), attach. Stop: detach; the kernel frees programs and maps with the
  last fd. Liveness (a stale program must not forward for a dead endpoint): the program
  acts only while gb_global.live_until_ns (CLOCK_MONOTONIC) is ahead; a thread pushes it to
  now + LIVE_S every TICK_S. After a SIGKILL, it passes everything within LIVE_S; by then the
  TUN (and its routes) are gone too, so nothing is encapsulated at all (the FIB check).
  Pinning nothing keeps no state past the attached filters; the next start deletes those.
- Shared state with the Python path, per peer, every TICK_S: the tunnel MTU and whether the
  peer may be sent to (down + "withdraw": the Python path answers with ICMP), into gb_peers;
  when the program last decapsulated from the peer, into `Bridge.note_heard` (liveness).
- GRE sequence numbers: one counter per peer in gb_txseq. The program takes numbers with an
  atomic add; the Python path's encoder is replaced (`SharedSeqEncoder`) by one that takes
  them from the same counter with grebe_seq_reserve (BPF_PROG_TEST_RUN, also an atomic add):
  both paths can send for one peer and never send one number twice. A TSO super-packet
  (bridge/fastpath.py) reads the next number, builds its rows, then reserves them; if the
  program took numbers in between, the rows repeat some (counted, "seq_collisions").
  One order on the wire: after the Python path took numbers for a peer and until it has
  sent them (its datagrams may still be on their way out), the program passes that peer's
  packets to the Python path instead of sending a higher number ahead of them
  ("pass_seq_order"); so a receiver that sees both streams on one path (a Python-only
  peer, a suspended program) finds them in order. The Python path ends the hold after each
  send to such a peer (`sent`, one more test run, only when it took numbers since the last);
  SEQ_HOLD (5 ms) bounds it should that never come. Before the release, each packet passed
  for order renewed the hold when Python sent it, so a flow whose ACKs once met the Python
  path (a SYN passed for MSS clamping) stayed on it while it ran. The release is per peer,
  not per thread: one thread's send may end a hold another thread's numbers still need
  (that datagram may then arrive late at a one-path receiver: one drop, counted there).
  Receive windows (drop-late) are one per path: a packet sent by the peer's Python path
  reaches our Python path, one sent by its program reaches our program (the UDP checksum
  tells them apart, grebe_tc.c), each stream in order; one shared window would count the
  slower path's packets late. But they start once: the program passes a peer's packets
  to the Python path until its window is started, and the Python path's window
  (`SeededSeqReceiver`) starts from the program's if that one runs, else on its first
  packet (Linux iseq), and then starts the program's. So neither path takes a late
  (replayed, forged) number just because it saw nothing before. The program keeps
  bridge/seqpolicy.py's window: a number JUMP_MAX or more ahead moves nothing by itself
  but goes to the Python path ("pass_seq_jump"), whose window drops it if forged (its
  stream shares the numbers, so a real one is usually in it); CONFIRM such packets in a
  run move the program's window (grebe_tc.c seq_accept). And the other way: the Python
  path's window skips the numbers the program's stream took (a SYN passed for MSS
  clamping after a bulk transfer by the program is ~1,000 numbers ahead of it, and was
  dropped twice, 2 s for every new connection, before CONFIRM moved it): a number far
  ahead of it but within JUMP_MAX of the program's window moves it there
  (`SeededSeqReceiver._catch_up`, one map read, only for such a number).
- Netfilter: packets the program forwards never meet the gateway's nftables or iptables
  (prerouting, forward, input, postrouting). So under "auto" the program steps aside while
  the namespace has any nftables base chain or legacy iptables table (but grebe_* tables
  of an endpoint with [[inspect]] rules: its kernel inspection backend's, which only needs
  the [[inspect]] ports the program passes anyway): at start-up `grebe up` then runs the
  Python path, and chains that appear later suspend the program (`grebe status` says why)
  until they are gone. A suspended program forwards and drops nothing; it only fills in
  partial inner checksums of the datagrams it passes (the peer's program may still send
  them, grebe_tc.c). With "ebpf" the operator chose it: one warning, and it forwards.
- Counters: the program's drops (same reasons), per-peer packets and bytes are added to the
  Python counters in `grebe status` and the metrics; its own decisions (encap, decap, and
  each reason to pass a packet to Python) show under status "ebpf".
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from typing import Any

from bridge.config import Config, Datapath, DownAction, Encapsulation, PeerConfig, SeqPolicy
from bridge.counters import DROP_REASONS, EVENTS
from bridge.ebpf import maps as M
from bridge.encap import GreEncoder
from bridge.seqpolicy import JUMP_MAX, SeqReceiver

log = logging.getLogger("grebe.ebpf")

__all__ = ["FastPath", "start", "SharedSeqEncoder", "LIVE_S", "TICK_S"]

LIVE_S = 3.0
TICK_S = 0.5


def netfilter_chains(own_tables: bool = False) -> list[str]:
    """Netfilter hooks in this namespace the program would bypass: nftables base chains
    ("family table/chain") and loaded legacy iptables tables. `own_tables`: leave out
    grebe_* tables (this endpoint's kernel inspection backend: its flows' ports pass)."""
    found: list[str] = []
    try:
        from pyroute2.nftables.main import NFTables  # type: ignore[import-untyped]

        with NFTables(nfgen_family=0) as nft:
            for c in nft.get_chains():
                table = c.get_attr("NFTA_CHAIN_TABLE") or ""
                if c.get_attr("NFTA_CHAIN_HOOK") is not None and not (
                        own_tables and table.startswith("grebe")):
                    fam = _NFPROTO.get(c["nfgen_family"], str(c["nfgen_family"]))
                    found.append(f"{fam} {table}/{c.get_attr('NFTA_CHAIN_NAME')}")
    except Exception as e:  # noqa: BLE001 - no nf_tables: nothing of it to bypass
        log.debug("nftables chains not listed: %s", e)
    for path, fam in (("/proc/net/ip_tables_names", "iptables"),
                      ("/proc/net/ip6_tables_names", "ip6tables")):
        try:
            with open(path) as f:
                found += [f"{fam} {t.strip()}" for t in f if t.strip()]
        except OSError:
            continue
    return found


_NFPROTO = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


class SharedSeqEncoder(GreEncoder):
    """A GreEncoder whose sequence numbers come from the program's per-peer counter."""

    __slots__ = ("_reserve", "peer", "_next", "collisions", "held")

    def __init__(self, key: int | None, csum: bool, reserve: Any, peer: int) -> None:
        super().__init__(key, True, csum)
        self._reserve = reserve
        self.peer = peer
        self._next = 0
        self.collisions = 0
        self.held = False  # numbers taken since the last release (module docstring)

    @property
    def seq(self) -> int:  # the next number (a super-packet builder reads it, then advances)
        self._next = self._reserve(self.peer, 0)
        return self._next

    @seq.setter
    def seq(self, value: int) -> None:  # GreEncoder.__init__ sets 0: the counter starts at 0
        pass

    def wrap(self, packet: Any, v6: bool) -> bytearray:
        dgram = bytearray(self._tmpl6 if v6 else self._tmpl4)
        dgram += packet
        n = self._reserve(self.peer, 1)
        self.held = True
        dgram[self._seq_off:self._seq_off + 4] = n.to_bytes(4, "big")
        return dgram

    def advance(self, count: int) -> None:
        if count > 0:
            got = self._reserve(self.peer, count)
            self.held = True
            if got != self._next:
                self.collisions += 1


class SeededSeqReceiver(SeqReceiver):
    """A drop-late receive window of the Python path that starts where the program's is,
    and starts the program's (module docstring: one start for both paths' windows)."""

    __slots__ = ("_rxseq", "_key", "_seeded", "caught_up")

    def __init__(self, cfg: PeerConfig, rxseq: Any, peer: int) -> None:
        super().__init__(cfg.sequence, cfg.max_packets_held, cfg.outoforder_timer_ms / 1000.0)
        self._rxseq = rxseq
        self._key = M.U32.pack(peer)
        self._seeded = False
        self.caught_up = 0

    def _program_window(self) -> int | None:
        """The next number the program's window expects for this peer; None while the
        program has no started window for it (or its map cannot be read)."""
        try:
            raw = self._rxseq.lookup(self._key)
        except OSError:
            return None
        if not raw:
            return None
        expected, started = M.RXSEQ.unpack(raw)[:2]
        return int(expected) if started else None

    def _from_program(self) -> None:
        expected = self._program_window()
        if expected is not None:
            self.started = True
            self.last = (expected - 1) & 0xFFFFFFFF
            self._seeded = True

    def _to_program(self) -> None:
        try:
            self._rxseq.update(self._key, M.RXSEQ.pack((self.last + 1) & 0xFFFFFFFF, 1, 0, 0, 0, 0))
            self._seeded = True
        except OSError:
            pass

    def _catch_up(self, seq: int) -> None:
        """A number JUMP_MAX or more ahead of this window: the numbers in between were
        the program's stream (one counter per peer on the sending side) when `seq` is
        near the program's window; then this window moves up to it (module docstring)."""
        if (seq - self.last - 1) & 0xFFFFFFFF < JUMP_MAX:
            return
        expected = self._program_window()
        ahead = (seq - self.last - 1) & 0xFFFFFFFF < 0x80000000
        if expected is not None and ahead \
                and (seq - expected + JUMP_MAX) & 0xFFFFFFFF < 2 * JUMP_MAX:
            self.last = (seq - 1) & 0xFFFFFFFF
            self.caught_up += 1

    def receive(self, seq: int, packet: bytes | bytearray, now: float,
                deliver: list[bytes | bytearray]) -> int:
        if not self.started:
            self._from_program()
        else:
            self._catch_up(seq)
        r = super().receive(seq, packet, now, deliver)
        if not self._seeded and self.started:
            self._to_program()
        return r

    def run_may_start(self, seq: int) -> bool:
        if not self.started:
            self._from_program()
        else:
            self._catch_up(seq)
        return super().run_may_start(seq)

    def run_received(self, last: int) -> None:
        super().run_received(last)
        if not self._seeded:
            self._to_program()


class FastPath:
    """A loaded, attached program and its maps, for one endpoint."""

    def __init__(self, cfg: Config, obj: Any, maps: dict[str, Any], attachment: Any,
                 tun_ifindex: int, locals_: list[str]) -> None:
        self.cfg = cfg
        self.obj = obj
        self.maps = maps
        self.attachment = attachment
        self.tun_ifindex = tun_ifindex
        self.locals = locals_
        self._flags = [M.peer_flags(p) for p in cfg.peers]
        self._written: list[tuple[int, int]] = [(-1, -1)] * len(cfg.peers)
        self._heard = [0] * len(cfg.peers)
        self._reserve_fd = obj.prog_fd("grebe_seq_reserve")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.bridge: Any = None
        self.engine_lock: Any = None
        self.encoders: list[SharedSeqEncoder] = []
        self._seq_by_addr: dict[Any, SharedSeqEncoder] = {}
        self.closed = False
        self.watch_netfilter = cfg.datapath is Datapath.AUTO
        self.suspended = ""  # why the program steps aside (netfilter chains), or ""

    # -- sequence numbers shared with the Python path

    def reserve(self, peer: int, count: int) -> int:
        """The first of `count` GRE sequence numbers taken from peer's counter (count 0:
        the next one, nothing taken)."""
        return int(self.obj.test_run(self._reserve_fd, M.SEQ_REQ.pack(peer, count, 0)))

    def sent(self, addr: Any) -> None:
        """The Python path has sent its datagrams to `addr`: if that peer's encoder took
        numbers since the last call, end the program's hold on it (module docstring)."""
        enc = self._seq_by_addr.get(addr)
        if enc is None or not enc.held:
            return
        enc.held = False
        try:
            self.obj.test_run(self._reserve_fd, M.SEQ_REQ.pack(enc.peer, 0, 1))
        except OSError:
            pass  # SEQ_HOLD ends it

    def share_sequence_numbers(self, bridge: Any) -> None:
        """Give the Python path's GRE encoders of sequenced peers the shared counter, and
        its drop-late windows the start of the program's (one start for both)."""
        for i, (p, st) in enumerate(zip(self.cfg.peers, bridge.peers, strict=True)):
            if p.encapsulation is Encapsulation.GRE and p.sequence is not SeqPolicy.OFF:
                enc = SharedSeqEncoder(p.key_out, p.checksum, self.reserve, i)
                st.encoder = enc
                self._seq_by_addr[st.addr] = enc
                st.keepalive_payload = enc.keepalive()
                self.encoders.append(enc)
            if p.sequence is SeqPolicy.DROP_LATE:
                st.seq = SeededSeqReceiver(p, self.maps["gb_rxseq"], i)

    # -- liveness and per-peer state

    def bind(self, bridge: Any, lock: Any) -> None:
        self.bridge = bridge
        self.engine_lock = lock

    def start_thread(self) -> None:
        self.tick()
        self._thread = threading.Thread(target=self._run, name="ebpf control", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception:  # never let the control thread die silently
                log.exception("eBPF control tick")

    def tick(self) -> None:
        """Push the liveness deadline; sync peer MTU/state out and last-heard in.

        Lock order: never the engine's lock while holding ours (status and metrics hold the
        engine's lock and then ask for our counters)."""
        heard: list[tuple[int, float]] = []
        chains = netfilter_chains(bool(self.cfg.inspect)) if self.watch_netfilter else []
        with self._lock:
            if self.closed:
                return
            now = time.monotonic()
            why = ("netfilter chains the program would bypass: " + ", ".join(chains[:5])
                   if chains else "")
            if why != self.suspended:
                if why:
                    log.warning("eBPF fast path suspended (%s); the Python path forwards", why)
                else:
                    log.info("eBPF fast path resumed (no netfilter chains to bypass)")
                self.suspended = why
            g = M.global_value(self.cfg, self.tun_ifindex, int((now + LIVE_S) * 1e9),
                               self.maps["gb_global_all_tcp"], suspended=bool(why))
            self.maps["gb_global"].update(M.U32.pack(0), g)
            b = self.bridge
            if b is None:
                return
            for i, p in enumerate(self.cfg.peers):
                st = b.peers[i]
                flags = self._flags[i]
                if p.down_action is DownAction.WITHDRAW and not st.up:
                    flags &= ~M.PF["TX"]
                if self._written[i] != (flags, st.mtu):
                    self.maps["gb_peers"].update(
                        M.U32.pack(i), M.peer_value(p, flags, st.mtu, self.locals[i],
                                                    self.cfg.listen.port))
                    self._written[i] = (flags, st.mtu)
                raw = self.maps["gb_heard"].lookup(M.U32.pack(i))
                ns = M.U64.unpack(raw)[0] if raw else 0
                if ns and ns != self._heard[i]:
                    self._heard[i] = ns
                    heard.append((i, ns / 1e9))
        if heard:
            if self.engine_lock is not None:
                with self.engine_lock:
                    for i, t in heard:
                        b.note_heard(i, t)
            else:
                for i, t in heard:
                    b.note_heard(i, t)

    # -- counters

    def counters(self) -> dict[str, list[int]]:
        """The program's counters as a `Counters.export()` (for `Counters.merged`)."""
        with self._lock:
            if self.closed:
                return {}
            drops = [0] * len(DROP_REASONS)
            for i in range(len(M.C_DROP_REASONS)):
                drops[i] = M.decode_percpu_u64(self.maps["gb_drops"].lookup(M.U32.pack(i)))
            n = len(self.cfg.peers)
            rxp, rxb, txp, txb = [0] * n, [0] * n, [0] * n, [0] * n
            for i in range(n):
                rxp[i], rxb[i], txp[i], txb[i] = M.decode_peerstats(
                    self.maps["gb_peerstats"].lookup(M.U32.pack(i)))
            return {"drops": drops, "events": [0] * len(EVENTS), "rx_packets": rxp,
                    "rx_bytes": rxb, "tx_packets": txp, "tx_bytes": txb}

    def stats(self) -> dict[str, int]:
        with self._lock:
            if self.closed:
                return {}
            return {name: M.decode_percpu_u64(self.maps["gb_stats"].lookup(M.U32.pack(i)))
                    for i, name in enumerate(M.STATS)}

    def merge_status(self, st: dict[str, Any]) -> None:
        """Add the program's counters to a `grebe status` dict, in place."""
        c = self.counters()
        if not c:
            return
        for name, n in zip(DROP_REASONS, c["drops"], strict=False):
            st.setdefault("drops", {})[name] = st.get("drops", {}).get(name, 0) + n
        for i, p in enumerate(st.get("peers", [])):
            for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
                if i < len(c[k]):
                    p[k] = p.get(k, 0) + c[k][i]
            if i < len(self.cfg.peers) and isinstance(p.get("sequence"), dict) \
                    and self.cfg.peers[i].sequence is not SeqPolicy.OFF:
                p["sequence"]["next_tx"] = self.reserve(i, 0)
        st["datapath"] = "ebpf"
        st["ebpf"] = {"interfaces": sorted(self.attachment.ifnames.values()),
                      "suspended": self.suspended,
                      **self.stats(),
                      "seq_collisions": sum(e.collisions for e in self.encoders),
                      "drops": {name: n for name, n in zip(DROP_REASONS, c["drops"],
                                                           strict=False) if n}}

    # -- the end

    def close(self) -> None:
        """Detach and release. Never raises; safe twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        from bridge.ebpf.attach import detach

        with self._lock:
            if self.closed:
                return
            self.closed = True
            detach(self.attachment)
            try:
                self.obj.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing the eBPF object: %s", e)
        log.info("eBPF fast path removed")


def _source_for(host: str, listen: str) -> str:
    """The address datagrams to `host` leave from: the listen address, or the route's."""
    lip = ipaddress.ip_address(listen)
    hip = ipaddress.ip_address(host)
    if not lip.is_unspecified and lip.version == hip.version:
        return str(lip)
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        routes = ipr.route("get", dst=host)
        for r in routes:
            src = r.get_attr("RTA_PREFSRC")
            if src:
                return str(src)
    raise OSError(f"no source address toward {host}")


def _tun_ifindex(name: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
    if not idx:
        raise OSError(f"TUN {name} not found")
    return int(idx[0])


def start(cfg: Config, bridge: Any) -> FastPath:
    """Build, load, fill and attach the program for `cfg` (its TUN must exist).

    Raises an Exception whose text says why (BuildError, OSError with errno EPERM when the
    process lacks CAP_BPF/CAP_NET_ADMIN, ...); nothing stays attached when it raises.
    """
    from bridge.ebpf.attach import attach, remove_stale
    from bridge.ebpf.build import object_path
    from bridge.ebpf.libbpf import BpfObject, Map

    chains = netfilter_chains(bool(cfg.inspect))
    if chains:
        what = "netfilter chains here would not see its packets: " + ", ".join(chains[:5])
        if cfg.datapath is not Datapath.EBPF:
            raise RuntimeError(what)
        log.warning("datapath ebpf: %s (forwarded tunnel traffic bypasses them)", what)
    path = object_path()
    remove_stale(cfg.tun.name)
    obj = BpfObject(str(path), quiet=os.environ.get("GREBE_EBPF_VERBOSE") != "1")
    try:
        ncpus = os.cpu_count() or 1
        from bridge.ebpf.libbpf import load_library

        load_library()
        possible = _possible_cpus() or ncpus
        maps: dict[str, Any] = {}
        for name, (ks, vs) in M.SIZES.items():
            maps[name] = Map(name, obj.map_fd(name), ks, vs,
                             possible if name in M.PERCPU else 1)
        tun_ifindex = _tun_ifindex(cfg.tun.name)
        locals_ = [_source_for(p.host, cfg.listen.address) for p in cfg.peers]
        rules = cfg.inspect_rules() or () if cfg.inspect else ()
        mtus = [p.mtu for p in bridge.peers]
        plan = M.plan(cfg, tun_ifindex, mtus, locals_,
                      int((time.monotonic() + LIVE_S) * 1e9), rules)
        for name, entries in plan.entries.items():
            for k, v in entries:
                maps[name].update(k, v)
        maps["gb_global_all_tcp"] = plan.inspect_all_tcp
        att = attach(obj.prog_fd("grebe_ingress"), cfg.tun.name)
    except BaseException:
        obj.close()
        raise
    fp = FastPath(cfg, obj, maps, att, tun_ifindex, locals_)
    fp._written = [(M.peer_flags(p), bridge.peers[i].mtu) for i, p in enumerate(cfg.peers)]
    return fp


def _possible_cpus() -> int:
    """How many values a per-CPU map lookup returns (the kernel's possible CPUs)."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return 0
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
