"""`./netns-lab.sh bench`: throughput and RTT of grebe against the anchors, in one lab run.

Usage: ./netns-lab.sh bench [--quick] [--only NAME...] [--json PATH] [--repeat N]
                            [--keep-logs] [--instance NAME] [--list] [--chart JSON...]
(the same as `python -m bridge.lab bench ...` as root)

Rules:
- One lab (instance "bench": namespaces gb-bench-*), one line client -- gw-a -- wan -- gw-b --
  server (topologies/two-sites-plain.toml). Variants run one after another in it; each is set
  up, measured and torn down (processes stopped, devices and routes removed) before the next.
  The lab is destroyed at the end, also on error, Ctrl-C or SIGTERM.
- Every variant is measured the same way, client -> server (198.18.2.10): iperf3 -J with
  1 stream, 4 streams and reverse, then the mean RTT of N pings. Inspection variants: curl
  downloads a 100 MB file from nginx on the server (MB/s) and the median time to first byte
  of small GETs, each on a new connection.
- Numbers are only compared within one run (the machine is shared): the tables give
  absolute figures and ratios to wireguard-go and vxlan (tunnels) and to mitmproxy-wg
  (inspection). A variant that cannot run is a row "unavailable: why"; one that breaks is
  "failed: why" and its logs stay in the printed temp dir. Neither stops the run.
- Progress lines go to stderr while it runs (minutes); the tables go to stdout; the same
  figures are written as JSON (bench-results/bench-<UTC timestamp>.json or --json PATH),
  and a bar chart of the ratios beside it (the same name, .svg; `--chart JSON...` draws it
  again from written results without measuring, no root needed).

Theory of operation: `main()` parses the options and opens the lab (`open_lab`). For each
selected tunnel variant it starts a fresh iperf3 server on the server node, calls `setup()`,
waits until the client reaches the server through it, measures, calls `teardown()` and
checks that nothing was left behind; then nginx starts for the inspection variants, which
go the same way with curl (and `verify()` that the flows took the proxy). `Bench` is the
toolbox variants use (`bench_lab.py`): netlink changes with pyroute2 inside the lab
namespaces, each with its undo, and processes with their logs. The pure half (parsing,
ratios, tables, JSON) is `bench_report.py`; the variants are `bench_variants.py`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from bridge.lab import netlink
from bridge.lab.bench_lab import Bench, open_lab, ping_command
from bridge.lab.bench_report import (
    CURL_WRITE_OUT,
    BenchParseError,
    InspectRow,
    Status,
    TunnelRow,
    chart_title,
    median,
    merge_rounds,
    parse_curl,
    parse_iperf3_json,
    parse_ping,
    render_inspect_table,
    render_ratio_svg,
    render_tunnel_table,
    results_document,
    rows_from_document,
)
from bridge.lab.bench_variants import (
    ALL_VARIANTS,
    INSPECT_VARIANTS,
    SERVER_V4,
    TUNNEL_VARIANTS,
    Variant,
)

REPO = Path(__file__).resolve().parents[2]
BIG_FILE_BYTES = 100_000_000


class Options(argparse.Namespace):
    quick: bool
    only: list[str]
    json: str | None
    list: bool
    instance: str
    keep_logs: bool
    repeat: int
    chart: list[str]

    @property
    def seconds(self) -> int:
        return 3 if self.quick else 10

    @property
    def pings(self) -> int:
        return 20 if self.quick else 50

    @property
    def gets(self) -> int:
        return 10 if self.quick else 30

    @property
    def downloads(self) -> int:
        return 1 if self.quick else 3


def parse_args(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="netns-lab.sh bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s iperf3 runs, 20 pings")
    p.add_argument("--only", nargs="+", default=[], metavar="NAME",
                   help="run only these variants (see --list)")
    p.add_argument("--json", metavar="PATH", help="where to write the results JSON")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    p.add_argument("--instance", default="bench", help="lab instance name (gb-INSTANCE-*)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure every variant in N interleaved rounds; report medians")
    p.add_argument("--chart", nargs="+", default=[], metavar="JSON",
                   help="only draw the ratio chart (JSON -> .svg beside it) of written results")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the scratch dir (configs, process logs) even if all went well")
    opts = p.parse_args(argv, namespace=Options())
    if opts.repeat < 1:
        p.error("--repeat must be at least 1")
    return opts


def log(msg: str) -> None:
    ts = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
    print(f"[bench {ts}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring


def iperf(b: Bench, opts: Options, *extra: str) -> float:
    argv = ["iperf3", "-c", SERVER_V4, "-J", "-t", str(opts.seconds), *extra]
    cp = b.run("client", argv, timeout=opts.seconds + 30, check=False)
    return parse_iperf3_json(cp.stdout).mbps


def measure_tunnel(b: Bench, v: Variant, opts: Options) -> TunnelRow:
    b.wait_for(lambda: b.pings("client", SERVER_V4), 30, f"{v.name}: client reaches server")
    cp = b.run("client", ping_command(SERVER_V4, opts.pings, 0.01), timeout=opts.pings + 30,
               check=False)
    rtt = parse_ping(cp.stdout).avg_ms
    ticks, t0 = b.cpu_ticks(), time.monotonic()
    one = iperf(b, opts)
    cpu = None
    if b.has_processes:
        cpu = 100 * (b.cpu_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t0)
    log(f"{v.name}: 1 stream {one:,.0f} Mb/s"
        + (f", its processes {cpu:.0f} % of a core" if cpu is not None else ""))
    four = iperf(b, opts, "-P", "4")
    log(f"{v.name}: 4 streams {four:,.0f} Mb/s")
    rev = iperf(b, opts, "-R")
    log(f"{v.name}: reverse {rev:,.0f} Mb/s, RTT {rtt:.3f} ms")
    return TunnelRow(v.name, v.label, Status.OK, mbps_1=one, mbps_4=four, mbps_rev=rev,
                     rtt_ms=rtt, cpu_pct=cpu)


def curl(b: Bench, path: str, timeout: float = 120) -> Any:
    argv = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", CURL_WRITE_OUT,
            "--max-time", str(int(timeout)), f"http://{SERVER_V4}/{path}"]
    cp = b.run("client", argv, timeout=timeout + 10, check=False)
    if cp.returncode != 0:
        raise BenchParseError(f"curl exit {cp.returncode}: {cp.stderr.strip()[-200:]}")
    return parse_curl(cp.stdout)


def measure_inspect(b: Bench, v: Variant, opts: Options) -> InspectRow:
    b.wait_for(lambda: _get_ok(b), 30, f"{v.name}: client GETs from the server")
    ttfb = median([curl(b, "small").ttfb_s * 1000 for _ in range(opts.gets)])
    rates = []
    ticks = b.cpu_ticks() if b.has_processes else 0
    for _ in range(opts.downloads):
        r = curl(b, "big")
        if r.size_bytes != BIG_FILE_BYTES:
            raise BenchParseError(f"download truncated: {r.size_bytes} bytes")
        rates.append(r.mbytes_per_s)
    mbs = median(rates)
    cpu = ""  # the variant's processes (gateways, relay): CPU seconds per download
    if b.has_processes:
        per = (b.cpu_ticks() - ticks) / os.sysconf("SC_CLK_TCK") / max(opts.downloads, 1)
        cpu = f", its processes {per:.2f} CPU s per download"
    log(f"{v.name}: download {mbs:,.1f} MB/s, TTFB {ttfb:.2f} ms{cpu}")
    problem = v.verify(b, opts.gets + opts.downloads)
    if problem:
        raise RuntimeError(problem)
    return InspectRow(v.name, v.label, Status.OK, mbytes_per_s=mbs, ttfb_ms=ttfb)


def _get_ok(b: Bench) -> bool:
    try:
        curl(b, "small", timeout=5)
    except BenchParseError:
        return False
    return True


# ---------------------------------------------------------------- servers on the server node


def start_iperf_server(b: Bench) -> None:
    """A fresh iperf3 server for each variant: when a tunnel is torn down right after a test,
    the client's last control message can die with it, and the old server stays "busy"."""
    b.stop_persistent("iperf3-server")
    b.spawn("server", ["iperf3", "-s", "-B", SERVER_V4], "iperf3-server", persistent=True)
    b.wait_for(lambda: b.tcp_listening("server", 5201), 10, "iperf3 server listening")


