"""One process per direction: an endpoint's UDP->TUN half runs in a child process.

Why: both directions of one endpoint share one interpreter lock (GIL). Under a bulk
transfer one direction carries the data (numpy segmenting or coalescing, bridge/gso.py) and
the other its ACKs; an ACK that waits for the lock waits behind a whole batch, and the
sender's TCP sees that as RTT. With the receiving direction in its own process each half
has its own lock and its own core. Paired iperf3 runs in the lab: +18 to +35 % single-stream
(docs/DESIGN.md). `split_directions = false` keeps one process.

Rules:
- The parent keeps everything that is not the UDP->TUN data path: the TUN->UDP thread,
  timers (keepalives, liveness), the control socket and the metrics, signals, and the
  routes and the TUN, which it removes on exit. The child only reads the UDP socket, runs
  `Bridge.from_udp` on its own copy of the Bridge (`rx_only`: its timer only flushes the
  reorder buffers), and writes the TUN. `from_udp` only ever writes to the TUN, so the
  GRE sequence numbers (and ICMP rate limit) the parent uses stay the parent's alone.
- Each direction's state lives in one process; what the other needs crosses over:
  * when a peer was last heard (liveness, `grebe status`): the child writes it to a shared
    page after each batch, the parent reads it before each timer run, each status and at
    least every SYNC_S (`Bridge.note_heard`: a peer that comes back is up again within
    that time);
  * the underlay path MTU the parent learns (EMSGSIZE, IP_MTU): the parent writes it to the
    shared page, the child applies it within SYNC_S (MSS clamping of SYN-ACKs from the peer);
  * counters: `grebe status` and the metrics ask the child over a socket pair for its
    counters, reorder state and I/O counts, and add them to the parent's
    (`Counters.merged`). The child's peer_up / peer_down events are not counted: liveness
    is the parent's.
- A reload (bridge/io/live.py) reconfigures both copies of the Bridge (bridge/reconfig.py):
  the parent its own first (lock held), then the child over the socket pair (the new
  Config and the parent's `now`, pickled; the child answers "ok" or what failed). Peers
  are renumbered, so the parent reads no last-heard slot (`pause`) until the child has
  rewritten them in the new numbering; the MTU slots are cleared before and written after,
  from the parent's peers (the child's copies end with the parent's MTUs). The shared
  page has room for PEER_ROOM peers.
- With [[inspect]] rules an endpoint stays one process: a terminated flow's two legs are
  one TCP state machine, fed by both directions.
- Secure peers (issue 12) split as WireGuard separates handshake from data path
  (bridge/secure/mirror.py): the child reads the secure socket and opens transport
  datagrams with receive keys and replay windows that live only in it; it forwards
  handshake messages, the confirmation of a responder's new keypair and a verified
  roaming to the parent over a second socket pair (the "secure channel", pickled tuples);
  the parent answers handshakes, seals and sends, runs the secure timers, and hands each
  new or changed keyset to the child over the same channel before the Output that lets
  the peer use it is sent. The child applies what waits on the channel before each batch
  (and when idle). When it last verified a datagram of each peer, and first had data
  since, go to the parent through a second shared page (`sec_shared`), which
  `sync` folds into the parent's keepalive and silence timers. The child's secure drop
  and event counters are added to the parent's in `grebe status` and the metrics.
- The child dies with the parent (PR_SET_PDEATHSIG) and on SIGTERM; it never removes
  anything. If it ends on its own (a bug), the parent logs it and stops with exit code 1,
  so that whatever supervises `grebe up` restarts the endpoint whole.

Theory of operation: `grebe up` gives the parent's Engine an `RxProcess` as its `sibling`
(the `Sibling` protocol of bridge/io/loop.py); `Runner.run` starts it, which forks before
any thread starts. The child builds its own Engine over the same Bridge and adapters
(`Engine.twin`: fresh eventfds, since a shared one would wake both processes, and counters
of its own) and runs the UDP->TUN data thread plus a small loop for its timer, the MTU sync
and the parent's status queries.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import mmap
import os
import pickle
import select
import signal
import socket
import threading
import time
from typing import Any

from bridge.config import Config
from bridge.counters import DROP_REASONS, E_PEER_DOWN, E_PEER_UP, EVENTS
from bridge.io.adapters import Addr
from bridge.io.loop import DataRunner, Engine
from bridge.pipeline import Bridge, Output
from bridge.reconfig import reconfigure
from bridge.securelink import CHILD, PARENT

log = logging.getLogger("grebe.split")

SYNC_S = 0.1  # the longest the two halves go without exchanging liveness and MTU
QUERY_TIMEOUT_S = 1.0
RELOAD_TIMEOUT_S = 5.0
PEER_ROOM = 256  # peers the shared page holds at least (a reload beyond: restart)
PR_SET_PDEATHSIG = 1


class SharedPeers:
    """Two float64 slots per peer in an anonymous shared mapping made before the fork:
    [2i] when the child last heard peer i, [2i+1] the underlay path MTU the parent learned
    for it (0: none). One writer per slot; aligned 8-byte stores are atomic on Linux.
    Room for `capacity` peers, so that a reload can add some (PEER_ROOM at least)."""

    def __init__(self, peers: int) -> None:
        self.capacity = max(peers * 2, PEER_ROOM)
        self._mm = mmap.mmap(-1, 16 * self.capacity)
        self.v = memoryview(self._mm).cast("d")


class RxProcess:
    """The parent's handle on the child that runs the UDP->TUN direction: the parent
    Engine's `sibling` (bridge/io/loop.py `Sibling`)."""

    sync_interval = SYNC_S

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge  # the parent's
        self.shared = SharedPeers(len(bridge.peers))
        self.pid = 0
        self._sock: socket.socket | None = None
        self._qlock = threading.Lock()
        self._paused = False  # a reload renumbers the peers: no sync until the child did
        # secure peers (bridge/secure/mirror.py): [2i] when the child last verified a
        # datagram of peer i, [2i+1] when it first had data from it since its last write
        self.sec_shared = SharedPeers(len(bridge.peers)) if bridge.secure is not None else None
        self._chan: socket.socket | None = None  # keys down, handshakes and events up
        self._engine: Engine | None = None

    # -- parent ---------------------------------------------------------------------------

    def start(self, engine: Engine, run_data: DataRunner, writer_threads: bool) -> None:
        """Fork. Returns in the parent; the child runs `engine`'s UDP->TUN direction on an
        Engine of its own with `run_data` (Runner.data) and never returns."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        chan_p, chan_c = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ppid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child (lab tests exercise it)
            parent.close()
            chan_p.close()
            code = 0
            try:
                self._child(child, ppid, engine.twin(), run_data, writer_threads, chan_c)
            except BaseException:
                log.exception("receiving process failed")
                code = 1
            os._exit(code)
        child.close()
        chan_c.close()
        self._sock = parent
        self.pid = pid
        self._engine = engine
        link = engine.bridge.secure
        if link is not None:
            self._chan = chan_p
            chan_p.setblocking(False)

            def down(msg: Any) -> None:
                _send(chan_p, msg)  # keysets: wait for room, never dropped

            link.split(PARENT, down)
        else:
            chan_p.close()
        log.info("UDP->TUN runs in process %d (split_directions)", pid)

    def sync(self) -> None:
        """Fold the child's last-heard times into the parent's Bridge (with the lock)."""
        if self._paused:
            return
        v = self.shared.v
        b = self.bridge
        for i in range(len(b.peers)):
            t = v[2 * i]
            if t > b.peers[i].last_rx:
                b.note_heard(i, t)
        link = b.secure
        if link is not None and self.sec_shared is not None:
            sv = self.sec_shared.v
            for i in link.ep.peers:
                link.note_child(i, sv[2 * i], sv[2 * i + 1])

    def handlers(self, engine: Engine) -> list[tuple[int, Any]]:
        """The secure channel (parent's timer thread): the child's forwarded handshakes,
        confirmations and roaming, handled by the parent's SecureLink."""
        chan = self._chan
        if chan is None:
            return []

        def on_chan() -> None:
            out = Output()
            link = engine.bridge.secure
            for msg in _drain(chan):
                with engine.lock:
                    if link is not None:
                        link.from_child(msg, engine.clock(), out)
                engine.execute(out)

        return [(chan.fileno(), on_chan)]

    def exited(self) -> bool:
        """The child ended (it should live as long as the parent): reaped here."""
        if not self.pid:
            return False
        try:
            done = os.waitpid(self.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            done = True
        if done:
            self.pid = 0
        return done

    def publish_mtu(self, addr: Addr, mtu: int) -> None:
        if self._paused:
            return  # a reload is renumbering the slots; it publishes every MTU when done
        for i, p in enumerate(self.bridge.peers):
            if p.addr == addr:
                self.shared.v[2 * i + 1] = float(mtu)

    def query(self) -> dict[str, Any] | None:
        """The child's counters (`_export`), or None if it does not answer in time."""
        return self._ask(b"?")

    def _ask(self, msg: bytes) -> dict[str, Any] | None:
        s = self._sock
        if s is None:
            return None
        with self._qlock:
            try:
                s.send(msg)
                if not select.select([s], [], [], QUERY_TIMEOUT_S)[0]:
                    log.warning("receiving process %d did not answer", self.pid)
                    return None
                data = s.recv(1 << 20)
            except OSError as e:
                log.warning("receiving process %d: %s", self.pid, e)
                return None
        try:
            got: dict[str, Any] = json.loads(data)
        except ValueError:
            return None
        return got

    def control(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """A request to the child (`grebe capture` arms its tap): its JSON answer, or None."""
        return self._ask(b"C" + json.dumps(msg).encode())

    def merge_status(self, st: dict[str, Any], child: dict[str, Any]) -> None:
        merge_status(st, child)

    def pause(self) -> None:
        """A reload begins (bridge/io/live.py): the parent renumbers its peers next; the
        shared slots are in the child's numbering until `reload` returns."""
        self._paused = True

    def resume(self) -> None:
        """The reload did not happen: the slots are still in the current numbering."""
        self._paused = False

    def reload(self, config: Config, now: float) -> str | None:
        """Have the child take `config` (bridge/reconfig.py, with the parent's `now`, so a
        new peer's liveness clock is the same in both); None when done, else what failed.
        The parent has reconfigured itself (with the lock, after `pause`)."""
        s = self._sock
        try:
            if s is None:
                return "no receiving process"
            if len(config.peers) > self.shared.capacity:
                return f"more than {self.shared.capacity} peers"
            v = self.shared.v
            for i in range(self.shared.capacity):  # MTUs in the new numbering: none yet
                v[2 * i + 1] = 0.0
            with self._qlock:
                try:
                    s.send(b"R" + pickle.dumps((config, now)))
                    if not select.select([s], [], [], RELOAD_TIMEOUT_S)[0]:
                        return f"receiving process {self.pid} did not answer"
                    got = s.recv(1 << 16).decode(errors="replace")
                except OSError as e:
                    return f"receiving process {self.pid}: {e}"
            if got != "ok":
                return got
            for i, p in enumerate(self.bridge.peers):  # the MTUs in the new numbering
                v[2 * i + 1] = float(p.mtu + p.overhead)
            return None
        finally:
            self._paused = False

    def stop(self) -> None:
        if not self.pid:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            time.sleep(0.01)
        else:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.pid = 0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    # -- child ----------------------------------------------------------------------------

    def _child(self, sock: socket.socket, ppid: int, e: Engine, run_data: DataRunner,
               writer_threads: bool, chan: socket.socket) -> None:  # pragma: no cover
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != ppid:
            return  # the parent died before the line above
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        # a hang-up of the process group (or `kill -HUP -PGID`) is the parent's to handle
        # (`grebe up` reloads): by default it would kill this child, and with it the endpoint
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        e.bridge.rx_only = True
        wake = e.wakeup.fileno()
        if writer_threads:
            e.start_writers()
        v = self.shared.v
        peers = e.bridge.peers  # changed in place by a reload (bridge/reconfig.py)

        def pump(limit: int) -> int:
            got: int = e.pump_udp(limit)
            if got:
                for i, p in enumerate(list(peers)):
                    v[2 * i] = p.last_rx
            return got

        wm = e.warmer
        stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        th = threading.Thread(target=run_data,
                              args=(e, e.udp.fileno(), pump, "udp->tun",
                                    wm.udp if wm else None),
                              kwargs={"stop_fd": stop_fd}, name="udp->tun", daemon=True)
        th.start()
        link = e.bridge.secure
        take_keys: Any = None
        if link is not None and e.secure_udp is not None and self.sec_shared is not None:
            chan.setblocking(False)
            drops = link.ep.drops

            def up(msg: Any) -> None:
                if not _send(chan, msg, block=msg[0] != "H"):
                    drops["rate_limited"] += 1  # the parent is behind on handshakes

            link.split(CHILD, up)
            sv = self.sec_shared.v

            def take_keys_() -> None:
                with e.lock:  # drained and applied under the lock: in order
                    for msg in _drain(chan):
                        if msg[0] == "K":
                            link.apply_keys(msg[1])

            take_keys = take_keys_

            def pump_secure(limit: int) -> int:
                take_keys_()  # what the parent handed over before this batch left it
                got: int = e.pump_secure(limit)
                if got:
                    with e.lock:
                        times = link.rx_times()
                        for i, p in enumerate(list(peers)):
                            v[2 * i] = p.last_rx
                    for i, last, data in times:
                        sv[2 * i] = last
                        if data > sv[2 * i + 1]:
                            sv[2 * i + 1] = data
                return got

            ts = threading.Thread(target=run_data,
                                  args=(e, e.secure_udp.fileno(), pump_secure, "secure->tun",
                                        wm.udp if wm else None),
                                  kwargs={"stop_fd": stop_fd}, name="secure->tun", daemon=True)
            ts.start()
        mtus = [0.0] * self.shared.capacity
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(wake, select.POLLIN)
        if take_keys is not None:
            poller.register(chan, select.POLLIN)
        out = Output()
        while True:
            now = e.clock()
            with e.lock:
                t = e.bridge.get_timer()
                if t is not None and t <= now:
                    e.bridge.handle_timer(now, out)
                    t = e.bridge.get_timer()
                for i in range(len(peers)):
                    m = v[2 * i + 1]
                    if m and m != mtus[i]:
                        mtus[i] = m
                        with contextlib.suppress(ValueError):
                            e.bridge.set_path_mtu(int(m), peers[i].addr)
            e.execute(out)
            e.wakeup.arm(t)
            timeout = SYNC_S if t is None else min(SYNC_S, max(0.0, t - e.clock()))
            for fd, ev in poller.poll(timeout * 1000):
                if fd == wake:
                    e.wakeup.clear()
                    continue
                if fd == chan.fileno():  # keys while no secure datagram comes
                    if ev & (select.POLLHUP | select.POLLERR):
                        return
                    if take_keys is not None:
                        take_keys()
                    continue
                if ev & (select.POLLHUP | select.POLLERR):
                    return  # the parent is gone
                try:
                    req = sock.recv(1 << 20)
                except OSError:
                    return
                if not req:
                    return
                if req[:1] == b"C":  # bridge/io/capture.py: arm or disarm this side's tap
                    from bridge.io.capture import arm

                    answer = arm(e, json.loads(req[1:])["capture"])
                    sock.send(json.dumps(answer).encode())
                    continue
                if req[:1] == b"R":  # a reload: the parent's config and clock
                    sock.send(_reload(e, req[1:], v, mtus).encode())
                    continue
                sock.send(json.dumps(_export(e)).encode())


def _send(chan: socket.socket, msg: Any, block: bool = True) -> bool:
    """One message on the secure channel (a socket pair between our own two processes).
    Keys, confirmations and roaming wait for room (up to RELOAD_TIMEOUT_S: the other
    side drains the channel before every batch); forwarded handshakes (`block` False) do
    not: a handshake flood must not stall the child's data path. False: not sent."""
    data = pickle.dumps(msg)
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while True:
        try:
            chan.send(data)
            return True
        except BlockingIOError:
            if not block or time.monotonic() > deadline:
                if block:
                    log.warning("secure channel full for %.0f s: message lost", RELOAD_TIMEOUT_S)
                return False
            select.select([], [chan], [], QUERY_TIMEOUT_S)
        except OSError:
            return False  # the other process is gone; the parent notices and stops


def _drain(chan: socket.socket) -> list[Any]:
    """Every message waiting on the secure channel (non-blocking)."""
    got: list[Any] = []
    while True:
        try:
            data = chan.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return got
        except OSError:
            return got
        if not data:
            return got
        got.append(pickle.loads(data))  # noqa: S301 - our own other process, a socketpair


def _reload(e: Engine, data: bytes, v: memoryview[float], mtus: list[float]
            ) -> str:  # pragma: no cover - the child's side of reload()
    """Reconfigure the child's Bridge as the parent did its own, then write each peer's
    last-heard time in the new numbering; "ok" or what failed."""
    try:
        config, now = pickle.loads(data)  # noqa: S301 - our own parent, over a socketpair
        with e.lock:
            reconfigure(e.bridge, config, now)
            if e.warmer is not None:
                e.warmer.rebuild()
            for i, p in enumerate(e.bridge.peers):
                v[2 * i] = p.last_rx
                mtus[i] = 0.0
    except Exception as ex:  # noqa: BLE001 - reported to the parent, which logs it
        return f"receiving process: {type(ex).__name__}: {ex}"
    return "ok"


def _export(e: Engine) -> dict[str, Any]:  # pragma: no cover - the child's side of query()
    with e.lock:
        c = e.bridge.counters.export()
        seq = [[len(p.seq.held), p.seq.flushes] for p in e.bridge.peers]
        scrub = e.bridge.scrub.export() if e.bridge.scrub is not None else None
    c["events"][E_PEER_UP] = c["events"][E_PEER_DOWN] = 0  # liveness is the parent's
    w = e.warmer
    io = dict(e.stats, internal_errors=e.internal_errors,
              keep_warm_ticks=w.ticks if w is not None else 0)
    sec = e.bridge.secure
    return {"counters": c, "seq": seq, "io": io, "scrub": scrub,
            "secure": sec.counts() if sec is not None else None}


def merge_status(st: dict[str, Any], child: dict[str, Any]) -> None:
    """Add the child's counters (`_export`) to the parent's status, in place."""
    c = child.get("counters", {})
    for name, n in zip(DROP_REASONS, c.get("drops", []), strict=False):
        st["drops"][name] = st["drops"].get(name, 0) + n
    for name, n in zip(EVENTS, c.get("events", []), strict=False):
        st["events"][name] = st["events"].get(name, 0) + n
    seq = child.get("seq", [])
    for i, p in enumerate(st.get("peers", [])):
        for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
            vals = c.get(k, [])
            if i < len(vals):
                p[k] = p.get(k, 0) + vals[i]
        if i < len(seq) and isinstance(p.get("sequence"), dict):
            p["sequence"]["held"], p["sequence"]["flushes"] = seq[i]
    scrub = child.get("scrub")  # issue 12: inbound [[scrub]] rules run in the child
    if scrub and st.get("scrub"):
        for rule, m, d in zip(st["scrub"], scrub.get("matched", []), scrub.get("dropped", []),
                              strict=False):
            rule["matched"] += m
            rule["dropped"] += d
    sec = child.get("secure")  # secure peers: the child opens, so it counts most drops
    if sec and isinstance(st.get("secure"), dict):
        for part in ("drops", "events"):
            mine = st["secure"].setdefault(part, {})
            for k, n in sec.get(part, {}).items():
                mine[k] = mine.get(k, 0) + n
    io = st.setdefault("io", {})
    for k, n in child.get("io", {}).items():
        if isinstance(n, int) and not isinstance(n, bool):
            io[k] = io.get(k, 0) + n
    io["processes"] = 2
