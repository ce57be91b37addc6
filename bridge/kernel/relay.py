"""Kernel termination backend: nftables TPROXY + IP_TRANSPARENT sockets + an asyncio relay.

This is an I/O adapter (like bridge/io/): the decisions live in bridge/flows.py (which flows)
and bridge/inspect/ (what happens to their bytes); this module moves bytes between sockets.

Rules
- Runs inside the gateway's network namespace and changes only that namespace. At start it
  loads one nftables table (`inet grebe_tproxy`, via `nft -f -`: nftables is not netlink
  routing) and adds, with pyroute2, one policy rule per family (`fwmark MARK lookup TABLE`) and
  a `local default dev lo` route in TABLE; at exit it removes exactly those (and a stale table
  of the same name left by a crashed run is replaced).
- Interception (kernel Documentation/networking/tproxy.rst): in prerouting, a packet that
  belongs to an existing transparent socket is marked (`socket transparent 1`) and a new flow a
  kernel rule selects is handed to our listener (`tproxy ... to :PORT`), both marked so that
  the policy route delivers them locally. Rules keep the first-match order of `[[inspect]]`:
  a userspace-backend or `action = "forward"` rule in front of a kernel rule becomes an
  `accept` carve-out; `action = "drop"` kernel rules answer the SYN with an RST (RFC 9293
  §3.10.7.1, nft `reject with tcp reset`, counted as `rejected`). Only packets arriving on a
  rule's `iif` (else `iifnames`, the LAN side) are intercepted when given, and only a
  connection's first SYN is selected: connections open before the backend started pass
  untouched (as in flows.py).
- The listener (v4 and v6, IP_TRANSPARENT / IPV6_TRANSPARENT) reads the original destination
  with getsockname(). For each accepted flow the upstream socket is IP_TRANSPARENT and bound to
  the client's own address, so the server sees the client; its packets leave through the
  normal routing (the WAN in a plain lab, the grebe TUN on a grebe gateway) and the replies,
  addressed to the client, are caught by the `socket transparent` rule.
- Relay: bytes pass through the rule's InspectorChain each way. A FIN is propagated as a FIN
  (shutdown(SHUT_WR)) after whatever the chain still holds; an RST (ECONNRESET) is propagated
  as an RST (SO_LINGER 0 + close); an inspector RESET or a Deny resets the client (and the
  server if connected). Back-pressure: a side's write buffer is bounded by the rule's
  `max_buffer`; when it fills, we stop reading from the other side until it drains.
- A failed upstream connect (refused, unreachable, timeout) resets the client: the client
  sees what it would have seen without us (RST), a little later.
- A flow idle in both directions for its rule's `idle_timeout` (default 7200 s) is reset both
  ways and ends with close reason "idle" (counted, logged).
- Writers (log, pcap) flush on a timer in a worker thread, never in a hook.
- `grebe up` runs this backend on a thread for its kernel rules (bridge/kernel/run.py);
  `python -m bridge.kernel` stays as a standalone tool and stands by, installing nothing, when
  the namespace already has the table (a second instance must not replace or delete it).
- SIGHUP reloads the rules without dropping flows: new flows follow the new rules, live ones
  keep their inspectors; a bad file is refused and logged, the old rules stay.

Theory of operation
`TproxyBackend.start()` installs the interception, opens the listeners with
`loop.create_server(sock=...)` and starts the flush timer. Each accepted connection gets a
`Relay`: two `_Side` protocols around an `InspectSession` (bridge/inspect/session.py, the
sans-I/O flow life shared with the userspace splice), whose answers it performs on the
sockets: write the bytes, shutdown(SHUT_WR) after them, close both, or reset both. The
client side is paused until flow_start allowed the flow and the upstream connected.
`status()` gives the counters and the live flows with both sockets' TCP_INFO
(bridge/kernel/info.py). `stop()` closes the listeners, ends every relay
(CloseReason.SHUTDOWN), closes the inspectors and removes the interception.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import struct
import sys
import time
import tomllib
from collections.abc import Sequence
from typing import Any

from bridge.errors import ConfigError, ConfigErrors
from bridge.flows import (
    DEFAULT_IDLE_TIMEOUT,
    KERNEL_MAX_BUFFER,
    Backend,
    FlowSelector,
    InspectRule,
    Verdict,
    flow_key,
    selector_for,
)
from bridge.inspect.api import CloseReason, Direction, Flow
from bridge.inspect.manager import InspectorChain, InspectorManager
from bridge.inspect.rules import parse_rules
from bridge.inspect.session import Abort, InspectSession
from bridge.kernel.info import flow_record, summary
from bridge.kernel.setup import (
    TproxySettings,
    nft_apply,
    nft_delete,
    nft_ruleset,
    nft_table_exists,
    policy_routing,
)

__all__ = ["TproxyBackend", "TproxySettings", "Relay", "load_rules", "main", "nft_delete",
           "nft_ruleset"]

log = logging.getLogger("grebe.tproxy")

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
_LINGER0 = struct.pack("ii", 1, 0)


# ---------------------------------------------------------------------------------------------
# The relay
# ---------------------------------------------------------------------------------------------

def _abort(transport: asyncio.BaseTransport | None) -> None:
    """Close with an RST (SO_LINGER 0), RFC 9293 §3.10.4 ABORT."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
    transport.abort()  # type: ignore[attr-defined]


