"""The event loop: drain the TUN and the UDP socket until EAGAIN, run the Bridge, execute.

Rules:
- The Bridge (sans-I/O core) is not thread-safe: every call into it holds `Engine.lock`.
  Reading, splitting, coalescing and the send/write system calls happen outside the lock.
- One `Output` per direction, cleared after it is executed; `out.udp` goes out with UDP GSO
  per destination (`UdpEndpoint.send_datagrams`), `out.tun` is coalesced and written.
- One timer: the earliest `Bridge.get_timer()`. A data thread that moves the deadline
  earlier wakes the timer thread through an eventfd.
- A bug in the core must not kill the bridge: an exception from a Bridge call is logged
  once per exception type and counted in `internal_errors`; the rest of that batch is lost,
  but not silently: each of its datagrams (each one in a GRO batch) and TUN packets is
  counted under the drop reason internal_error (work done only when it happens).
- The adapters declare what they do in `caps` (bridge/io/adapters.py), read once when the
  Engine is built; everything else the Engine calls is given to its constructor (keep-warm,
  the UDP->TUN process of bridge/io/split.py, TUN writes in core order). Other parts of
  `grebe up` reach the core through `call_core` (bridge/io/flows.py).
- Secure peers (issue 12): a second UDP adapter, `secure_udp`, bound to the secure port,
  is given to the constructor when the Bridge has secure peers; `pump_secure` feeds what it
  receives to `Bridge.from_secure`, and every Output's `secure` datagrams leave from it
  (one emptiness check per batch). Not with one process per direction (a session's keys
  and counters are one state fed by both directions).

Fast paths (bridge/gso.py): the TUN hands TCP TSO frames to `Bridge.from_tun` whole
(`SuperPacket`), and the UDP socket hands GRO buffers to `Bridge.from_udp` whole
(`GroBatch`, only with a vnet-header TUN since the core answers with `TunFrame`s): the
adapters build them with the factories `grebe up` gives them (bridge/cli.py
`core_batches`; GREBE_SUPER_PACKETS=0 / GREBE_GRO_BATCHES=0 turn them off). The Writer
threads and the timer's Wakeup are bridge/io/threads.py. Latency: a batch of at most
INLINE_MAX (4) packets runs on the data thread itself when its writer is idle (nothing
queued or running, so order is kept): waking the writer was a thread switch added to every
ping and lone ACK.

Theory of operation: `Engine` holds the pumps and no threads, so tests can drive two
Engines deterministically over the in-memory fakes (`bridge/io/fake.py`); bridge/io/runner.py
`Runner` runs an Engine with one thread per direction (why threads: its docstring). The
I/O counters in `stats` are updated from several threads without a lock, so they may lose
an increment now and then; the Bridge's own counters are exact.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from bridge.counters import R_INTERNAL_ERROR
from bridge.gro import GroBatch
from bridge.io.adapters import Addr, TunLike, UdpLike
from bridge.io.threads import Wakeup, Writer
from bridge.io.warm import Warmer
from bridge.pipeline import Bridge, Output

log = logging.getLogger("grebe.loop")

BATCH = int(os.environ.get("GREBE_BATCH", "64"))  # reads per drain round
# Reads per Bridge call. The Bridge lock (and the GIL) is held for one call, so a call over
# 64 GRO batches (4 MB) can keep the other direction's ACKs waiting for milliseconds; but
# paired iperf3 runs with 2, 8 and 64 on the loaded lab machine showed no reliable
# difference (495-1340 Mb/s spread within each setting), so the default stays one call per
# drain round, as before. A knob for further measurement.
CHUNK = int(os.environ.get("GREBE_CHUNK", str(BATCH)))
INLINE_MAX = int(os.environ.get("GREBE_INLINE_MAX", "4"))  # see _small()
PMTU_RECHECK = 30.0  # seconds between reads of the kernel's path MTU per peer (timer thread)


DataRunner = Callable[..., None]  # Runner.data: (engine, fd, pump, name, warm, stop_fd=)


class Sibling(Protocol):
    """The process that runs this endpoint's UDP->TUN direction (bridge/io/split.py
    RxProcess, one process per direction): what the parent's Engine and Runner ask of it."""

    sync_interval: float  # the longest the two go without exchanging liveness and MTU (s)

    def start(self, engine: Engine, run_data: DataRunner, writer_threads: bool) -> None: ...
    def sync(self) -> None: ...  # lock held: fold its last-heard times into the Bridge
    def query(self) -> dict[str, Any] | None: ...  # its counters, or None (no answer)
    def merge_status(self, st: dict[str, Any], child: dict[str, Any]) -> None: ...
    def publish_mtu(self, addr: Addr, mtu: int) -> None: ...
    def exited(self) -> bool: ...
    def stop(self) -> None: ...
    # fds the parent's timer thread polls, with their handlers (secure peers' channel)
    def handlers(self, engine: Engine) -> list[tuple[int, Callable[[], None]]]: ...


