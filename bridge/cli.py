"""`grebe`: the command line. One function per subcommand, registered in `COMMANDS`.

    grebe up NAME | -c FILE                run an endpoint in the foreground (NAME:
                                           /etc/grebe/NAME.toml); systemd: Type=notify
    grebe status [--json] [-i TUN | -s SOCKET]   peers, traffic, drops by reason
    grebe reload [-i TUN | -s SOCKET]      re-read the file (as SIGHUP); exit 2 if refused
    grebe check-config FILE                every error with its key path; exit 2 if any
    grebe --version

Exit status: 0 fine, 1 could not run (permissions, an address in use or missing: one line
naming the key, never a traceback), 2 the configuration is wrong (`check-config` and `up`).
    grebe flows [--json] [-i TUN | -s SOCKET]    inspected TCP flows, both backends
    grebe pair DESCRIPTION [--out DIR] [--endpoint SITE=HOST[:PORT]] [--full-tunnel SITE]
                                           every site's endpoint file from one description
    grebe deploy INVENTORY [ACTION]        up|push|start|stop|restart|status on N hosts (SSH)

Subcommands are registered with `register(name, setup, run)`:
`setup(parser)` declares its arguments, `run(args) -> int` is the exit status.

Logs go through `logging` to stderr, one line per state change (never per packet).
SIGTERM and SIGINT stop `up` cleanly: routes and the TUN are removed, exit status 0.
With kernel-backend `[[inspect]]` rules `up` also runs the TPROXY backend (bridge/kernel/run.py)
and removes its nft table and policy rules on exit.
SIGHUP (and `grebe reload`) re-reads the file and never stops the endpoint (bridge/reload.py,
bridge/io/live.py, on a thread of its own for SIGHUP): a bad file is refused with its errors;
peers, [[inspect]] rules and mss_clamp are applied live; what truly needs a restart is named.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bridge import configdocs, ctl, deploy, pair
from bridge.errors import EXIT_CONFIG, EXIT_FAILED
from bridge.io import capture
from bridge.io.adapters import GroBatchFactory, TsoFrameFactory

log = logging.getLogger("grebe")

SUPER_PACKETS = os.environ.get("GREBE_SUPER_PACKETS", "1") == "1"  # bridge/gso.py fast path
GRO_BATCHES = os.environ.get("GREBE_GRO_BATCHES", "1") == "1"  # bridge/gso.py receive path

__all__ = ["main", "register", "COMMANDS", "EXIT_CONFIG", "EXIT_FAILED", "version"]

Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Setup, Run]] = {}


def register(name: str, help_text: str, setup: Setup, run: Run) -> None:
    """Add a subcommand (the table `main` builds its parser from)."""
    COMMANDS[name] = (help_text, setup, run)


# -- up ---------------------------------------------------------------------------------


CONFIG_DIR = os.environ.get("GREBE_CONFIG_DIR", "/etc/grebe")  # `grebe up NAME`


def _setup_up(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help=f"NAME for {CONFIG_DIR}/NAME.toml (as wg-quick "
                   "up wg0), or a path to the endpoint file")
    p.add_argument("-c", "--config", help="endpoint TOML file")
    p.add_argument("--no-offload", action="store_true",
                   help="no TUN vnet header/TSO and no UDP GSO/GRO (for comparison)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _underlay_mtu(cfg: Any) -> tuple[int | None, str]:
    from bridge.io.tun import route_mtu

    best: tuple[int, str] | None = None
    for peer in cfg.peers:
        m = route_mtu(peer.host)
        if m is not None and (best is None or m < best[0]):
            best = (m, f"route to {peer.host} (peer {peer.name})")
    if best is None:
        return None, f"pmtu.underlay_mtu {cfg.pmtu.underlay_mtu} (no route found)"
    return best


def core_batches(offload: bool) -> tuple[TsoFrameFactory | None, GroBatchFactory | None]:
    """The factories `grebe up` gives its adapters so that the core takes TSO frames and GRO
    buffers whole (bridge/gso.py SuperPacket, GroBatch): none without offload, and each off
    with GREBE_SUPER_PACKETS=0 / GREBE_GRO_BATCHES=0. GRO batches need the vnet-header TUN
    that offload opens: the core answers them with TunFrames."""
    from bridge.gro import GroBatch
    from bridge.gso import SuperPacket

    return (SuperPacket if offload and SUPER_PACKETS else None,
            GroBatch if offload and GRO_BATCHES else None)


def config_path(name: str) -> str:
    """`grebe up NAME`: a path as given when it looks like one (a "/", a ".toml" suffix or an
    existing file), else CONFIG_DIR/NAME.toml."""
    if "/" in name or name.endswith(".toml") or os.path.exists(name):
        return name
    return os.path.join(CONFIG_DIR, f"{name}.toml")


def cmd_up(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.errors import ConfigErrors
    from bridge.io.resolve import resolve

    if args.config is None:
        if args.name is None:
            log.error("grebe up: give a NAME (%s/NAME.toml) or -c FILE", CONFIG_DIR)
            return EXIT_CONFIG
        args.config = config_path(args.name)
    elif args.name is not None:
        log.error("grebe up: give a NAME or -c FILE, not both")
        return EXIT_CONFIG
    try:
        cfg = load_config(args.config, resolve)  # endpoint host names: bridge/io/resolve.py
    except ConfigErrors as e:
        for err in e.errors:
            log.error("%s", err)
        return EXIT_CONFIG
    try:
        return _run_up(args, cfg)
    except OSError as e:   # everyday mistakes: one line naming what failed, no traceback
        log.error("%s", _os_error_line(e, cfg))
        return EXIT_FAILED


def _os_error_line(e: OSError, cfg: Any) -> str:
    """One clear line for an OSError of `grebe up` (what failed, the key to look at)."""
    import errno

    what = str(e.filename) if e.filename else ""
    text = e.strerror or str(e)
    if e.errno in (errno.EPERM, errno.EACCES):
        return (f"{what or 'setup'}: {text}: grebe up needs root or CAP_NET_ADMIN "
                "(and read/write access to /dev/net/tun)")
    return f"{what + ': ' if what else ''}{text}"


def _bind_error(e: OSError, key: str, value: str) -> OSError:
    """The OSError of a bind(), rewritten to name the configuration key at fault."""
    import errno

    hint = {errno.EADDRINUSE: "address already in use (another grebe, or another program?)",
            errno.EADDRNOTAVAIL: "this host has no such address"}.get(e.errno or 0,
                                                                    e.strerror or str(e))
    return OSError(e.errno, f"{key} {value}: {hint}")


def _run_up(args: argparse.Namespace, cfg: Any) -> int:
    from bridge.io.control import ControlServer, MetricsServer, socket_name
    from bridge.io.live import full_tunnel, reload_config
    from bridge.io.loop import Engine
    from bridge.io.metrics import io_prometheus
    from bridge.io.notify import notify, reloading
    from bridge.io.runner import Runner
    from bridge.io.tun import TunBusyError, TunDevice
    from bridge.io.udp import UdpEndpoint
    from bridge.io.warm import keep_heap
    from bridge.pipeline import Bridge

    keep_heap()  # before the fork of the UDP->TUN process (bridge/io/warm.py)
    offload = not args.no_offload
    underlay, source = _underlay_mtu(cfg)
    now = time.monotonic()  # wall_offset dates secure handshakes across restarts
    bridge = Bridge(cfg, now, underlay_mtu=underlay, wall_offset=time.time() - now)
    rekey = os.environ.get("GREBE_REKEY_AFTER")  # developer aid: short sessions (lab tests)
    if rekey and bridge.secure is not None:
        import dataclasses

        lim = bridge.secure.ep.limits
        bridge.secure.ep.limits = dataclasses.replace(
            lim, rekey_after_time=float(rekey), reject_after_time=float(rekey) * 1.5,
            responder_rekey_delay=min(lim.responder_rekey_delay, float(rekey) / 4))
    mtu = bridge.tun_mtu
    how = "configured" if cfg.tun.mtu else f"auto: underlay {underlay or cfg.pmtu.underlay_mtu}" \
        f" from {source}, minus encapsulation overhead"
    tso_frame, gro_batch = core_batches(offload)  # the core takes TSO frames, GRO buffers
    try:
        tun = TunDevice(cfg.tun.name, vnet_hdr=offload, tso_frame=tso_frame)
    except TunBusyError as e:
        log.error("%s", e.strerror)
        return EXIT_FAILED
    except PermissionError as e:
        log.error("cannot open /dev/net/tun (%s): grebe up needs root or CAP_NET_ADMIN and "
                  "read/write access to /dev/net/tun", e.strerror)
        return EXIT_FAILED
    server = metrics = udp = sudp = kernel = fast = None
    failed = False
    try:
        tun.full_tunnel = (cfg.tun.table, cfg.tun.fwmark)  # a /0 prefix: bridge/io/policy.py
        tun.configure([str(a) for a in cfg.tun.addresses], mtu,
                      [str(n) for p in cfg.peers for n in p.prefixes])
        try:
            udp = UdpEndpoint(cfg.listen.address, cfg.listen.port, gso=offload, gro=offload,
                              gro_batch=gro_batch)
        except OSError as e:
            raise _bind_error(e, "listen", f"{cfg.listen.address} port {cfg.listen.port}"
                              ) from None
        if bridge.secure is not None:  # issue 12: the secure peers' own port
            try:
                # GRO batches too: each datagram is verified alone, and a batch that verified
                # whole takes the receive fast path (bridge/securelink.py `_open_run`)
                sudp = UdpEndpoint(cfg.listen.address, cfg.listen.secure_port, gso=offload,
                                   gro=offload, gro_batch=gro_batch, sport_pool=0)
            except OSError as e:
                raise _bind_error(e, "listen.secure_port",
                                  f"{cfg.listen.address} port {cfg.listen.secure_port}") from None
        if full_tunnel(cfg):  # bridge/io/policy.py: the tunnel's datagrams skip its route
            for sock in (udp, sudp):
                if sock is not None:
                    sock.set_mark(cfg.tun.fwmark)
        warm = cfg.keep_warm and os.environ.get("GREBE_KEEP_WARM", "1") == "1"
        # one process per direction (bridge/io/split.py); never with [[inspect]] rules.
        # Secure peers too: the child opens, the parent handshakes (bridge/secure/mirror.py)
        split = cfg.split_directions and not cfg.inspect \
            and os.environ.get("GREBE_SPLIT", "1") == "1"
        if cfg.split_directions and cfg.inspect:
            log.info("split_directions: one process, since [[inspect]] rules are set")
        sibling = None
        if split:
            from bridge.io.split import RxProcess

            sibling = RxProcess(bridge)
        from bridge.ebpf.hook import run_with, start_for_endpoint  # issue 14

        fast, fatal = start_for_endpoint(cfg, bridge)  # the eBPF fast path, or None
        if fatal is not None:
            log.error("%s", fatal)
            return EXIT_FAILED
        engine = Engine(bridge, tun, udp, keep_warm=warm, sibling=sibling, fast_path=fast,
                        secure_udp=sudp)
        if fast is not None:
            run_with(fast, bridge, engine)
        server = ControlServer(socket_name(cfg.tun.name, cfg.control_socket))

        def status(_req: dict[str, Any]) -> dict[str, Any]:
            st = engine.status()
            tun_info = st.setdefault("tun", {})
            tun_info.update(name=cfg.tun.name, mtu=bridge.tun_mtu, mtu_source=how,
                            offload=offload)
            st["io"].update(tun_bad_frames=tun.bad_frames, tun_write_errors=tun.write_errors,
                            udp_send_errors=dict(udp.send_errors), udp_gso=udp.gso,
                            udp_gro=udp.gro, control=dict(server.stats))
            if metrics is not None:
                st["io"]["metrics"] = dict(metrics.stats)
            return st

        server.register("status", status)
        capture.register(server, engine, cfg)  # `grebe capture` (bridge/io/capture.py)
        from bridge.io.flows import attach  # `flows` + inspector flushing (issue 4)

        detach = attach(engine, server)
        # kernel-backend [[inspect]] rules: TPROXY + relay on their own loop (bridge/tproxy_run)
        from bridge.kernel.run import start_for_config

        try:
            kernel = start_for_config(cfg, server)
        except (RuntimeError, OSError) as e:
            log.error("kernel inspection backend: %s", e)
            detach()
            return EXIT_FAILED
        extra = [(server.fileno(), server.on_readable)]
        if cfg.metrics_listen:
            def render() -> str:
                text = engine.metrics_text()
                text += io_prometheus(status({}), version())
                if kernel is not None:
                    from bridge.kernel.info import prometheus

                    text += prometheus(kernel.status(with_flows=False))
                return text

            try:
                metrics = MetricsServer(cfg.metrics_listen, render)
            except OSError as e:
                raise _bind_error(e, "metrics_listen", cfg.metrics_listen) from None
            extra.append((metrics.fileno(), metrics.on_readable))
        runner = Runner(engine, extra)

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            if kernel is not None:
                # the relays' RSTs to servers leave through the TUN: reset them (off the
                # signal handler, it waits on the backend's loop) while the data plane runs
                stopping = kernel

                def stop_kernel_first() -> None:
                    stopping.stop()
                    runner.stop()

                threading.Thread(target=stop_kernel_first, name="stop", daemon=True).start()
            else:
                runner.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        running = [cfg]
        one_reload = threading.Lock()  # `grebe reload` and SIGHUP, one at a time

        def reload(_req: dict[str, Any]) -> dict[str, Any]:
            with one_reload:
                answer, running[0] = reload_config(args.config, running[0], kernel, engine,
                                                   tun, [udp, sudp])  # bridge/io/live.py
            return answer

        def hup_reload() -> None:
            reloading()
            try:
                reload({})
            except Exception:  # a bug must not end the endpoint: logged, the old config runs
                log.exception("reload failed")
            notify("READY=1")

        def on_hup(_signum: int, _frame: Any) -> None:
            # Off the handler: it runs on the main thread between two bytecodes, maybe while
            # that thread holds the Engine's lock, which the reload takes.
            log.info("SIGHUP: reloading %s", args.config)
            threading.Thread(target=hup_reload, name="reload", daemon=True).start()

        server.register("reload", reload)
        signal.signal(signal.SIGHUP, on_hup)   # always: SIGHUP's default would kill us
        listen = (f"[{cfg.listen.address}]" if ":" in cfg.listen.address
                  else cfg.listen.address) + f":{cfg.listen.port}"
        log.info("grebe up: %s, listening %s, %d peer(s), tun mtu %d (%s), control %s%s",
                 cfg.tun.name, listen, len(cfg.peers), mtu, how,
                 server.name, f", metrics {cfg.metrics_listen}" if metrics else "")
        # What start-up built lives as long as the process: keep it out of the cyclic
        # collector's walks (a full collection over it took 6 ms here, a pause on the
        # packet path; frozen, ~0).
        gc.freeze()
        notify(f"READY=1\nSTATUS={cfg.tun.name}: {len(cfg.peers)} peer(s), listening {listen}")
        runner.run()
        notify("STOPPING=1")
        detach()  # reset the userspace-terminated flows, final flush of the inspectors
        failed = runner.failed
    finally:
        if fast is not None:
            fast.close()  # issue 14: the eBPF filters detached
        if kernel is not None:
            kernel.stop()   # relays reset, nft table + policy routing removed
        for x in (metrics, server, udp, sudp):
            if x is not None:
                x.close()
        tun.close()
        log.info("grebe down: %s removed", cfg.tun.name)
    return EXIT_FAILED if failed else 0


# -- check-config -----------------------------------------------------------------------


def _setup_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="endpoint TOML file")


def cmd_check_config(args: argparse.Namespace) -> int:
    from bridge.config import check_config
    from bridge.io.resolve import resolve

    errors = check_config(args.file, resolve)
    for e in errors:
        print(str(e), file=sys.stderr)
    if errors:
        print(f"{args.file}: {len(errors)} error(s)", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: OK")
    return 0


# -- genkey, pubkey (issue 12) -----------------------------------------------------------


def _setup_genkey(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="write the private key here (mode 0600, must not "
                   "exist) and print the public key; without it, print the private key")


def cmd_genkey(args: argparse.Namespace) -> int:
    """`grebe genkey [FILE]`: a new X25519 private key (as `wg genkey`)."""
    from bridge.secure.keys import genkey, write_private_key

    if args.file is None:
        print(genkey()[0])
        return 0
    try:
        print(write_private_key(args.file))
    except OSError as e:
        print(f"grebe: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _setup_pubkey(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", help="private key file (default: standard input)")


def cmd_pubkey(args: argparse.Namespace) -> int:
    """`grebe pubkey [FILE]`: the public key of a private key (as `wg pubkey`)."""
    from bridge.secure.keys import public_key_of

    try:
        if args.file is None:
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="ascii") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"grebe: {args.file}: {e}", file=sys.stderr)
        return 1
    pub = public_key_of(text)
    if pub is None:
        print("grebe: not a base64 32-byte private key", file=sys.stderr)
        return 1
    print(pub)
    return 0


register("up", "run an endpoint in the foreground", _setup_up, cmd_up)
register("status", "show peers, traffic and drops of a running endpoint", ctl.setup,
         ctl.cmd_status)
register("check-config", "validate an endpoint configuration file", _setup_check,
         cmd_check_config)
register("genkey", "new private key for a secure peer (file: write it, print the public key)",
         _setup_genkey, cmd_genkey)
register("pubkey", "print the public key of a private key", _setup_pubkey, cmd_pubkey)


def version() -> str:
    """The installed package's version (pyproject.toml), or the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("grebe")
    except PackageNotFoundError:
        return "0.1.0+source"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grebe", description="GRE/IPIP-over-UDP site bridge")
    parser.add_argument("--version", action="version", version=f"grebe {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        setup(p)
        p.set_defaults(func=run)
    return parser


register("reload", "re-read the configuration file of a running endpoint (as SIGHUP)",
         ctl.setup, ctl.cmd_reload)
register("flows", "show inspected TCP flows (both backends) of a running endpoint",
         ctl.setup, ctl.cmd_flows)
register("pair", "write the matching endpoint files of every site from one description",
         pair.setup, pair.run)
register("deploy", "push, start, stop and show grebe on the hosts of an inventory (SSH)",
         deploy.setup, deploy.run)
register("capture", "write what one peer sends and receives, outer and inner, to pcapng",
         capture.setup, capture.run)
register("docs", "write docs/config/ (a page per config key) from the key table",
         configdocs.setup, configdocs.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bridge.io.notify import log_format

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(log_format(sys.stderr))  # journald's own under systemd
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        handlers=[handler])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