def start_http_server(b: Bench) -> None:
    www = b.tmp / "www"
    www.mkdir()
    with open(www / "big", "wb") as f:
        f.truncate(BIG_FILE_BYTES)
    (www / "small").write_bytes(b"x" * 1024)
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (b.tmp / "nginx" / d).mkdir(parents=True)
    temp = "".join(f"  {d}_temp_path {b.tmp / 'nginx' / d};\n"
                   for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = b.tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\nuser root;\nworker_processes 1;\npid {b.tmp / 'nginx.pid'};\n"
        f"error_log {b.tmp / 'nginx-error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
        f"http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 0;\n"
        f"  default_type application/octet-stream;\n{temp}"
        f"  server {{ listen {SERVER_V4}:80; root {www}; }}\n}}\n")
    b.spawn("server", ["nginx", "-c", str(conf), "-p", str(b.tmp)], "nginx", persistent=True)
    b.wait_for(lambda: b.tcp_listening("server", 80), 10, "nginx listening")


# ---------------------------------------------------------------- the run


def run_variant(b: Bench, v: Variant, opts: Options) -> TunnelRow | InspectRow:
    """Set up, measure and tear down one variant; never raises for the variant's own faults."""
    row_type = TunnelRow if v.table == "tunnel" else InspectRow
    reason = v.unavailable(b)
    if reason is not None:
        log(f"{v.name}: unavailable: {reason}")
        return row_type(v.name, v.label, Status.UNAVAILABLE, reason)
    log(f"{v.name}: setting up ({v.label})")
    before = b.footprint()
    row: TunnelRow | InspectRow
    try:
        v.setup(b)
        row = measure_tunnel(b, v, opts) if v.table == "tunnel" else measure_inspect(b, v, opts)
    except (BenchParseError, TimeoutError, RuntimeError, OSError,
            subprocess.SubprocessError) as e:
        detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        log(f"{v.name}: FAILED: {detail} (logs in {b.tmp})")
        b.keep_tmp = True
        row = row_type(v.name, v.label, Status.FAILED, detail)
    finally:
        log(f"{v.name}: tearing down")
        v.teardown(b)
        b.flush_route_caches()
    leaked = {n: sorted(b.footprint()[n] - items) for n, items in before.items()}
    leaked = {n: items for n, items in leaked.items() if items}
    if leaked:  # the next variant would run on a dirty lab: say so in this row
        log(f"{v.name}: teardown LEFT BEHIND {leaked}")
        row = replace(row, detail=f"{row.detail} teardown left {leaked}".strip())
    return row


