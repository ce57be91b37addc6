"""`grebe`: the command line. One function per subcommand, registered in `COMMANDS`.

    grebe up -c FILE                       run an endpoint in the foreground
    grebe status [--json] [-i TUN | -s SOCKET]   peers, traffic, drops by reason
    grebe check-config FILE                every error with its key path; exit 1 if any
    grebe flows [--json] [-i TUN | -s SOCKET]    inspected TCP flows, both backends
    grebe pair DESCRIPTION [--out DIR]     every site's endpoint file from one description
    grebe deploy INVENTORY [ACTION]        up|push|start|stop|restart|status on N hosts (SSH)

Subcommands are registered with `register(name, setup, run)`:
`setup(parser)` declares its arguments, `run(args) -> int` is the exit status.

Logs go through `logging` to stderr, one line per state change (never per packet).
SIGTERM and SIGINT stop `up` cleanly: routes and the TUN are removed, exit status 0.
With kernel-backend `[[inspect]]` rules `up` also runs the TPROXY backend (bridge/kernel/run.py)
and removes its nft table and policy rules on exit; SIGHUP reloads those rules.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from bridge import deploy, pair
from bridge.io.adapters import GroBatchFactory, TsoFrameFactory

log = logging.getLogger("grebe")

SUPER_PACKETS = os.environ.get("GREBE_SUPER_PACKETS", "1") == "1"  # bridge/gso.py fast path
GRO_BATCHES = os.environ.get("GREBE_GRO_BATCHES", "1") == "1"  # bridge/gso.py receive path

Setup = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Setup, Run]] = {}


def register(name: str, help_text: str, setup: Setup, run: Run) -> None:
    """Add a subcommand (the table `main` builds its parser from)."""
    COMMANDS[name] = (help_text, setup, run)


# -- up ---------------------------------------------------------------------------------


def _setup_up(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="endpoint TOML file")
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
    from bridge.gso import GroBatch, SuperPacket

    return (SuperPacket if offload and SUPER_PACKETS else None,
            GroBatch if offload and GRO_BATCHES else None)


def cmd_up(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.errors import ConfigErrors
    from bridge.io.control import ControlServer, MetricsServer, io_prometheus, socket_name
    from bridge.io.loop import Engine, Runner
    from bridge.io.tun import TunBusyError, TunDevice
    from bridge.io.udp import UdpEndpoint
    from bridge.pipeline import Bridge

    try:
        cfg = load_config(args.config)
    except ConfigErrors as e:
        for err in e.errors:
            log.error("%s", err)
        return 2
    offload = not args.no_offload
    underlay, source = _underlay_mtu(cfg)
    bridge = Bridge(cfg, time.monotonic(), underlay_mtu=underlay)
    mtu = bridge.tun_mtu
    how = "configured" if cfg.tun.mtu else f"auto: underlay {underlay or cfg.pmtu.underlay_mtu}" \
        f" from {source}, minus encapsulation overhead"
    tso_frame, gro_batch = core_batches(offload)  # the core takes TSO frames, GRO buffers
    try:
        tun = TunDevice(cfg.tun.name, vnet_hdr=offload, tso_frame=tso_frame)
    except TunBusyError as e:
        log.error("%s", e.strerror)
        return 1
    ctl = metrics = udp = kernel = None
    failed = False
    try:
        tun.configure([str(a) for a in cfg.tun.addresses], mtu,
                      [str(n) for p in cfg.peers for n in p.prefixes])
        udp = UdpEndpoint(cfg.listen.address, cfg.listen.port, gso=offload, gro=offload,
                          gro_batch=gro_batch)
        warm = cfg.keep_warm and os.environ.get("GREBE_KEEP_WARM", "1") == "1"
        # one process per direction (bridge/io/split.py); never with [[inspect]] rules
        split = cfg.split_directions and not cfg.inspect \
            and os.environ.get("GREBE_SPLIT", "1") == "1"
        sibling = None
        if split:
            from bridge.io.split import RxProcess

            sibling = RxProcess(bridge)
        engine = Engine(bridge, tun, udp, keep_warm=warm, sibling=sibling)
        ctl = ControlServer(socket_name(cfg.tun.name, cfg.control_socket))

        def status(_req: dict[str, Any]) -> dict[str, Any]:
            st = engine.status()
            tun_info = st.setdefault("tun", {})
            tun_info.update(name=cfg.tun.name, mtu=bridge.tun_mtu, mtu_source=how,
                            offload=offload)
            st["io"].update(tun_bad_frames=tun.bad_frames, tun_write_errors=tun.write_errors,
                            udp_send_errors=dict(udp.send_errors), udp_gso=udp.gso,
                            udp_gro=udp.gro, control=dict(ctl.stats))
            if metrics is not None:
                st["io"]["metrics"] = dict(metrics.stats)
            return st

        ctl.register("status", status)
        from bridge.io.flows import attach  # `flows` + inspector flushing (issue 4)

        detach = attach(engine, ctl)
        # kernel-backend [[inspect]] rules: TPROXY + relay on their own loop (bridge/tproxy_run)
        from bridge.kernel.run import start_for_config

        try:
            kernel = start_for_config(cfg, ctl)
        except (RuntimeError, OSError) as e:
            log.error("kernel inspection backend: %s", e)
            detach()
            return 1
        extra = [(ctl.fileno(), ctl.on_readable)]
        if cfg.metrics_listen:
            def render() -> str:
                text = engine.metrics_text()
                text += io_prometheus(status({}))
                if kernel is not None:
                    from bridge.kernel.info import prometheus

                    text += prometheus(kernel.status(with_flows=False))
                return text

            metrics = MetricsServer(cfg.metrics_listen, render)
            extra.append((metrics.fileno(), metrics.on_readable))
        runner = Runner(engine, extra)

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("%s: stopping", signal.Signals(signum).name)
            if kernel is not None:
                # the relays' RSTs to servers leave through the TUN: reset them (off the
                # signal handler, it waits on the backend's loop) while the data plane runs
                import threading

                stopping = kernel

                def stop_kernel_first() -> None:
                    stopping.stop()
                    runner.stop()

                threading.Thread(target=stop_kernel_first, name="stop", daemon=True).start()
            else:
                runner.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if kernel is not None:
            reload_rules = kernel.reload

            def on_hup(_signum: int, _frame: Any) -> None:
                log.info("SIGHUP: reloading the kernel-backend [[inspect]] rules")
                reload_rules()

            signal.signal(signal.SIGHUP, on_hup)
        listen = (f"[{cfg.listen.address}]" if ":" in cfg.listen.address
                  else cfg.listen.address) + f":{cfg.listen.port}"
        log.info("grebe up: %s, listening %s, %d peer(s), tun mtu %d (%s), control %s%s",
                 cfg.tun.name, listen, len(cfg.peers), mtu, how,
                 ctl.name, f", metrics {cfg.metrics_listen}" if metrics else "")
        # What start-up built lives as long as the process: keep it out of the cyclic
        # collector's walks (a full collection over it took 6 ms here, a pause on the
        # packet path; frozen, ~0).
        gc.freeze()
        runner.run()
        detach()  # reset the userspace-terminated flows, final flush of the inspectors
        failed = runner.failed
    finally:
        if kernel is not None:
            kernel.stop()   # relays reset, nft table + policy routing removed
        for x in (metrics, ctl, udp):
            if x is not None:
                x.close()
        tun.close()
        log.info("grebe down: %s removed", cfg.tun.name)
    return 1 if failed else 0


# -- status -----------------------------------------------------------------------------


def _setup_status(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-i", "--interface", default="grebe0", help="TUN name (default grebe0)")
    g.add_argument("-s", "--socket", help="control socket (@abstract or path)")


def _fmt_status(st: dict[str, Any]) -> str:
    """The human table of `grebe status` from the JSON answer."""
    tun = st.get("tun", {})
    lines = [f"tun {tun.get('name', '?')}  mtu {tun.get('mtu', '?')}"
             f"  ({tun.get('mtu_source', '')})"]
    lines.append(f"{'peer':<14} {'endpoint':<22} {'state':<5} {'seen':>8} {'rx pkts':>9}"
                 f" {'rx bytes':>13} {'tx pkts':>9} {'tx bytes':>13}")
    for p in st.get("peers", []):
        seen = p.get("last_seen_s")
        seen_s = "never" if seen is None else f"{seen:.1f}s"
        lines.append(f"{p.get('name', '?'):<14} {p.get('endpoint', ''):<22}"
                     f" {'up' if p.get('up') else 'down':<5} {seen_s:>8}"
                     f" {p.get('rx_packets', 0):>9} {p.get('rx_bytes', 0):>13}"
                     f" {p.get('tx_packets', 0):>9} {p.get('tx_bytes', 0):>13}")
    drops = {k: v for k, v in st.get("drops", {}).items() if v}
    lines.append("drops: " + (", ".join(f"{k}={v}" for k, v in sorted(drops.items()))
                              if drops else "none"))
    events = {k: v for k, v in st.get("events", {}).items() if v}
    if events:
        lines.append("events: " + ", ".join(f"{k}={v}" for k, v in sorted(events.items())))
    io = st.get("io", {})
    if io:
        lines.append("io: " + ", ".join(f"{k}={v}" for k, v in io.items()))
    if "inspect_kernel" in st:
        from bridge.kernel.info import format_status

        lines.append(format_status(st["inspect_kernel"]))
    return "\n".join(lines)


def _ask(args: argparse.Namespace, cmd: str) -> dict[str, Any] | None:
    """One request to the running endpoint's control socket; None (said) when none runs."""
    from bridge.io.control import request, socket_name

    name = args.socket or socket_name(args.interface)
    try:
        answer: dict[str, Any] = request(name, cmd)
    except OSError as e:
        print(f"grebe: no grebe on {name}: {e.strerror or e}", file=sys.stderr)
        return None
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    st = _ask(args, "status")
    if st is None:
        return 1
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    elif "error" in st:
        print(f"grebe: {st['error']}", file=sys.stderr)
        return 1
    else:
        print(_fmt_status(st))
    return 0


