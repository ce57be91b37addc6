"""The pure half of `./netns-lab.sh bench`: parse tool output, compute ratios, render tables.

Rules:
- Nothing here runs a process, touches a namespace or reads the clock: text in, values out.
  That is what lets `tests/unit/lab/test_bench.py` check it without root.
- A tool's output that cannot be read raises `BenchParseError` naming the tool and the reason;
  the runner turns it into a "failed: ..." row instead of a crash.
- Figures are reported as measured: iperf3 throughput is the *receiver's* figure
  (`end.sum_received`), ping RTT is iputils' `avg`, curl throughput is bytes / total time.
- A ratio is `value / reference` from the same run, for every metric alike (so for RTT and
  time to first byte, above 1.00 means slower than the reference). A ratio is `None` when
  either side is missing or the reference is zero.

Theory of operation: the runner (`bench.py`) collects one `TunnelRow` per tunnel variant and
one `InspectRow` per inspection variant. `tunnel_ratios()` / `inspect_ratios()` relate each row
to the reference rows (wireguard-go and vxlan; mitmproxy-wg), `render_*_table()` prints the
human table, and `results_document()` builds the JSON written next to it. Both views come from
the same rows, so the table and the JSON cannot disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from typing import Any, TypeVar


class BenchParseError(ValueError):
    """The output of a measuring tool could not be read."""


class Status(Enum):
    OK = "ok"
    UNAVAILABLE = "unavailable"  # the variant cannot run here (missing tool, feature not built)
    FAILED = "failed"  # it was set up or measured and something went wrong


@dataclass(frozen=True, slots=True)
class IperfResult:
    mbps: float  # receiver-side throughput, megabits per second
    seconds: float
    retransmits: int | None  # sender retransmits (TCP), if iperf3 reported them


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    min_ms: float
    avg_ms: float
    max_ms: float
    mdev_ms: float


@dataclass(frozen=True, slots=True)
class CurlResult:
    http_code: int
    size_bytes: int
    ttfb_s: float  # time_starttransfer: request sent on a new connection -> first byte
    total_s: float

    @property
    def mbytes_per_s(self) -> float:
        return self.size_bytes / self.total_s / 1e6 if self.total_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TunnelRow:
    name: str
    label: str
    status: Status
    detail: str = ""  # why unavailable/failed, or a note
    mbps_1: float | None = None  # 1 stream, Mb/s
    mbps_4: float | None = None  # 4 parallel streams, Mb/s (sum)
    mbps_rev: float | None = None  # 1 stream, server -> client (iperf3 -R), Mb/s
    rtt_ms: float | None = None  # mean ping RTT client -> server
    # CPU used by the variant's own processes (both gateways, with their children) during
    # the 1-stream run, in % of one core; None for kernel-only variants (plain, vxlan).
    cpu_pct: float | None = None


@dataclass(frozen=True, slots=True)
class InspectRow:
    name: str
    label: str
    status: Status
    detail: str = ""
    mbytes_per_s: float | None = None  # large HTTP download, MB/s (10^6 bytes)
    ttfb_ms: float | None = None  # median time to first byte of a small GET, new connection


TUNNEL_METRICS = ("mbps_1", "mbps_4", "mbps_rev", "rtt_ms")
INSPECT_METRICS = ("mbytes_per_s", "ttfb_ms")
TUNNEL_REFERENCES = ("wireguard-go", "vxlan")
INSPECT_REFERENCES = ("mitmproxy-wg",)
# Pairs measured in the same run whose ratio is a goal of its own (issue 11): the inspected
# download under the lossy WAN against the same bridge without inspection (>= 0.8), and the
# userspace backend against the kernel backend (>= 1.0, first byte sooner).
INSPECT_PAIRS = (("inspect-lossy", "direct-lossy", 0.8), ("inspect-userspace", "inspect-kernel",
                                                           1.0))


# ---------------------------------------------------------------- parsing


def parse_iperf3_json(text: str) -> IperfResult:
    """Read `iperf3 -c ... -J` output. Returns the receiver's throughput; raises BenchParseError."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchParseError(f"iperf3: not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(doc, dict):
        raise BenchParseError("iperf3: JSON is not an object")
    if doc.get("error"):
        raise BenchParseError(f"iperf3: {doc['error']}")
    end = doc.get("end")
    received = end.get("sum_received") if isinstance(end, dict) else None
    if not isinstance(received, dict):
        raise BenchParseError("iperf3: no end.sum_received (TCP test did not finish?)")
    bps = received.get("bits_per_second")
    seconds = received.get("seconds", 0.0)
    if not isinstance(bps, int | float) or not math.isfinite(bps) or bps < 0:
        raise BenchParseError(f"iperf3: bad bits_per_second {bps!r}")
    sent = end.get("sum_sent") if isinstance(end, dict) else None
    retr = sent.get("retransmits") if isinstance(sent, dict) else None
    return IperfResult(
        mbps=float(bps) / 1e6,
        seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
        retransmits=int(retr) if isinstance(retr, int) else None,
    )