def skip(rounds: dict[str, list[Any]], v: Variant) -> bool:
    """An unavailable variant is asked once, not again every round."""
    done = rounds.get(v.name, [])
    return bool(done) and done[0].status is Status.UNAVAILABLE


def select(opts: Options) -> list[Variant]:
    if not opts.only:
        return [*TUNNEL_VARIANTS, *INSPECT_VARIANTS]
    unknown = [n for n in opts.only if n not in ALL_VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variant(s) {', '.join(unknown)}; "
                         f"known: {', '.join(ALL_VARIANTS)}")
    return [v for v in ALL_VARIANTS.values() if v.name in opts.only]


_MAIN_PID = os.getpid()


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked helper (pyroute2 forks to create namespaces and stops it with SIGTERM):
        # die as if no handler were installed, never run the bench's cleanup in it.
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    """Run the bench. Returns 0 when every selected variant was measured or unavailable,
    1 if one failed, 2 on a usage error, 130 when interrupted (the lab is destroyed anyway)."""
    opts = parse_args(argv)
    if opts.list:
        for v in ALL_VARIANTS.values():
            print(f"{v.name:20} {v.table:8} {v.label}")
        return 0
    if opts.chart:
        for name in opts.chart:
            doc = json.loads(Path(name).read_text())
            tunnels, inspects = rows_from_document(doc)
            svg = Path(name).with_suffix(".svg")
            svg.write_text(render_ratio_svg(tunnels, inspects, chart_title(doc["meta"])))
            log(f"chart written to {svg}")
        return 0
    variants = select(opts)
    if os.geteuid() != 0:
        print("bench: must run as root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "curl", "nginx", "ss") if not shutil.which(t)]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    rounds: dict[str, list[Any]] = {}  # variant -> its row from each round, in run order
    http_started = False
    interrupted = False
    crashed = ""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="grebe-bench-"))
    b: Bench | None = None
    try:
        log(f"bringing the lab up (instance {opts.instance!r}); scratch dir {tmp}")
        b = Bench(open_lab(opts.instance, log), tmp, REPO)
        b.keep_tmp = opts.keep_logs
        b.log = log
        tunnel_v = [v for v in variants if v.table == "tunnel"]
        inspect_v = [v for v in variants if v.table == "inspect"]
        for rnd in range(1, opts.repeat + 1):
            if opts.repeat > 1:
                log(f"round {rnd} of {opts.repeat}")
            for v in tunnel_v:
                if not skip(rounds, v):
                    start_iperf_server(b)
                    rounds.setdefault(v.name, []).append(run_variant(b, v, opts))
            if not http_started and any(not skip(rounds, v) and v.unavailable(b) is None
                                        for v in inspect_v):
                start_http_server(b)
                http_started = True
            for v in inspect_v:
                if not skip(rounds, v):
                    rounds.setdefault(v.name, []).append(run_variant(b, v, opts))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: tearing everything down")
    except netlink.LabError as e:  # e.g. a killed run left the instance up
        crashed = f"LabError: {e}"
        log(f"ERROR: {e}; `./netns-lab.sh clean --instance {opts.instance}` removes a "
            "leftover bench lab")
    except Exception as e:  # the lab itself broke: report what was measured, then fail
        crashed = f"{type(e).__name__}: {e}"
        log(f"ERROR: {crashed}")
        traceback.print_exc(file=sys.stderr)
    finally:
        # A second Ctrl-C must not cut the teardown short: ignore both signals meanwhile.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if b is not None:
                b.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old)
        if b is not None and b.keep_tmp:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    merged = {name: merge_rounds(rows) for name, rows in rounds.items()}
    tunnels = [r for r in merged.values() if isinstance(r, TunnelRow)]
    inspects = [r for r in merged.values() if isinstance(r, InspectRow)]
    rc = report(opts, started, tunnels, inspects, interrupted, crashed, load_start)
    return 1 if crashed and rc == 0 else rc