class _Side(asyncio.Protocol):
    """One socket of a relayed flow. `incoming` is the direction of the bytes it reads."""

    def __init__(self, relay: Relay, incoming: Direction) -> None:
        self.relay = relay
        self.incoming = incoming
        self.transport: asyncio.Transport | None = None
        self.eof = False        # the peer of this socket sent FIN
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        high = self.relay.chain.rule.max_buffer if self.relay.chain else KERNEL_MAX_BUFFER
        transport.set_write_buffer_limits(high=high, low=high // 4)

    def data_received(self, data: bytes) -> None:
        self.relay.on_data(self, data)

    def eof_received(self) -> bool:
        self.relay.on_eof(self)
        return True             # keep the socket open for the other direction (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.on_lost(self, exc)

    def pause_writing(self) -> None:
        self.relay.other(self).pause()

    def resume_writing(self) -> None:
        self.relay.other(self).resume()

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class Relay:
    """One inspected flow: client socket <-> InspectSession (chain) <-> upstream socket."""

    def __init__(self, backend: TproxyBackend, flow: Flow, chain: InspectorChain | None) -> None:
        self.backend = backend
        self.flow = flow
        self.chain = chain
        self.session = InspectSession(flow, chain)
        self.created = flow.start
        self.client = _Side(self, Direction.CLIENT_TO_SERVER)
        self.server = _Side(self, Direction.SERVER_TO_CLIENT)
        self._done = False

    @property
    def finished(self) -> bool:
        return self.session.finished

    def other(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client

    def receiver(self, direction: Direction) -> _Side:
        return self.server if direction is Direction.CLIENT_TO_SERVER else self.client

    def on_data(self, side: _Side, data: bytes) -> None:
        out = self.session.received(side.incoming, data, time.monotonic())
        if isinstance(out, Abort):
            self.reset_both(out.reason)
        elif out:
            self.deliver(side.incoming, out)

    def on_eof(self, side: _Side) -> None:
        now = time.monotonic()
        session = self.session
        tail = session.eof(side.incoming, now)
        if isinstance(tail, Abort):
            self.reset_both(tail.reason)
            return
        if tail is None:
            return
        if tail:
            self.deliver(side.incoming, tail)
        dst = self.receiver(side.incoming).transport
        if dst is not None and not dst.is_closing() and dst.can_write_eof():
            dst.write_eof()     # RFC 9293 §3.6: half-close, the other way stays open
        if session.both_ended:
            # both FINs passed on: close() flushes what is still buffered, then the flow ends
            for s in (self.client, self.server):
                if s.transport is not None and not s.transport.is_closing():
                    s.transport.close()
            stop = session.close(now)
            if stop is not None:
                self.reset_both(stop.reason)
            else:
                self.ended(CloseReason.CLOSED)

    def on_lost(self, side: _Side, exc: Exception | None) -> None:
        # Lost before the session finished: the peer reset, or the socket failed.
        stop = self.session.reset(side.incoming, time.monotonic())
        if stop is not None:
            self.reset_both(stop.reason)

    def abort(self, reason: CloseReason) -> None:
        stop = self.session.abort(reason, time.monotonic())
        if stop is not None:
            self.reset_both(stop.reason)

    def deliver(self, direction: Direction, data: bytes) -> None:
        dst = self.receiver(direction).transport
        if dst is not None and not dst.is_closing():
            dst.write(data)

    def reset_both(self, reason: CloseReason) -> None:
        """The session ended the flow with an abort: RST both sockets."""
        _abort(self.client.transport)
        _abort(self.server.transport)
        self.ended(reason)

    def ended(self, reason: CloseReason) -> None:
        if self._done:
            return
        self._done = True
        self.backend.relays.pop(self.flow.id, None)
        key = (self.flow.close_reason or reason).value
        counters = self.backend.counters
        counters[key] = counters.get(key, 0) + 1
        counters["bytes_c2s"] += self.flow.bytes_c2s
        counters["bytes_s2c"] += self.flow.bytes_s2c


class _Accepted(asyncio.Protocol):
    """Protocol of a freshly accepted client socket until its Relay takes over."""

    def __init__(self, backend: TproxyBackend) -> None:
        self.backend = backend
        self.side: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        try:
            self.side = self.backend.accepted(transport)
        except Exception:  # noqa: BLE001 - one bad connection must not stop the listener
            self.backend.counters["relay_errors"] += 1
            log.exception("cannot relay connection from %s",
                          transport.get_extra_info("peername"))
            _abort(transport)

    def data_received(self, data: bytes) -> None:
        if self.side is not None:
            self.side.data_received(data)

    def eof_received(self) -> bool:
        return self.side.eof_received() if self.side is not None else False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side is not None:
            self.side.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.side is not None:
            self.side.pause_writing()

    def resume_writing(self) -> None:
        if self.side is not None:
            self.side.resume_writing()


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------

class TproxyBackend:
    """Owns the interception, the listeners and the live relays."""

    def __init__(self, rules: Sequence[InspectRule], settings: TproxySettings | None = None,
                 *, install: bool = True) -> None:
        self.rules = tuple(rules)
        self.settings = settings or TproxySettings()
        self.install = install
        self.selector: FlowSelector = selector_for(self.rules, Backend.KERNEL)
        self.manager = InspectorManager(self.rules)
        self._retired: list[InspectorManager] = []
        self.relays: dict[int, Relay] = {}
        self.counters: dict[str, int] = dict.fromkeys(
            ("accepted", "unmatched", "relay_errors", "bytes_c2s", "bytes_s2c"), 0)
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._idler: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[None] | None = None
        self._installed = False
        self.listening: list[tuple[str, int]] = []

    async def start(self) -> None:
        """Install nft + policy routing, listen, start flushing. Undoes itself on failure."""
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            if self.install:
                # pyroute2's sync IPRoute runs its own event loop: give it a thread.
                await loop.run_in_executor(None, policy_routing, "add", s)
                self._installed = True
                nft_apply(nft_ruleset(self.rules, s))
            for family, addr, opt_level, opt in (
                    (socket.AF_INET, "0.0.0.0", socket.SOL_IP, IP_TRANSPARENT),
                    (socket.AF_INET6, "::", socket.IPPROTO_IPV6, IPV6_TRANSPARENT)):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if s.transparent:
                    sock.setsockopt(opt_level, opt, 1)
                sock.bind((addr, s.port))
                sock.listen(s.backlog)
                self.listening.append(sock.getsockname()[:2])
                sock.setblocking(False)
                self._servers.append(await loop.create_server(
                    lambda: _Accepted(self), sock=sock, backlog=s.backlog))
        except BaseException:
            await self.stop()
            raise
        self._flusher = loop.create_task(self._flush_loop())
        self._idler = loop.create_task(self._idle_loop())
        log.info("tproxy listening on :%d (mark 0x%x, table %d)", s.port, s.mark, s.table)

    def accepted(self, transport: asyncio.Transport) -> _Side:
        """A client connection arrived: build its flow and relay, start the upstream."""
        self.counters["accepted"] += 1
        peer = transport.get_extra_info("peername")
        orig = self.original_destination(transport)
        key = flow_key(peer[0], orig[0], peer[1], orig[1])
        verdict, rule = self.selector.classify(key)
        chain = None
        if verdict is Verdict.INSPECT and rule is not None:
            chain = self.manager.chain(rule.name)
        else:
            self.counters["unmatched"] += 1     # nft sent it, no rule now: relay untouched
        flow = Flow(key, rule.name if rule else "-", "kernel", time.monotonic())
        relay = Relay(self, flow, chain)
        self.relays[flow.id] = relay
        relay.client.connection_made(transport)
        task = asyncio.get_running_loop().create_task(self._open_upstream(relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return relay.client

    def original_destination(self, transport: asyncio.Transport) -> tuple[str, int]:
        """Where the client was going: TPROXY keeps it as our socket's local address."""
        name = transport.get_extra_info("sockname")
        return name[0], name[1]

    async def _open_upstream(self, relay: Relay) -> None:
        flow = relay.flow
        if not relay.session.start(time.monotonic()):
            _abort(relay.client.transport)      # denied at flow start
            relay.ended(CloseReason.DENIED)
            return
        family = socket.AF_INET if flow.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if not self.settings.transparent:
                pass
            elif family == socket.AF_INET:
                sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            sock.bind((flow.src, 0))        # the server sees the client's address
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (flow.dst, flow.dport)),
                                   self.settings.connect_timeout)
            await loop.create_connection(lambda: relay.server, sock=sock)
        except (TimeoutError, OSError) as exc:
            sock.close()
            self.counters["relay_errors"] += 1
            flow.metadata["connect_error"] = repr(exc)
            relay.abort(CloseReason.CONNECT_FAILED)
            return
        if relay.finished:      # the client went away meanwhile
            _abort(relay.server.transport)
            return
        relay.session.opened()
        relay.client.resume()

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.flush_interval)   # a timer, not a wait
            self._flushing = loop.run_in_executor(None, self._flush_all)
            await self._flushing
            self._flushing = None

    def expire_idle(self, now: float) -> int:
        """Reset the flows idle in both directions for their rule's `idle_timeout`.

        TCP itself has no idle limit (RFC 9293 §3.8.4 keep-alives are optional and off by
        default): like a stateful firewall we bound the state a silent flow holds, and end it
        with an RST both ways so that neither end waits on a dead relay. Returns how many.
        """
        gone = 0
        for relay in list(self.relays.values()):
            limit = relay.chain.rule.idle_timeout if relay.chain else DEFAULT_IDLE_TIMEOUT
            if not relay.finished and now - relay.flow.last_seen >= limit:
                log.info("tproxy: flow %d %s:%d -> %s:%d idle for %.0fs: reset",
                         relay.flow.id, relay.flow.src, relay.flow.sport, relay.flow.dst,
                         relay.flow.dport, now - relay.flow.last_seen)
                relay.abort(CloseReason.IDLE)
                gone += 1
        return gone

    def _idle_tick(self) -> float:
        """Scan often enough to reset a flow within a quarter of its timeout (at most 1 s)."""
        shortest = min((r.idle_timeout for r in self.rules), default=DEFAULT_IDLE_TIMEOUT)
        return min(1.0, shortest / 4)

    async def _idle_loop(self) -> None:
        while True:
            await asyncio.sleep(self._idle_tick())     # a timer, not a wait for a condition
            self.expire_idle(time.monotonic())

    def reload(self, rules: Sequence[InspectRule]) -> None:
        """Hot reload: new flows follow `rules`; live flows keep their chain until they end.

        Loads the new inspectors first (a ConfigError leaves everything as it was), then
        replaces the nft table in one transaction. Old inspectors are flushed and closed at stop.
        """
        manager = InspectorManager(rules)
        if self._installed:
            nft_apply(nft_ruleset(tuple(rules), self.settings))
        self._retired.append(self.manager)
        self.rules = tuple(rules)
        self.selector = selector_for(self.rules, Backend.KERNEL)
        self.manager = manager
        self.counters["reloads"] = self.counters.get("reloads", 0) + 1
        log.info("tproxy: reloaded %d rule(s)", len(self.rules))

    def _flush_all(self) -> None:
        for manager in (*self._retired, self.manager):
            manager.flush()

    def status(self, rejected: int | None = None) -> dict[str, Any]:
        """JSON-able state: summary, counters, per-rule chain counters, live flows with the
        kernel's TCP_INFO of both legs. Call it on the backend's loop (it reads live state).
        `rejected` is the nft drop rules' counter (bridge.kernel.setup.nft_rejected)."""
        now = time.monotonic()
        live = list(self.relays.values())
        return {"summary": summary(self.counters, len(live),
                                   sum(r.flow.bytes_c2s for r in live),
                                   sum(r.flow.bytes_s2c for r in live), rejected),
                "counters": dict(self.counters), "rules": self.manager.counters(),
                "flows": [flow_record(r, now) for r in live]}

    async def stop(self) -> None:
        """Stop listening, end every relay (SHUTDOWN), flush and remove the interception."""
        for server in self._servers:
            server.close()
        self._servers.clear()
        for timer in (self._flusher, self._idler):
            if timer is not None:
                timer.cancel()
        self._flusher = self._idler = None
        if self._flushing is not None:      # let a flush in its thread finish: one writer
            await asyncio.wait([self._flushing])
            self._flushing = None
        for relay in list(self.relays.values()):
            relay.abort(CloseReason.SHUTDOWN)
        for task in list(self._tasks):
            task.cancel()
        for manager in (*self._retired, self.manager):
            manager.close()
        self._retired.clear()
        if self._installed:
            self._installed = False
            try:
                nft_apply(nft_delete(self.settings))
            except RuntimeError as exc:
                log.warning("%s", exc)
            await asyncio.get_running_loop().run_in_executor(None, policy_routing, "del",
                                                             self.settings)


# ---------------------------------------------------------------------------------------------
# Command line: python -m bridge.kernel -c endpoint.toml
# ---------------------------------------------------------------------------------------------

def load_rules(path: str) -> tuple[InspectRule, ...]:
    """The `[[inspect]]` rules of an endpoint TOML file. Raises ConfigError(s)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    try:
        return parse_rules(data.get("inspect", []), "inspect")
    except ConfigError as exc:
        exc.file = path
        raise
    except ConfigErrors as exc:   # several, reported together
        for e in exc.errors:
            e.file = path
        raise ConfigErrors(exc.errors) from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.kernel",
                                description="grebe kernel termination backend (TPROXY)")
    p.add_argument("-c", "--config", required=True, help="endpoint TOML with [[inspect]] rules")
    defaults = TproxySettings()
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--iif", action="append", default=[], help="intercept only on this interface")
    p.add_argument("--mark", type=lambda v: int(v, 0), default=defaults.mark)
    p.add_argument("--table", type=int, default=defaults.table)
    p.add_argument("--ready-file", help="touch this file once listening")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose:
        logging.getLogger("grebe").setLevel(logging.DEBUG)
    try:
        rules = load_rules(args.config)
    except (ConfigError, ConfigErrors, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"grebe tproxy: {exc}", file=sys.stderr)
        return 2
    if not any(r.backend is Backend.KERNEL and r.action is Verdict.INSPECT for r in rules):
        print("grebe tproxy: no [[inspect]] rule with backend = \"kernel\"", file=sys.stderr)
        return 2
    settings = TproxySettings(port=args.port, mark=args.mark, table=args.table,
                              iifnames=tuple(args.iif))
    return asyncio.run(_serve(rules, settings, args.ready_file, args.config))


def reload_rules(backend: TproxyBackend, path: str) -> None:
    """SIGHUP: re-read the rules; a bad file is reported and the old rules stay."""
    try:
        backend.reload(load_rules(path))
    except (ConfigError, ConfigErrors, OSError, tomllib.TOMLDecodeError, RuntimeError) as exc:
        log.error("tproxy: reload of %s refused, keeping the old rules: %s", path, exc)


async def _serve(rules: Sequence[InspectRule], settings: TproxySettings,
                 ready_file: str | None, config_path: str | None = None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if await loop.run_in_executor(None, nft_table_exists, settings):
        # `grebe up` runs the backend for its kernel rules (bridge/kernel/run.py): a second
        # instance must neither replace its rules nor, failing to bind, delete them. Stand by
        # until told to stop, so that scripts which still start this tool keep working.
        log.warning("tproxy: table inet %s exists: the kernel backend already runs in this "
                    "namespace (grebe up starts it); standing by, nothing installed",
                    settings.nft_table)
        if ready_file:
            with open(ready_file, "w") as f:
                f.write(f"{settings.port}\n")
        await stop.wait()
        return 0
    backend = TproxyBackend(rules, settings)
    await backend.start()
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_rules, backend, config_path)
    if ready_file:
        with open(ready_file, "w") as f:
            f.write(f"{settings.port}\n")
    try:
        await stop.wait()
    finally:
        await backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