_PING_COUNTS = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(
    r"(?:rtt|round-trip) min/avg/max(?:/(?:mdev|stddev))? = "
    r"([\d.]+)/([\d.]+)/([\d.]+)(?:/([\d.]+))? ms"
)


def parse_ping(text: str) -> PingResult:
    """Read the summary of iputils (or BusyBox) `ping`. Raises BenchParseError if no reply came."""
    counts = _PING_COUNTS.search(text)
    if counts is None:
        raise BenchParseError("ping: no statistics line")
    sent, received = int(counts.group(1)), int(counts.group(2))
    if received == 0:
        raise BenchParseError(f"ping: 0 of {sent} replies")
    rtt = _PING_RTT.search(text)
    if rtt is None:
        raise BenchParseError("ping: no rtt line")
    lo, avg, hi = (float(rtt.group(i)) for i in range(1, 4))
    mdev = float(rtt.group(4)) if rtt.group(4) else 0.0  # BusyBox prints no mdev
    return PingResult(sent, received, lo, avg, hi, mdev)


CURL_WRITE_OUT = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n"


def parse_curl(text: str) -> CurlResult:
    """Read the line curl prints for `-w CURL_WRITE_OUT`. Raises BenchParseError on HTTP != 200."""
    fields = text.strip().splitlines()[-1].split() if text.strip() else []
    if len(fields) != 4:
        raise BenchParseError(f"curl: expected 4 fields, got {text.strip()!r}")
    try:
        code, size = int(fields[0]), int(float(fields[1]))
        ttfb, total = float(fields[2]), float(fields[3])
    except ValueError:
        raise BenchParseError(f"curl: unreadable figures {fields!r}") from None
    if code != 200:
        raise BenchParseError(f"curl: HTTP status {code}")
    return CurlResult(code, size, ttfb, total)


def parse_proc_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from the text of /proc/<pid>/stat.

    The command name (field 2) may hold spaces and parentheses, so fields are counted from
    the last ')'. Raises BenchParseError on anything else.
    """
    head, sep, rest = text.rpartition(")")
    fields = rest.split()
    if not sep or len(fields) < 13:
        raise BenchParseError("/proc/pid/stat: unreadable")
    # after ')': state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    try:
        return int(fields[1]), int(fields[11]) + int(fields[12])
    except ValueError:
        raise BenchParseError("/proc/pid/stat: unreadable") from None


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence; raises ValueError on an empty one."""
    if not values:
        raise ValueError("median of nothing")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


# ---------------------------------------------------------------- rounds

Row = TypeVar("Row", TunnelRow, InspectRow)