def tree_version() -> dict[str, Any]:
    """Which grebe was measured: the checkout's commit, and whether bridge/ or stack/ had
    uncommitted changes (None when this is not a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            cp = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                                text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return cp.stdout.strip() if cp.returncode == 0 else None
    status = git("status", "--porcelain", "--", "bridge", "stack")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": None if status is None else bool(status)}


def report(opts: Options, started: dt.datetime, tunnels: list[TunnelRow],
           inspects: list[InspectRow], interrupted: bool, crashed: str = "",
           load_start: float = 0.0) -> int:
    meta = {"started": started.isoformat(timespec="seconds"), "quick": opts.quick,
            "iperf3_seconds": opts.seconds, "pings": opts.pings, "small_gets": opts.gets,
            "downloads": opts.downloads, "download_bytes": BIG_FILE_BYTES,
            "interrupted": interrupted, "error": crashed or None,
            "cpus": os.cpu_count(), "kernel": os.uname().release, "repeat": opts.repeat,
            "loadavg_1m_start": load_start, "loadavg_1m_end": os.getloadavg()[0],
            **tree_version()}
    if tunnels:
        print(render_tunnel_table(tunnels))
    if inspects:
        print()
        print(render_inspect_table(inspects))
    # Only the load before the run says something: the bench itself keeps both cores busy.
    if load_start > (os.cpu_count() or 1) * 0.5:
        print(f"\nnote: load average {load_start:.1f} on {os.cpu_count()} CPUs before the run: "
              "the absolute figures are contended; compare ratios, or rerun when idle")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    path = Path(opts.json) if opts.json else REPO / "bench-results" / f"bench-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results_document(meta, tunnels, inspects), indent=2) + "\n")
    log(f"results written to {path}")
    chart = path.with_suffix(".svg")
    chart.write_text(render_ratio_svg(tunnels, inspects, chart_title(meta)))
    log(f"chart of the ratios written to {chart}")
    if interrupted:
        return 130
    statuses = [r.status for r in tunnels] + [r.status for r in inspects]
    failed = Status.FAILED in statuses
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
