"""Every metric follows the Prometheus conventions: the whole exposition of an endpoint is
parsed by prometheus_client's own parser and by a strict line check, then each metric's name,
type, HELP and labels are held to the naming rules (https://prometheus.io/docs/practices/naming/)."""

from __future__ import annotations

import errno
import re
import time

from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import ICMP, IP

from bridge.config import loads_config
from bridge.counters import EVENT_METRICS, EVENTS, Counters
from bridge.io.fake import MemoryNet, MemoryTun, drive
from bridge.io.loop import Engine
from bridge.io.metrics import IO_COUNTERS, errno_label, io_prometheus
from bridge.kernel.info import prometheus as tproxy_prometheus
from bridge.pipeline import Bridge

NAME = re.compile(r"^grebe_[a-z][a-z0-9_]*[a-z0-9]$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
_PAIR = r'[a-z_]+="(?:[^"\\\n]|\\.)*"'
SAMPLE = re.compile(rf"^([a-z_][a-z0-9_]*)(\{{{_PAIR}(?:,{_PAIR})*\}})? "
                    r"(-?[0-9.e+]+|NaN|\+Inf|-Inf)$")
BANNED_LABELS = {"what", "event", "le_", "type"}  # grab-bag labels this file replaced


def _cfg(me: str, peer: str, name: str, prefix: str) -> str:
    return f"""
[tun]
name = "gb-{name}"
mtu = 1400
addresses = ["198.18.10{name == 'b':d}.1/30"]
[listen]
address = "{me}"
[[peers]]
name = "to-{name}"
endpoint = "{peer}:4754"
prefixes = ["{prefix}"]
keepalive = 1
[[peers]]
name = "never-heard"
endpoint = "198.18.0.9:4754"
prefixes = ["198.18.9.0/24"]
"""


def _exposition() -> tuple[str, Engine]:
    """A running pair over the fakes after traffic, and everything `grebe up` serves."""
    net = MemoryNet()
    t = [1000.0]
    ca = loads_config(_cfg("198.18.0.1", "198.18.0.2", "a", "198.18.2.0/24"))
    cb = loads_config(_cfg("198.18.0.2", "198.18.0.1", "b", "198.18.1.0/24"))
    ea = Engine(Bridge(ca, t[0]), MemoryTun("a"), net.endpoint("198.18.0.1"), lambda: t[0])
    eb = Engine(Bridge(cb, t[0]), MemoryTun("b"), net.endpoint("198.18.0.2"), lambda: t[0])
    ea.tun.inject(bytes(IP(src="198.18.1.1", dst="198.18.2.1") / ICMP()))  # type: ignore[attr-defined]
    drive([ea, eb])
    st = eb.status()
    st["tun"] = {"mtu": 1400}
    st["io"].update(tun_bad_frames=0, tun_write_errors={"eagain": 2}, udp_gso=True,
                    udp_gro=False, udp_send_errors={"emsgsize": 1, "notanerrno": 3},
                    control={"clients": 1, "timeouts": 0, "rejected": 0},
                    metrics={"clients": 2, "timeouts": 0, "rejected": 0})
    kernel = {"summary": {"accepted": 3, "active": 1, "denied": 0, "rejected": 0, "reset": 0,
                          "idle": 1, "closed": 2, "relay_errors": 0, "bytes_c2s": 10,
                          "bytes_s2c": 20, "reloads": 0}}
    text = eb.metrics_text() + io_prometheus(st, "0.1.0") + tproxy_prometheus(kernel)
    return text, eb


def _strict(text: str) -> dict[str, tuple[str, str, list[str]]]:
    """Hand check of the text format 0.0.4: per metric exactly one HELP, then one TYPE, then
    its samples, contiguous; returns {metric: (type, help, sample lines)}."""
    assert text.endswith("\n")
    fams: dict[str, tuple[str, str, list[str]]] = {}
    current: str | None = None
    help_text = ""
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in fams, f"{name}: second HELP (metric split or duplicated)"
            assert help_text.strip(), f"{name}: empty HELP"
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and name not in fams, f"{name}: TYPE not after its HELP"
            assert kind in ("counter", "gauge"), line
            fams[name] = (kind, help_text, [])
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            assert m.group(1) == current and current in fams, f"{line!r} outside its family"
            fams[current][2].append(line)
    return fams


def test_exposition_parses_and_every_metric_follows_the_naming_rules() -> None:
    text, _ = _exposition()
    fams = _strict(text)
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    for name, (kind, _help, samples) in fams.items():
        assert NAME.match(name), name
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} must end in _total"
            assert name.removesuffix("_total") in parsed, name  # the parser strips _total
            assert parsed[name.removesuffix("_total")].type == "counter"
        else:
            assert not name.endswith("_total"), f"gauge {name} must not end in _total"
            assert parsed[name].type == "gauge"
        for unit in ("mtu", "timestamp", "age", "duration", "size"):
            if unit in name.split("_"):
                assert name.endswith(("_bytes", "_seconds")), f"{name}: unit not in the name"
        for line in samples:
            labels = dict(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', line.partition(" ")[0]))
            for k in labels:
                assert LABEL.match(k) and k not in BANNED_LABELS, f"{name}: label {k}"
            if "errno_name" in labels:
                assert labels["errno_name"] in set(errno.errorcode.values()) | {"OTHER"}
    assert "grebe_io_total" not in fams and "grebe_events_total" not in fams
    assert "grebe_tproxy_total" not in fams and "grebe_tun_mtu" not in fams


def test_the_named_metrics_are_there_with_their_values() -> None:
    text, eb = _exposition()
    assert "grebe_tun_mtu_bytes 1400\n" in text
    assert re.search(r'^grebe_build_info\{version="0\.1\.0",python="3\.\d+\.\d+"\} 1$', text,
                     re.M)
    assert 'grebe_io_errors_total{op="udp_send",errno_name="EMSGSIZE"} 1' in text
    assert 'grebe_io_errors_total{op="udp_send",errno_name="OTHER"} 3' in text
    assert 'grebe_io_errors_total{op="tun_write",errno_name="EAGAIN"} 2' in text
    assert re.search(r'^grebe_io_syscalls_total\{op="udp_recv"\} [1-9]', text, re.M)
    assert re.search(r'^grebe_io_packets_total\{op="udp_recv"\} 1$', text, re.M)
    assert 'grebe_peer_up{peer="to-b"} 1' in text
    assert 'grebe_peer_up{peer="never-heard"} 0' in text  # 0 until first heard
    seen = re.search(r'^grebe_peer_last_seen_timestamp_seconds\{peer="to-b"\} ([0-9.]+)$',
                     text, re.M)
    assert seen and abs(float(seen.group(1)) - time.time()) < 60
    assert 'last_seen_timestamp_seconds{peer="never-heard"}' not in text
    assert 'grebe_tproxy_bytes_total{direction="server_to_client"} 20' in text


def test_every_io_status_key_has_a_metric_name() -> None:
    """A key added to Engine.status()["io"] without a name lands in grebe_io_<key>_total;
    this test makes it get a proper one."""
    text, eb = _exposition()
    assert not re.search(r"^grebe_io_(?!syscalls|packets|errors)[a-z_]+_total", text, re.M), \
        "name the new I/O counter in bridge/io/metrics.py IO_COUNTERS"
    for key, v in eb.status()["io"].items():
        if isinstance(v, int) and not isinstance(v, bool):
            assert key in IO_COUNTERS, key


def test_every_event_is_in_exactly_one_metric() -> None:
    members = [e for _, ms in EVENT_METRICS.values() for e, _ in ms]
    assert sorted(members) == sorted(EVENTS)
    c = Counters(["p"])
    c.events[EVENTS.index("keepalive_rx")] = 5
    assert 'grebe_keepalives_total{direction="received"} 5' in c.prometheus()


def test_errno_labels_are_bounded() -> None:
    assert errno_label("emsgsize") == "EMSGSIZE"
    assert errno_label("whatever") == "OTHER"