def merge_rounds(rounds: Sequence[Row]) -> Row:
    """One row from the same variant measured in several rounds: the median of each figure
    over the rounds that succeeded. A row stays OK if any round did; the failed rounds are
    counted in `detail`. Raises ValueError for no rounds or rows of different variants."""
    if not rounds or len({r.name for r in rounds}) != 1:
        raise ValueError("merge_rounds needs rows of one variant")
    ok = [r for r in rounds if r.status is Status.OK]
    failed = [r for r in rounds if r.status is not Status.OK]
    if not ok:
        return rounds[-1]
    figures: dict[str, Any] = {}
    for f in fields(ok[0]):
        if f.name in ("name", "label", "status", "detail"):
            continue
        values = [v for r in ok if (v := getattr(r, f.name)) is not None]
        figures[f.name] = median(values) if values else None
    detail = (f"{len(failed)} of {len(rounds)} rounds failed ({failed[0].detail})"
              if failed else "")
    return replace(ok[0], detail=detail, **figures)


# ---------------------------------------------------------------- ratios


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def _ratios(
    rows: Sequence[TunnelRow] | Sequence[InspectRow],
    references: Sequence[str],
    metrics: Sequence[str],
) -> dict[str, dict[str, dict[str, float | None]]]:
    by_name = {r.name: r for r in rows}
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for row in rows:
        out[row.name] = {}
        for ref_name in references:
            ref = by_name.get(ref_name)
            ok = ref is not None and ref.status is Status.OK and row.status is Status.OK
            out[row.name][ref_name] = {
                m: ratio(getattr(row, m), getattr(ref, m)) if ok else None for m in metrics
            }
    return out


