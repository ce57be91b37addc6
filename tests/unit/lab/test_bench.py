"""The bench harness without root: parsing, ratios, tables, JSON, and the per-variant lifecycle
(set up, measure, tear down, unavailable/failed rows) against a fake lab."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bridge.lab import bench
from bridge.lab.bench_lab import Bench, stop_processes
from bridge.lab.bench_report import (
    BenchParseError,
    InspectRow,
    Status,
    TunnelRow,
    median,
    merge_rounds,
    parse_curl,
    parse_iperf3_json,
    parse_ping,
    parse_proc_stat,
    ratio,
    render_inspect_table,
    render_ratio_svg,
    render_tunnel_table,
    results_document,
    rows_from_document,
    tunnel_ratios,
)
from bridge.lab.bench_variants import (
    ALL_VARIANTS,
    ENDPOINTS,
    INSPECT_VARIANTS,
    TUNNEL_VARIANTS,
    Variant,
    config_text,
    grebe_unavailable,
)


def iperf_doc(bps: float, retransmits: int = 7, seconds: float = 3.0) -> str:
    """The parts of a real `iperf3 -c -J` document the parser reads, plus neighbours."""
    return json.dumps({
        "start": {"connected": [{"socket": 5}], "version": "iperf 3.12"},
        "intervals": [{"sum": {"bits_per_second": bps * 1.1}}],
        "end": {
            "sum_sent": {"seconds": seconds, "bytes": 1, "bits_per_second": bps * 1.01,
                         "retransmits": retransmits},
            "sum_received": {"seconds": seconds, "bytes": 1, "bits_per_second": bps},
            "cpu_utilization_percent": {"host_total": 50.0},
        },
    })


# ---------------------------------------------------------------- iperf3


def test_iperf3_reports_the_receiver_figure_in_mbps() -> None:
    r = parse_iperf3_json(iperf_doc(632_000_000.0))
    assert r.mbps == pytest.approx(632.0)
    assert r.retransmits == 7
    assert r.seconds == 3.0


@pytest.mark.parametrize("text, needle", [
    ('{"start": {}, "intervals": [], "end": {}, '
     '"error": "unable to connect to server: Connection refused"}', "Connection refused"),
    ("iperf3: error - unable to connect", "not JSON"),
    ('{"end": {"sum_sent": {"bits_per_second": 1}}}', "sum_received"),
    ('{"end": {"sum_received": {"bits_per_second": "fast"}}}', "bad bits_per_second"),
    ('{"end": {"sum_received": {"bits_per_second": -1}}}', "bad bits_per_second"),
    ("[]", "not an object"),
])
def test_iperf3_failures_raise_a_parse_error_naming_the_cause(text: str, needle: str) -> None:
    with pytest.raises(BenchParseError, match=needle):
        parse_iperf3_json(text)


# ---------------------------------------------------------------- ping

IPUTILS = """PING 198.18.2.10 (198.18.2.10) 56(84) bytes of data.