class Engine:
    """One Bridge with its TUN and UDP adapters: the pumps, and nothing that blocks.

    Everything it calls besides the core and the adapters is given here: `keep_warm` (a
    Warmer, bridge/io/warm.py), `sibling` (the UDP->TUN process, bridge/io/split.py),
    `ordered_tun` (TUN writes in core order across threads: on by default when the Bridge
    terminates flows, see `_tun_in_order`), `fast_path` (the eBPF fast path,
    bridge/ebpf/datapath.py, whose counters status and metrics merge). What the adapters do
    is read from their `caps`.
    """

    def __init__(self, bridge: Bridge, tun: TunLike, udp: UdpLike,
                 clock: Callable[[], float] = time.monotonic, *, keep_warm: bool = False,
                 sibling: Sibling | None = None, ordered_tun: bool | None = None,
                 fast_path: Any = None, secure_udp: UdpLike | None = None) -> None:
        if udp.caps.gro_batches and not tun.caps.vnet_hdr:
            raise ValueError("GRO batches need a TUN with the vnet header (the core answers "
                             "them with TunFrames)")
        if sibling is not None and bridge.terminator is not None:
            raise ValueError("one process per direction cannot terminate flows: a flow's "
                             "two legs are one state machine fed by both directions")
        if (bridge.secure is not None) != (secure_udp is not None):
            raise ValueError("secure peers need the secure UDP socket, and only they do")
        self.secure_udp = secure_udp
        self.bridge = bridge
        self.tun = tun
        self.udp = udp
        self.clock = clock
        self.sibling = sibling
        self.fast_path = fast_path
        self.tap: Any = None  # `grebe capture` (bridge/io/capture.py): one check per batch
        self.lock = threading.Lock()
        self.internal_errors = 0
        self.wakeup = Wakeup()  # the Runner's timer thread polls it
        self.warmer = Warmer(bridge, clock) if keep_warm else None
        self._ordered_tun = bridge.terminator is not None if ordered_tun is None \
            else ordered_tun
        self._seen_errors: set[str] = set()
        self._out_t, self._out_u, self._out_timer = Output(), Output(), Output()
        self._pk_t: list[Any] = []
        self._dg_u: list[tuple[Any, Addr]] = []
        self._out_s = Output()
        self._dg_s: list[tuple[Any, Addr]] = []
        self._peer_events = self._peer_event_counts()
        self._peer_state: dict[str, str] = {
            p.get("name"): p.get("state", "up" if p.get("up") else "down")
            for p in bridge.status(clock()).get("peers", [])}
        self._writers: dict[int, Writer] = {}  # id(Output) -> its writer (start_writers)
        self._u_writer: Writer | None = None
        self._pmtu_next = clock() + PMTU_RECHECK
        self._too_big = udp.too_big  # the adapter's own set, filled in place
        self._sports_ok = udp.caps.source_ports  # RFC 8086 §3.2.1 flow-hash ports
        self.stats = {"tun_reads": 0, "tun_packets": 0, "udp_recvs": 0, "udp_datagrams": 0,
                      "udp_sends": 0, "tun_writes": 0, "pmtu_updates": 0}

    def twin(self) -> Engine:
        """A fresh Engine over the same Bridge and adapters, with the same keep-warm: the
        UDP->TUN process's own (bridge/io/split.py; its own wakeup fd and counters)."""
        return Engine(self.bridge, self.tun, self.udp, self.clock,
                      keep_warm=self.warmer is not None, ordered_tun=self._ordered_tun,
                      secure_udp=self.secure_udp)

    def pump_tun(self, limit: int = BATCH) -> int:
        """Read up to `limit` frames from the TUN, in chunks of CHUNK reads: run `from_tun`
        and execute per chunk. Returns frames read."""
        w = self.warmer
        return self._pump(self.tun.read_packets, self._pk_t, self.bridge.from_tun, self._out_t,
                          w.note_tun if w is not None else None, "tun_reads", "tun_packets",
                          limit)

    def pump_udp(self, limit: int = BATCH) -> int:
        """Read up to `limit` recvs (GRO batches or datagrams), in chunks of CHUNK: run
        `from_udp` and execute per chunk. Returns recvs."""
        w = self.warmer
        tap = self.tap
        return self._pump(self.udp.recv_datagrams, self._dg_u, self.bridge.from_udp,
                          self._out_u, w.note_udp if w is not None else None, "udp_recvs",
                          "udp_datagrams", limit, tap.received if tap is not None else None)

    def pump_secure(self, limit: int = BATCH) -> int:
        """Like `pump_udp`, for the secure port: `from_secure`. 0 without secure peers."""
        sec = self.secure_udp
        if sec is None:
            return 0
        w = self.warmer
        return self._pump(sec.recv_datagrams, self._dg_s, self.bridge.from_secure,
                          self._out_s, w.note_udp if w is not None else None, "udp_recvs",
                          "udp_datagrams", limit)

    def _pump(self, read: Callable[[list[Any], int], int], batch: list[Any],
              core: Callable[[Any, float, Output], None], out: Output,
              note: Callable[[list[Any]], None] | None, k_calls: str, k_items: str,
              limit: int, tap: Callable[[list[Any]], bool] | None = None) -> int:
        """One direction: read in chunks of CHUNK calls until EAGAIN or `limit`; per chunk
        the keep-warm sample, the core call and the output. Returns read calls."""
        stats = self.stats
        total = 0
        while total < limit:
            want = min(CHUNK, limit - total)
            calls = read(batch, want)
            total += calls
            if batch:
                stats[k_calls] += calls
                stats[k_items] += len(batch)
                if note is not None:
                    note(batch)
                if tap is not None and not tap(batch):  # `grebe capture` over: drop the tap
                    self.tap = tap = None
                self._call(core, batch, out)
                batch.clear()
                self._execute(out)
            if calls < want:
                break
        return total

    def pump_timer(self) -> float | None:
        """Run the Bridge's timer if due; return the next deadline (or None)."""
        now = self.clock()
        out = self._out_timer
        sib = self.sibling
        with self.lock:
            if sib is not None:
                sib.sync()
            t = self.bridge.get_timer()
            if t is not None and t <= now:
                try:
                    self.bridge.handle_timer(now, out)
                except Exception as e:  # a core bug: keep the bridge running
                    self._internal(e)
                t = self.bridge.get_timer()
            if self._ordered_tun:
                self._tun_in_order(out)
            self._log_peer_changes(now)
        self._execute(out)
        if now >= self._pmtu_next:
            self._pmtu_next = now + PMTU_RECHECK
            self.recheck_path_mtu()
        return self._pmtu_next if t is None else min(t, self._pmtu_next)

    def call_core(self, fn: Callable[[float, Output], object]) -> None:
        """Run `fn(now, out)` on the core from any thread, with the lock and an Output of its
        own, then execute that output: for parts of `grebe up` beside the data path
        (bridge/io/flows.py resets the terminated flows on shutdown)."""
        out = Output()
        with self.lock:
            try:
                fn(self.clock(), out)
            except Exception as e:  # a core bug: keep the bridge running
                self._internal(e)
            if self._ordered_tun:
                self._tun_in_order(out)
            t = self.bridge.get_timer()
        if t is not None:
            self.wakeup.moved(t)
        self._execute(out)

    def _peer_event_counts(self) -> tuple[int, int]:
        c = self.bridge.counters
        try:
            return c.event("peer_up"), c.event("peer_down")
        except KeyError:  # a core without these events: nothing to log
            return (0, 0)

    def _log_peer_changes(self, now: float) -> None:
        """One log line per peer state change (called with the lock held, on timer ticks)."""
        counts = self._peer_event_counts()
        if counts == self._peer_events:
            return
        self._peer_events = counts
        for p in self.bridge.status(now).get("peers", []):
            state = p.get("state", "up" if p.get("up") else "down")
            if self._peer_state.get(p.get("name")) != state:
                self._peer_state[p.get("name")] = state
                log.info("peer %s (%s) is %s", p.get("name"), p.get("endpoint"), state)

    def apply(self, change: Callable[[], Any]) -> Any:
        """Run `change` (a reload's update of the Bridge) under the lock, between batches, and
        re-arm the timer for the deadlines it moved. Returns what `change` returns."""
        with self.lock:
            result = change()
            t = self.bridge.get_timer()
        if t is not None:
            self.wakeup.moved(t)
        return result

    def status(self) -> dict[str, Any]:
        sib = self.sibling
        child = sib.query() if sib is not None else None  # not under the lock: it may wait
        with self.lock:
            if sib is not None:
                sib.sync()
            st = self.bridge.status(self.clock())
        st["io"] = dict(self.stats, internal_errors=self.internal_errors)
        w = self.warmer  # keep-warm shadow calls (bridge/io/warm.py); 0 when off
        st["io"]["keep_warm_ticks"] = w.ticks if w is not None else 0
        if sib is not None and child is not None:
            sib.merge_status(st, child)
        if self.fast_path is not None:  # issue 14: the eBPF program's counters
            self.fast_path.merge_status(st)
        else:
            st["datapath"] = "python"
        return st

    def metrics_text(self) -> str:
        """The Bridge's Prometheus counters, the receiving process's added when split."""
        sib = self.sibling
        child = sib.query() if sib is not None else None
        with self.lock:
            if sib is not None:
                sib.sync()
            c = self.bridge.counters
            if child is not None:
                c = c.merged(child.get("counters", {}))
            if self.fast_path is not None:  # issue 14: the eBPF program's counters
                c = c.merged(self.fast_path.counters())
            peers = self.bridge.peers
            # the core's clock is monotonic: the last datagram's Unix time is now minus its age
            wall, now = time.time(), self.clock()
            text = c.prometheus(peer_up=[p.up and p.heard for p in peers],
                                last_seen=[wall - (now - p.last_rx) if p.heard else None
                                           for p in peers])
            if self.bridge.scrub is not None:  # issue 12: per-rule counters, both processes
                text += self.bridge.scrub.prometheus((child or {}).get("scrub"))
            sec = self.bridge.secure
            return text + sec.prometheus((child or {}).get("secure")) if sec is not None \
                else text

    def execute(self, out: Output) -> None:
        """Send and write what a core call put in `out`, then clear it."""
        self._execute(out)

    def _call(self, fn: Callable[[Any, float, Output], None], batch: Any, out: Output) -> None:
        with self.lock:
            try:
                fn(batch, self.clock(), out)
            except Exception as e:  # a core bug: keep the bridge running, count the batch
                self._internal(e, batch)
            if self._ordered_tun:
                self._tun_in_order(out)
            t = self.bridge.get_timer()
        if t is not None:
            self.wakeup.moved(t)

    def _tun_in_order(self, out: Output) -> None:
        """Every TUN write leaves in the order the core produced it, whichever thread ran
        the core (`ordered_tun`). A terminated flow's client leg sends from all of them (its
        data when the server's segments arrive, on udp->tun; more data when the client's
        ACKs open the window, on tun->udp; retransmissions on the timer thread); two writer
        threads writing to one TUN reordered those segments, and the client's duplicate ACKs
        then made the leg retransmit (901 retransmissions in a clean 100 MB download).
        Called with the lock held: the packets go to the udp->tun writer in core order, or
        are written right here when that writer is idle and the batch is small (a thread
        wake-up costs more than an ACK)."""
        if not out.tun:
            return
        pkts = list(out.tun)
        out.tun.clear()
        w = self._u_writer
        if w is None or (w.idle() and len(pkts) <= INLINE_MAX):
            self._write(pkts)
        else:
            w.put(self._write, pkts)

    def _internal(self, e: Exception, batch: Sequence[Any] = ()) -> None:
        """A core call raised (called with the lock held): count it, and each datagram or
        TUN packet of its `batch` under internal_error; log once per exception type."""
        self.internal_errors += 1
        n = 0
        for item in batch:  # (payload, addr) from the UDP socket; a packet from the TUN
            p = item[0] if type(item) is tuple else item
            n += p.count() if type(p) is GroBatch else 1
        self.bridge.counters.drops[R_INTERNAL_ERROR] += n
        name = type(e).__name__
        if name not in self._seen_errors:
            self._seen_errors.add(name)
            log.exception("internal error in the data plane (%s); the rest of the batch is "
                          "lost, counted as internal_error", name)

    def _send(self, addr: Addr, dgs: Sequence[bytes | bytearray],
              sports: list[int] | None = None) -> None:
        tap = self.tap
        if tap is not None and not tap.sent(addr, dgs, sports if self._sports_ok else None):
            self.tap = None  # `grebe capture` is over
        if sports and self._sports_ok:  # RFC 8086 §3.2.1 flow-hash ports (udp.py pool)
            self.stats["udp_sends"] += self.udp.send_datagrams(addr, dgs, sports)
        else:
            self.stats["udp_sends"] += self.udp.send_datagrams(addr, dgs)
        if self.fast_path is not None:  # the program's sequence hold ends (datapath.py)
            self.fast_path.sent(addr)
        if self._too_big:  # EMSGSIZE met (bridge/io/udp.py); the set is the adapter's own
            self.learn_path_mtu()

    def _send_secure(self, secure: dict[Addr, list[bytes | bytearray]]) -> None:
        """Sealed datagrams (Output.secure) from the secure port."""
        sock = self.secure_udp
        if sock is None:
            return
        for addr, dgs in secure.items():
            self.stats["udp_sends"] += sock.send_datagrams(addr, dgs)
        if sock.too_big:  # EMSGSIZE: the same path MTU logic as the plain socket's
            self._too_big.update(sock.too_big)
            sock.too_big.clear()
            self.learn_path_mtu()

    def learn_path_mtu(self) -> None:
        """A send met EMSGSIZE: the underlay path MTU toward that peer shrank (RFC 1191 /
        RFC 8201, an ICMP error the kernel took). Tell the core (Bridge.set_path_mtu: the
        peer's tunnel MTU, hence its ICMP Too Big and MSS clamping) and shrink the TUN."""
        too_big = self._too_big
        while too_big:
            try:
                addr = too_big.pop()
            except KeyError:  # another thread took it
                return
            self._apply_path_mtu(addr)

    def recheck_path_mtu(self) -> None:
        """Every PMTU_RECHECK seconds (timer thread): the kernel's path MTU toward each peer,
        which grows back when its learned value expires (RFC 1191 §6.3, RFC 8201 §4: Linux
        ages it out after 10 minutes), so a tunnel MTU lowered by EMSGSIZE recovers. Only
        with an adapter that reads it (`UdpCaps.path_mtu`)."""
        if not self.udp.caps.path_mtu:
            return
        for addr in {p.addr for p in self.bridge.peers}:
            self._apply_path_mtu(addr)

    def _apply_path_mtu(self, addr: Addr) -> None:
        mtu = self.udp.path_mtu(addr)
        if mtu is not None:
            with self.lock:
                before = self.bridge.tun_mtu
                peer_before = [p.mtu for p in self.bridge.peers]
                try:
                    after = self.bridge.set_path_mtu(mtu, addr)
                except ValueError:  # below 576: an underlay we cannot use; keep the old one
                    log.warning("path MTU %d toward %s is below 576; ignored", mtu, addr)
                    return
                changed = peer_before != [p.mtu for p in self.bridge.peers]
            if changed:
                self.stats["pmtu_updates"] += 1
                if self.sibling is not None:
                    self.sibling.publish_mtu(addr, mtu)
            if after != before:
                log.info("path MTU toward %s:%d is now %d: tunnel MTU %d (was %d)",
                         addr[0], addr[1], mtu, after, before)
                try:
                    self.tun.set_mtu(after)
                except OSError as e:
                    log.warning("could not set the TUN MTU to %d: %s", after, e)

    def _write(self, pkts: Sequence[bytes | bytearray | memoryview]) -> None:
        self.stats["tun_writes"] += self.tun.write_packets(pkts)

    def start_writers(self) -> None:
        """Execute each direction's output on its own Writer thread (Runner.run)."""
        self._u_writer = Writer("udp->tun writer")
        # the secure port's receive direction hands its TUN writes over like the plain
        # port's (issue 12: executed inline, they took the secure->tun thread's time from
        # opening the next batch); the same writer, as `_tun_in_order` uses for both
        self._writers = {id(self._out_t): Writer("tun->udp writer"),
                         id(self._out_u): self._u_writer, id(self._out_s): self._u_writer}

    def stop_writers(self) -> None:
        """Finish what the writers hold, end them; output is executed inline again."""
        writers = list(self._writers.values())
        self._writers = {}
        self._u_writer = None
        for w in writers:
            w.stop()

    def _execute(self, out: Output) -> None:
        w = self._writers.get(id(out))
        if w is not None and w.idle() and _small(out):
            w = None  # latency: a handoff to a sleeping writer costs a thread wake-up
        sports = out.udp_sport
        if w is None:
            if out.secure:
                self._send_secure(out.secure)
            for addr, dgs in out.udp.items():
                self._send(addr, dgs, sports.get(addr))
            if out.tun:
                self._write(out.tun)
        else:  # the core makes new lists per batch: out.udp's lists can be handed over
            if out.secure:
                w.put(self._send_secure, dict(out.secure))
            for addr, dgs in out.udp.items():
                w.put(self._send, addr, dgs, sports.get(addr))
            if out.tun:
                w.put(self._write, list(out.tun))
        out.clear()


def _small(out: Output) -> bool:
    """A batch worth executing inline when its writer is idle: a ping, an ACK or two.
    Overlap only pays for big batches; for small ones the wake-up is the added RTT."""
    n = len(out.tun)
    for dgs in out.udp.values():
        n += len(dgs)
    for dgs in out.secure.values():
        n += len(dgs)
    return n <= INLINE_MAX