def tunnel_ratios(
    rows: Sequence[TunnelRow], references: Sequence[str] = TUNNEL_REFERENCES
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{variant: {reference: {metric: ratio}}} for every tunnel row."""
    return _ratios(rows, references, TUNNEL_METRICS)


def inspect_ratios(
    rows: Sequence[InspectRow], references: Sequence[str] = INSPECT_REFERENCES
) -> dict[str, dict[str, dict[str, float | None]]]:
    """{variant: {reference: {metric: ratio}}} for every inspection row."""
    return _ratios(rows, references, INSPECT_METRICS)


# ---------------------------------------------------------------- rendering


def fmt_mbps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _grid(header: Sequence[str], body: Sequence[Sequence[str]], notes: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join

    def fmt(cells: Sequence[str]) -> str:
        return line(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(
            zip(cells, widths, strict=True))).rstrip()

    out = [fmt(header), line("-" * w for w in widths)]
    out += [fmt(r) for r in body]
    out += notes
    return "\n".join(out)


def _status_note(row: TunnelRow | InspectRow) -> str:
    return f"{row.name}: {row.status.value}: {row.detail}"


def render_tunnel_table(rows: Sequence[TunnelRow]) -> str:
    """The tunnel table: absolute figures, then ratios (1 stream/4 streams/reverse/RTT).

    CPU % is what the variant's own processes used during the 1-stream run ("-": kernel)."""
    ratios = tunnel_ratios(rows)
    header = ["variant", "1 stream Mb/s", "4 streams", "reverse", "RTT ms", "CPU %",
              *(f"x {ref} (1/4/rev/rtt)" for ref in TUNNEL_REFERENCES)]
    body: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        if r.status is not Status.OK:
            body.append([r.name, r.status.value, "", "", "", "",
                         *("" for _ in TUNNEL_REFERENCES)])
            notes.append(_status_note(r))
            continue
        rel = ["/".join(fmt_ratio(ratios[r.name][ref][m]) for m in TUNNEL_METRICS)
               for ref in TUNNEL_REFERENCES]
        body.append([r.name, fmt_mbps(r.mbps_1), fmt_mbps(r.mbps_4), fmt_mbps(r.mbps_rev),
                     fmt_ms(r.rtt_ms), "-" if r.cpu_pct is None else f"{r.cpu_pct:.0f}", *rel])
    return _grid(header, body, notes)


def render_inspect_table(rows: Sequence[InspectRow]) -> str:
    """The inspection table: download MB/s and new-connection TTFB, ratios to mitmproxy-wg."""
    ratios = inspect_ratios(rows)
    header = ["variant", "download MB/s", "TTFB ms",
              *(f"x {ref} (MB/s, ttfb)" for ref in INSPECT_REFERENCES)]
    body: list[list[str]] = []
    notes: list[str] = []
    for r in rows:
        if r.status is not Status.OK:
            body.append([r.name, r.status.value, "", *("" for _ in INSPECT_REFERENCES)])
            notes.append(_status_note(r))
            continue
        rel = [", ".join(fmt_ratio(ratios[r.name][ref][m]) for m in INSPECT_METRICS)
               for ref in INSPECT_REFERENCES]
        body.append([r.name, f"{r.mbytes_per_s:,.1f}" if r.mbytes_per_s is not None else "-",
                     fmt_ms(r.ttfb_ms), *rel])
    for (a, b, goal), rel_ab in zip(INSPECT_PAIRS, pair_ratios(rows), strict=True):
        if rel_ab is not None:
            notes.append(f"{a} / {b}: download {fmt_ratio(rel_ab['mbytes_per_s'])}x "
                         f"(goal >= {goal:.1f}), TTFB {fmt_ratio(rel_ab['ttfb_ms'])}x")
    return _grid(header, body, notes)


def pair_ratios(rows: Sequence[InspectRow]) -> list[dict[str, float | None] | None]:
    """For each of INSPECT_PAIRS: {metric: first / second}, or None unless both are OK."""
    by_name = {r.name: r for r in rows}
    out: list[dict[str, float | None] | None] = []
    for a, b, _goal in INSPECT_PAIRS:
        ra, rb = by_name.get(a), by_name.get(b)
        if ra is None or rb is None or ra.status is not Status.OK or rb.status is not Status.OK:
            out.append(None)
            continue
        out.append({m: ratio(getattr(ra, m), getattr(rb, m)) for m in INSPECT_METRICS})
    return out


def _row_dict(row: TunnelRow | InspectRow) -> dict[str, Any]:
    d = asdict(row)
    d["status"] = row.status.value
    return d


def results_document(
    meta: Mapping[str, Any], tunnels: Sequence[TunnelRow], inspects: Sequence[InspectRow]
) -> dict[str, Any]:
    """The JSON document: run metadata, rows, and the same ratios the tables show."""
    return {
        "meta": dict(meta),
        "tunnels": [_row_dict(r) for r in tunnels],
        "tunnel_ratios": tunnel_ratios(tunnels),
        "inspection": [_row_dict(r) for r in inspects],
        "inspection_ratios": inspect_ratios(inspects),
        "inspection_pairs": {f"{a}/{b}": rel for (a, b, _g), rel in
                             zip(INSPECT_PAIRS, pair_ratios(inspects), strict=True)},
    }


# ---------------------------------------------------------------- chart (SVG, by hand)

# (title, table, reference, metric, lower is better)
CHART_PANELS = (
    ("1-stream throughput × wireguard-go", "tunnel", "wireguard-go", "mbps_1", False),
    ("1-stream throughput × kernel VXLAN", "tunnel", "vxlan", "mbps_1", False),
    ("RTT × kernel VXLAN (lower is better)", "tunnel", "vxlan", "rtt_ms", True),
    ("inspected download × mitmproxy-wg", "inspect", "mitmproxy-wg", "mbytes_per_s", False),
    ("time to first byte × mitmproxy-wg (lower is better)", "inspect", "mitmproxy-wg",
     "ttfb_ms", True),
)
_BAR_H, _GAP, _LABEL_W, _PLOT_W, _MARGIN = 16, 4, 250, 420, 12


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_ratio_svg(tunnels: Sequence[TunnelRow], inspects: Sequence[InspectRow],
                     title: str = "") -> str:
    """A bar chart of the run's ratios, one panel per `CHART_PANELS` entry that has data:
    each measured variant's value / the reference's on a log scale centred on 1× (the
    reference), grebe's rows in another colour. Plain SVG 1.1, no dependency."""
    ratios = {"tunnel": tunnel_ratios(tunnels), "inspect": inspect_ratios(inspects)}
    labels = {r.name: r.label for r in [*tunnels, *inspects]}
    panels: list[tuple[str, bool, list[tuple[str, float]]]] = []
    for head, table, ref, metric, lower in CHART_PANELS:
        bars = [(name, v) for name, refs in ratios[table].items()
                if (v := refs.get(ref, {}).get(metric)) is not None and v > 0 and name != ref]
        if bars:
            panels.append((head, lower, bars))
    every = [v for _, _, bars in panels for _, v in bars] or [1.0]
    lo = math.floor(math.log10(min(min(every), 1.0)))
    hi = math.ceil(math.log10(max(max(every), 1.0)))
    hi = hi if hi > lo else lo + 1
    x0 = _MARGIN + _LABEL_W

    def x(v: float) -> float:
        return x0 + _PLOT_W * (math.log10(v) - lo) / (hi - lo)

    width = x0 + _PLOT_W + 70
    out: list[str] = []
    y = _MARGIN + (22 if title else 0)
    if title:
        out.append(f'<text x="{_MARGIN}" y="{_MARGIN + 12}" font-weight="bold">'
                   f"{_esc(title)}</text>")
    for head, lower, bars in panels:
        out.append(f'<text x="{_MARGIN}" y="{y + 12}" font-weight="bold">{_esc(head)}</text>')
        y += 20
        top = y
        for name, v in bars:
            grebe = name.startswith("grebe")
            good = v <= 1 if lower else v >= 1
            fill = ("#1f6f43" if good else "#b5452f") if grebe else "#8a8f98"
            a, b = sorted((x(1.0), x(v)))
            out.append(f'<text x="{x0 - 6}" y="{y + 12}" text-anchor="end">'
                       f"{_esc(labels.get(name, name))}</text>")
            out.append(f'<rect x="{a:.1f}" y="{y + 2}" width="{max(b - a, 1):.1f}" '
                       f'height="{_BAR_H - 4}" fill="{fill}"><title>{_esc(name)}: '
                       f"{v:.3g}×</title></rect>")
            tx = b + 4  # the figure right of the bar's outer end (or of 1× for v < 1)
            out.append(f'<text x="{tx:.1f}" y="{y + 12}" font-size="11">{v:.2f}×</text>')
            y += _BAR_H + _GAP
        for p in range(lo, hi + 1):  # grid lines at powers of ten, 1× darker
            gx = x(10.0 ** p)
            out.append(f'<line x1="{gx:.1f}" y1="{top}" x2="{gx:.1f}" y2="{y}" '
                       f'stroke="{"#333" if p == 0 else "#ccc"}" stroke-width="1"/>')
            out.append(f'<text x="{gx:.1f}" y="{y + 11}" text-anchor="middle" font-size="10">'
                       f"{10.0 ** p:g}×</text>")
        y += 26
    if not panels:
        out.append(f'<text x="{_MARGIN}" y="{y + 12}">no ratios in this run</text>')
        y += 20
    height = y + _MARGIN
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height}" '
        f'viewBox="0 0 {width:.0f} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width:.0f}" height="{height}" fill="white"/>', *out, "</svg>", ""])


def rows_from_document(doc: Mapping[str, Any]) -> tuple[list[TunnelRow], list[InspectRow]]:
    """The rows of a results JSON (`results_document`) read back."""
    def row(cls: Any, d: Mapping[str, Any]) -> Any:
        names = {f.name for f in fields(cls)}
        return cls(**{k: Status(v) if k == "status" else v for k, v in d.items() if k in names})
    return ([row(TunnelRow, d) for d in doc.get("tunnels", [])],
            [row(InspectRow, d) for d in doc.get("inspection", [])])


def chart_title(meta: Mapping[str, Any]) -> str:
    """"grebe bench 2026-12-06, commit 0b480e9, 2 CPUs, load 7.8": the run in one line."""
    return (f"grebe bench {str(meta.get('started', ''))[:10]}, commit {meta.get('commit')}, "
            f"{meta.get('cpus')} CPUs, load {meta.get('loadavg_1m_start', 0):.1f} "
            "(ratios within this run)")