--- 198.18.2.10 ping statistics ---
20 packets transmitted, 20 received, 0% packet loss, time 196ms
rtt min/avg/max/mdev = 0.040/0.066/0.121/0.018 ms
"""
BUSYBOX = """--- 198.18.2.10 ping statistics ---
3 packets transmitted, 3 packets received, 0% packet loss
round-trip min/avg/max = 0.101/0.202/0.303 ms
"""
ALL_LOST = """--- 198.18.2.10 ping statistics ---
20 packets transmitted, 0 received, 100% packet loss, time 1999ms
"""


def test_ping_mean_rtt_is_iputils_avg() -> None:
    r = parse_ping(IPUTILS)
    assert (r.sent, r.received) == (20, 20)
    assert r.avg_ms == pytest.approx(0.066)
    assert (r.min_ms, r.max_ms, r.mdev_ms) == (0.040, 0.121, 0.018)


def test_ping_busybox_summary_without_mdev() -> None:
    r = parse_ping(BUSYBOX)
    assert r.avg_ms == pytest.approx(0.202)
    assert r.mdev_ms == 0.0


@pytest.mark.parametrize("text, needle", [
    (ALL_LOST, "0 of 20"), ("ping: connect: Network is unreachable\n", "no statistics"),
    ("1 packets transmitted, 1 received\n", "no rtt"),
])
def test_ping_without_replies_is_an_error(text: str, needle: str) -> None:
    with pytest.raises(BenchParseError, match=needle):
        parse_ping(text)


# ---------------------------------------------------------------- curl


def test_curl_write_out_line() -> None:
    r = parse_curl("200 100000000 0.004512 1.250000\n")
    assert r.size_bytes == 100_000_000
    assert r.ttfb_s == pytest.approx(0.004512)
    assert r.mbytes_per_s == pytest.approx(80.0)


@pytest.mark.parametrize("text, needle", [
    ("404 153 0.001 0.001", "HTTP status 404"), ("", "expected 4 fields"),
    ("200 x 0.1 0.2", "unreadable"), ("000 0 0 0", "HTTP status 0"),
])
def test_curl_bad_lines(text: str, needle: str) -> None:
    with pytest.raises(BenchParseError, match=needle):
        parse_curl(text)


def test_proc_stat_fields_are_counted_after_the_last_parenthesis() -> None:
    text = ("4242 (wireguard-go (x) y) S 17 4242 4242 0 -1 4194560 100 0 0 0 "
            "250 125 0 0 20 0 9 0 12345 1000000 500 18446744073709551615")
    assert parse_proc_stat(text) == (17, 375)
    with pytest.raises(BenchParseError):
        parse_proc_stat("4242 (x) S 1")


def test_proc_stat_of_this_process() -> None:
    import os
    ppid, ticks = parse_proc_stat(Path(f"/proc/{os.getpid()}/stat").read_text())
    assert ppid == os.getppid() and ticks >= 0


def test_ping_falls_back_to_the_python_pinger_without_iputils(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.lab import bench_lab
    monkeypatch.setattr(bench_lab.shutil, "which", lambda name: "/usr/bin/ping")
    assert bench_lab.ping_command("198.18.2.10", 20, 0.01)[:3] == ["ping", "-q", "-c"]
    monkeypatch.setattr(bench_lab.shutil, "which", lambda name: None)
    argv = bench_lab.ping_command("198.18.2.10", 20, 0.01)
    assert argv[0] == sys.executable and "ping_main()" in argv[2]
    assert argv[3:] == ["198.18.2.10", "20", "0.01"]


def test_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


# ---------------------------------------------------------------- ratios and tables


def rows() -> list[TunnelRow]:
    return [
        TunnelRow("plain", "plain", Status.OK, mbps_1=18000, mbps_4=30000, mbps_rev=18000,
                  rtt_ms=0.06),
        TunnelRow("vxlan", "vxlan", Status.OK, mbps_1=15000, mbps_4=20000, mbps_rev=15000,
                  rtt_ms=0.08),
        TunnelRow("wireguard-go", "wg", Status.OK, mbps_1=600, mbps_4=600, mbps_rev=500,
                  rtt_ms=0.4, cpu_pct=151.4),
        TunnelRow("grebe-gre", "grebe", Status.UNAVAILABLE, "bridge.cli missing"),
        TunnelRow("openvpn-none", "ovpn", Status.FAILED, "TimeoutError: handshake"),
    ]


def test_ratio_edges() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_tunnel_ratios_relate_each_metric_to_each_reference() -> None:
    r = tunnel_ratios(rows())
    assert r["plain"]["wireguard-go"]["mbps_1"] == pytest.approx(30.0)
    assert r["plain"]["vxlan"]["mbps_4"] == pytest.approx(1.5)
    assert r["plain"]["wireguard-go"]["rtt_ms"] == pytest.approx(0.15)
    assert r["vxlan"]["vxlan"] == {"mbps_1": 1.0, "mbps_4": 1.0, "mbps_rev": 1.0, "rtt_ms": 1.0}
    assert set(r["grebe-gre"]["vxlan"].values()) == {None}


def test_ratios_are_none_when_the_reference_did_not_run() -> None:
    only = [rows()[0], TunnelRow("wireguard-go", "wg", Status.FAILED, "boom")]
    r = tunnel_ratios(only)
    assert set(r["plain"]["wireguard-go"].values()) == {None}
    assert set(r["plain"]["vxlan"].values()) == {None}  # vxlan absent from the run


def test_tunnel_table_shows_figures_ratios_and_why_rows_are_empty() -> None:
    text = render_tunnel_table(rows())
    lines = text.splitlines()
    assert "1 stream Mb/s" in lines[0] and "x wireguard-go" in lines[0] and "x vxlan" in lines[0]
    plain = next(ln for ln in lines if ln.startswith("plain"))
    assert "18,000" in plain and "30,000" in plain and "0.060" in plain
    assert "30.00/50.00/36.00/0.15" in plain  # vs wireguard-go: 1 stream/4/rev/rtt
    assert "1.20/1.50/1.20/0.75" in plain  # vs vxlan
    wg = next(ln for ln in lines if ln.startswith("wireguard-go"))
    assert "1.00/1.00/1.00/1.00" in wg and " 151 " in wg  # CPU % of the tunnel processes
    assert "CPU %" in lines[0] and plain.split()[5] == "-"  # kernel-only: no process CPU
    assert "grebe-gre: unavailable: bridge.cli missing" in lines
    assert "openvpn-none: failed: TimeoutError: handshake" in lines
    widths = {len(lines[0]), len(lines[1])}
    assert len(widths) == 1  # the rule under the header is as wide as the header


def test_inspect_table_ratios_to_mitmproxy() -> None:
    inspect = [
        InspectRow("direct", "d", Status.OK, mbytes_per_s=700.0, ttfb_ms=0.25),
        InspectRow("mitmproxy-wg", "m", Status.OK, mbytes_per_s=70.0, ttfb_ms=5.0),
        InspectRow("inspect-userspace", "u", Status.UNAVAILABLE, "not built yet"),
    ]
    text = render_inspect_table(inspect)
    direct = next(ln for ln in text.splitlines() if ln.startswith("direct"))
    assert "700.0" in direct and "0.250" in direct and "10.00, 0.05" in direct
    assert "inspect-userspace: unavailable: not built yet" in text


def test_results_document_is_json_and_matches_the_table() -> None:
    doc = results_document({"quick": True}, rows(), [])
    back = json.loads(json.dumps(doc))
    assert back["meta"] == {"quick": True}
    assert [t["status"] for t in back["tunnels"]] == ["ok", "ok", "ok", "unavailable", "failed"]
    assert back["tunnels"][0]["mbps_1"] == 18000
    assert back["tunnel_ratios"]["plain"]["vxlan"]["mbps_1"] == pytest.approx(1.2)
    assert back["inspection"] == [] and back["inspection_ratios"] == {}


def test_ratio_chart_is_svg_with_a_bar_per_ratio_on_a_log_scale() -> None:
    import xml.etree.ElementTree as ET

    grebe = TunnelRow("grebe-gre", "grebe GRE", Status.OK, mbps_1=1200, mbps_4=1200,
                      mbps_rev=1200, rtt_ms=0.8)
    tunnels = [*rows()[:3], grebe]
    svg = render_ratio_svg(tunnels, [], "a run")
    root = ET.fromstring(svg)  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    bars = {r.find(f"{ns}title").text: r for r in root.iter(f"{ns}rect")  # type: ignore[union-attr]
            if r.find(f"{ns}title") is not None}
    # x wireguard-go (1 stream): plain, vxlan, grebe (the reference itself has no bar);
    # x vxlan (1 stream and RTT): plain, wireguard-go, grebe
    assert sorted(bars) == sorted(["plain: 30×", "vxlan: 25×", "grebe-gre: 2×",
                                   "plain: 1.2×", "wireguard-go: 0.04×", "grebe-gre: 0.08×",
                                   "plain: 0.75×", "wireguard-go: 5×", "grebe-gre: 10×"])
    assert bars["grebe-gre: 2×"].get("fill") != bars["plain: 30×"].get("fill")
    # log scale: 30x is twice as far from 1x as ~5.5x; widths ~ log10(ratio)
    w30, w2 = (float(bars[k].get("width", 0)) for k in ("plain: 30×", "grebe-gre: 2×"))
    assert w30 / w2 == pytest.approx(1.4771 / 0.3010, rel=0.02)
    assert "no ratios" in render_ratio_svg([], [])
    doc = json.loads(json.dumps(results_document({"started": "2026-12-06T00:00:00"},
                                                 tunnels, [])))
    back, _ = rows_from_document(doc)
    assert back == tunnels and render_ratio_svg(back, [], "a run") == svg


# ---------------------------------------------------------------- options and variants


def test_options_quick_and_full() -> None:
    q = bench.parse_args(["--quick", "--only", "plain", "vxlan", "--json", "/tmp/x.json"])
    assert (q.seconds, q.pings, q.only, q.json) == (3, 20, ["plain", "vxlan"], "/tmp/x.json")
    full = bench.parse_args([])
    assert (full.seconds, full.pings) == (10, 50)
    assert [v.name for v in bench.select(full)] == list(ALL_VARIANTS)


def test_rounds_merge_into_medians_and_count_failures() -> None:
    def ok(one: float, rtt: float, cpu: float | None) -> TunnelRow:
        return TunnelRow("wireguard-go", "wg", Status.OK, mbps_1=one, mbps_4=2 * one,
                         mbps_rev=one / 2, rtt_ms=rtt, cpu_pct=cpu)
    bad = TunnelRow("wireguard-go", "wg", Status.FAILED, "TimeoutError: handshake")
    row = merge_rounds([ok(100, 0.5, 90), bad, ok(300, 0.3, None), ok(200, 0.4, 110)])
    assert row.status is Status.OK
    assert (row.mbps_1, row.mbps_4, row.mbps_rev, row.rtt_ms) == (200, 400, 100, 0.4)
    assert row.cpu_pct == 100  # median of the rounds that measured it
    assert row.detail == "1 of 4 rounds failed (TimeoutError: handshake)"
    assert merge_rounds([bad, bad]) is bad  # never measured: stays failed
    one = InspectRow("direct", "d", Status.OK, mbytes_per_s=700.0, ttfb_ms=0.2)
    assert merge_rounds([one]) == one
    with pytest.raises(ValueError):
        merge_rounds([one, bad])  # type: ignore[list-item]


def test_repeat_interleaves_rounds_and_asks_unavailable_variants_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    figures = iter([100.0, 300.0, 200.0, 50.0])

    class Measured(Variant):
        def __init__(self, name: str) -> None:
            self.name, self.label = name, name

        def setup(self, b: Bench) -> None:
            order.append(self.name)

    class Missing(Variant):
        name = label = "missing"

        def unavailable(self, b: Bench) -> str | None:
            order.append("asked missing")
            return "no tool"

    def fake_measure(b: Bench, v: Variant, opts: bench.Options) -> TunnelRow:
        return TunnelRow(v.name, v.label, Status.OK, mbps_1=next(figures))

    lab = FakeLab()
    monkeypatch.setattr(bench, "select", lambda opts: [Measured("a"), Missing(), Measured("b")])
    monkeypatch.setattr(bench, "open_lab", lambda instance, progress=None: lab)
    monkeypatch.setattr(bench, "start_iperf_server", lambda b: None)
    monkeypatch.setattr(bench, "measure_tunnel", fake_measure)
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    out = tmp_path / "r.json"
    assert bench.main(["--repeat", "2", "--json", str(out)]) == 0
    assert order == ["a", "asked missing", "b", "a", "b"]  # round 1, then round 2
    doc = json.loads(out.read_text())
    assert {r["name"]: r["mbps_1"] for r in doc["tunnels"]} == {
        "a": 150.0, "missing": None, "b": 175.0}
    assert doc["meta"]["repeat"] == 2 and lab.destroyed
    chart = out.with_suffix(".svg")  # the ratio chart beside the JSON
    assert chart.read_text().startswith("<svg")


def test_repeat_must_be_positive() -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeat", "0"])


def test_only_rejects_unknown_names() -> None:
    with pytest.raises(SystemExit, match="unknown variant.*nope"):
        bench.select(bench.parse_args(["--only", "plain", "nope"]))


def test_list_needs_no_root(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in ("plain", "vxlan", "wireguard-go", "openvpn-none", "openvpn-aes256gcm",
                 "grebe-gre", "grebe-ipip", "direct", "mitmproxy-wg", "inspect-userspace",
                 "inspect-kernel"):
        assert name in out


def test_variant_registry_is_consistent() -> None:
    assert {v.table for v in TUNNEL_VARIANTS} == {"tunnel"}
    assert {v.table for v in INSPECT_VARIANTS} == {"inspect"}
    assert {"wireguard-go", "vxlan", "mitmproxy-wg"} <= set(ALL_VARIANTS)  # the references
    ifnames = [n for v in ALL_VARIANTS.values() if v.name not in ("wireguard-go", "mitmproxy-wg")
               for n in [*getattr(v, "ifnames", {}).values(), getattr(v, "ifname", None)] if n]
    wg = Bench(FakeLab(), Path("/nonexistent"), Path("/nonexistent"))
    ifnames += [wg.wg_name(s) for s in ("a", "b", "c")]
    other = Bench(FakeLab("other"), Path("/nonexistent"), Path("/nonexistent"))
    assert other.wg_name("a") != wg.wg_name("a")  # per lab instance
    ifnames += [e[0] for e in ENDPOINTS.values()]
    assert len(ifnames) == len(set(ifnames))
    assert all(len(n) <= 15 for n in ifnames)  # IFNAMSIZ


@pytest.mark.parametrize("mode", ["gre", "ipip"])
def test_grebe_configs_are_accepted_by_bridge_config(mode: str) -> None:
    from bridge import config
    for gw in ENDPOINTS:
        cfg = config.loads_config(config_text(gw, mode), file=f"{gw}.toml")
        assert cfg.peers[0].encapsulation.value == mode
        assert cfg.listen.port == 4754


@pytest.mark.parametrize("variant", ["inspect-kernel", "inspect-userspace"])
def test_inspect_rule_selects_the_servers_http_in_its_backend(variant: str) -> None:
    from pathlib import Path

    from bridge import config
    from bridge.lab.bench_variants import ALL_VARIANTS, GrebeInspect
    v = ALL_VARIANTS[variant]
    assert isinstance(v, GrebeInspect)
    rule = v.rule(Path("/tmp/flows.jsonl"))
    cfg = config.loads_config(config_text("gw-a", "gre", rule), file="gw-a.toml")
    (parsed,) = cfg.inspect_rules()
    assert parsed.backend.value == variant.removeprefix("inspect-")
    assert parsed.dst_ports == ((80, 80),)
    assert [str(n) for n in parsed.dst] == ["198.18.2.10/32"] and "http" in parsed.inspectors
    assert parsed.options["log_path"] == "/tmp/flows.jsonl"


def test_grebe_unavailable_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.lab import bench_variants
    assert grebe_unavailable("gre") is None
    monkeypatch.setattr(bench_variants, "grebe_command", lambda: None)
    reason = grebe_unavailable("gre")
    assert reason is not None and "console script" in reason


# ---------------------------------------------------------------- lifecycle, on a fake lab


class FakeLab:
    """Runs argv on the host: enough to drive Bench's process and teardown logic."""

    def __init__(self, instance: str = "fake") -> None:
        self.instance = instance
        self.destroyed = False
        self.popens: list[subprocess.Popen[Any]] = []

    def ns(self, node: str) -> str:
        return f"gb-{self.instance}-{node}"

    def run(self, node: str, argv: Sequence[str], timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        # Never run lab commands (sysctl, ping, ...) on the host: that is the root namespace.
        raise AssertionError(f"FakeLab.run({node}, {argv}) reached the host")

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(list(argv), **kw)
        self.popens.append(p)
        return p

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> None:
        from bridge.lab.netlink import wait_for
        wait_for(predicate, timeout, what)

    def destroy(self) -> None:
        stop_processes(self.popens)
        self.destroyed = True


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture(autouse=True)
def no_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake lab has no namespaces: footprints are empty unless a test says otherwise."""
    monkeypatch.setattr(Bench, "footprint", lambda self, nodes=(): {"gw-a": frozenset()})
    monkeypatch.setattr(Bench, "flush_route_caches", lambda self, nodes=(): None)


class Recorder(Variant):
    name, label = "fake", "fake variant"

    def __init__(self, events: list[str], fail: Exception | None = None,
                 missing: str | None = None) -> None:
        self.events, self.fail, self.missing = events, fail, missing

    def unavailable(self, b: Bench) -> str | None:
        return self.missing

    def setup(self, b: Bench) -> None:
        self.events.append("setup")
        self.proc = b.spawn("gw-a", SLEEPER, "sleeper")
        b._undo.append(lambda: self.events.append("undo"))
        if self.fail:
            raise self.fail

    def teardown(self, b: Bench) -> None:
        self.events.append("teardown")
        super().teardown(b)


def test_failed_setup_gives_a_failed_row_and_still_tears_down(tmp_path: Path) -> None:
    events: list[str] = []
    v = Recorder(events, fail=RuntimeError("openvpn exited with 1"))
    b = Bench(FakeLab(), tmp_path, tmp_path)
    row = bench.run_variant(b, v, bench.parse_args(["--quick"]))
    assert row.status is Status.FAILED and "openvpn exited with 1" in row.detail
    assert events == ["setup", "teardown", "undo"]
    assert v.proc.poll() is not None  # the variant's process was stopped
    assert b.keep_tmp  # logs are kept for a failure


def test_a_teardown_that_leaves_a_device_is_reported_in_the_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prints = iter([{"gw-a": frozenset({"link lo"})},
                   {"gw-a": frozenset({"link lo", "link gbb-wg-a"})}])
    monkeypatch.setattr(Bench, "footprint", lambda self, nodes=(): next(prints))
    b = Bench(FakeLab(), tmp_path, tmp_path)
    row = bench.run_variant(b, Recorder([], fail=RuntimeError("x")), bench.parse_args([]))
    assert "teardown left {'gw-a': ['link gbb-wg-a']}" in row.detail


def test_unavailable_variant_is_never_set_up(tmp_path: Path) -> None:
    events: list[str] = []
    b = Bench(FakeLab(), tmp_path, tmp_path)
    row = bench.run_variant(b, Recorder(events, missing="no tool"), bench.parse_args([]))
    assert (row.status, row.detail, events) == (Status.UNAVAILABLE, "no tool", [])


def test_a_process_that_dies_ends_the_wait_with_its_log(tmp_path: Path) -> None:
    b = Bench(FakeLab(), tmp_path, tmp_path)
    b.spawn("gw-a", [sys.executable, "-c", "print('bad config line 3'); raise SystemExit(3)"],
            "dying")
    with pytest.raises(RuntimeError, match="dying exited with 3: bad config line 3"):
        b.wait_for(lambda: False, 10, "never")
    b.close()


def test_a_persistent_server_can_be_restarted_alone(tmp_path: Path) -> None:
    b = Bench(FakeLab(), tmp_path, tmp_path)
    old = b.spawn("server", SLEEPER, "iperf3-server", persistent=True)
    other = b.spawn("server", SLEEPER, "nginx", persistent=True)
    b.stop_persistent("iperf3-server")
    assert old.poll() is not None and other.poll() is None
    new = b.spawn("server", SLEEPER, "iperf3-server", persistent=True)
    b.close()
    assert new.poll() is not None and other.poll() is not None


def test_close_stops_everything_and_destroys_the_lab(tmp_path: Path) -> None:
    lab = FakeLab()
    b = Bench(lab, tmp_path, tmp_path)
    p1 = b.spawn("server", SLEEPER, "iperf3-server", persistent=True)
    p2 = b.spawn("gw-a", SLEEPER, "tunnel")
    b.close()
    assert p1.poll() is not None and p2.poll() is not None
    assert lab.destroyed


def test_measure_tunnel_runs_ping_and_three_iperf3_runs(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    figures = iter([900e6, 1200e6, 800e6])

    def fake_run(self: Bench, node: str, argv: Sequence[str], timeout: float = 30,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        calls.append(list(argv))
        out = IPUTILS if argv[0] == "ping" else iperf_doc(next(figures))
        return subprocess.CompletedProcess(list(argv), 0, out, "")

    monkeypatch.setattr(Bench, "run", fake_run)
    b = Bench(FakeLab(), tmp_path, tmp_path)
    row = bench.measure_tunnel(b, Recorder([]), bench.parse_args(["--quick"]))
    assert (row.mbps_1, row.mbps_4, row.mbps_rev, row.rtt_ms) == (900.0, 1200.0, 800.0, 0.066)
    assert row.cpu_pct is None  # the variant started no process
    iperfs = [c for c in calls if c[0] == "iperf3"]
    assert len(iperfs) == 3 and all("-J" in c and c[c.index("-t") + 1] == "3" for c in iperfs)
    assert "-P" in iperfs[1] and iperfs[1][iperfs[1].index("-P") + 1] == "4"
    assert "-R" in iperfs[2]
    counts = [c[c.index("-c") + 1] for c in calls if c[0] == "ping"]
    assert counts == ["1", "20"]  # reachability first, then the measured 20 pings


class Bypassed(Recorder):
    table = "inspect"

    def setup(self, b: Bench) -> None:
        self.events.append("setup")

    def verify(self, b: Bench, flows: int) -> str | None:
        self.events.append(f"verify {flows}")
        return "the relay logged 0 flows"


def test_inspection_row_fails_when_the_traffic_bypassed_the_proxy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(self: Bench, node: str, argv: Sequence[str], timeout: float = 30,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        size = bench.BIG_FILE_BYTES if argv[-1].endswith("/big") else 1024
        return subprocess.CompletedProcess(list(argv), 0, f"200 {size} 0.001 0.5\n", "")

    monkeypatch.setattr(Bench, "run", fake_run)
    events: list[str] = []
    b = Bench(FakeLab(), tmp_path, tmp_path)
    row = bench.run_variant(b, Bypassed(events), bench.parse_args(["--quick"]))
    assert row.status is Status.FAILED and "logged 0 flows" in row.detail
    assert events == ["setup", "verify 11", "teardown"]  # 10 small GETs + 1 download


def test_results_say_which_tree_was_measured() -> None:
    v = bench.tree_version()
    assert set(v) == {"commit", "uncommitted_changes"}
    if v["commit"] is not None:  # in a git checkout
        assert len(v["commit"]) >= 7 and isinstance(v["uncommitted_changes"], bool)


def test_keep_warm_pair_differs_only_in_keep_warm(tmp_path: Path) -> None:
    """grebe-gre and grebe-gre-cold run the same endpoints, keep-warm on and off, so the
    table shows what keep-warm (bridge/io/warm.py) buys in the same run."""
    from bridge.config import loads_config
    from bridge.lab.bench_variants import write_grebe_configs

    warm = write_grebe_configs(tmp_path / "w", "gre", top=ALL_VARIANTS["grebe-gre"].top)
    cold = write_grebe_configs(tmp_path / "c", "gre", top=ALL_VARIANTS["grebe-gre-cold"].top)
    for gw in warm:
        a = loads_config(warm[gw][0].read_text())
        b = loads_config(cold[gw][0].read_text())
        assert a.keep_warm and not b.keep_warm
        assert a.peers == b.peers and a.tun == b.tun


def test_lossy_and_backend_pairs_print_their_ratio() -> None:
    """Issue 11: inspect-lossy / direct-lossy (goal >= 0.8) and inspect-userspace /
    inspect-kernel (goal >= 1.0) are printed as ratios from the same run."""
    from bridge.lab.bench_report import InspectRow, Status, pair_ratios, render_inspect_table
    from bridge.lab.bench_variants import ALL_VARIANTS, LOSSY_WAN

    rows = [InspectRow("direct-lossy", "d", Status.OK, mbytes_per_s=80.0, ttfb_ms=2.0),
            InspectRow("inspect-lossy", "i", Status.OK, mbytes_per_s=60.0, ttfb_ms=3.0),
            InspectRow("inspect-userspace", "u", Status.OK, mbytes_per_s=200.0, ttfb_ms=1.5),
            InspectRow("inspect-kernel", "k", Status.FAILED, "x")]
    lossy, backend = pair_ratios(rows)
    assert lossy == {"mbytes_per_s": 0.75, "ttfb_ms": 1.5} and backend is None
    assert "inspect-lossy / direct-lossy: download 0.75x (goal >= 0.8)" in \
        render_inspect_table(rows)
    assert {"inspect-lossy", "direct-lossy"} <= set(ALL_VARIANTS)
    assert LOSSY_WAN == {"loss": "2%", "reorder": "3%", "delay": "2ms"}