# -- check-config -----------------------------------------------------------------------


def _setup_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="endpoint TOML file")


def cmd_check_config(args: argparse.Namespace) -> int:
    from bridge.config import check_config

    errors = check_config(args.file)
    for e in errors:
        print(str(e), file=sys.stderr)
    if errors:
        print(f"{args.file}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0


register("up", "run an endpoint in the foreground", _setup_up, cmd_up)
register("status", "show peers, traffic and drops of a running endpoint", _setup_status,
         cmd_status)
register("check-config", "validate an endpoint configuration file", _setup_check,
         cmd_check_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grebe", description="GRE/IPIP-over-UDP site bridge")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, setup, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        setup(p)
        p.set_defaults(func=run)
    return parser


def cmd_flows(args: argparse.Namespace) -> int:
    """`grebe flows`: the userspace backend's table, then the kernel backend's flows."""
    from bridge.kernel.info import format_flows

    answer = _ask(args, "flows")
    if answer is None:
        return 1
    if "error" in answer:
        msg = answer["error"]
        if "unknown command" in msg:
            msg = "this endpoint has no [[inspect]] rule"
        print(f"grebe: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(format_flows(answer))
    return 0


register("flows", "show inspected TCP flows (both backends) of a running endpoint",
         _setup_status, cmd_flows)
register("pair", "write the matching endpoint files of every site from one description",
         pair.setup, pair.run)
register("deploy", "push, start, stop and show grebe on the hosts of an inventory (SSH)",
         deploy.setup, deploy.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
