"""UdpEndpoint (GSO runs, GRO split, plain fallback) on loopback; control socket; CLI parts."""

from __future__ import annotations

import json
import os
import select
import threading

import pytest

from bridge import cli
from bridge.io.control import ControlServer, MetricsServer, request
from bridge.io.udp import UdpEndpoint


def _drain(ep: UdpEndpoint, want: int) -> list[tuple[bytes, tuple[str, int]]]:
    got: list[tuple[bytes, tuple[str, int]]] = []
    p = select.poll()
    p.register(ep.fileno(), select.POLLIN)
    while len(got) < want and p.poll(2000):
        ep.recv_datagrams(got)
    return got


@pytest.mark.parametrize("gso", [True, False])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_gso_send_gro_receive_keep_datagrams(host: str, gso: bool) -> None:
    a = UdpEndpoint(host, 0, gso=gso)
    b = UdpEndpoint(host, 0, gro=gso)
    dest = b.sock.getsockname()[:2]
    # runs of equal size, a shorter one ending a run, a larger one starting the next
    sizes = [1000] * 70 + [500] + [1200] * 3 + [7] + [1400]
    dgrams = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    calls = a.send_datagrams(dest, dgrams)
    got = _drain(b, len(dgrams))
    assert [d for d, _ in got] == dgrams
    assert {addr for _, addr in got} == {a.sock.getsockname()[:2]}
    if gso:
        assert calls < len(dgrams) // 10  # batched: 64 + (6 + 500) + (3 + 7) + 1400
    assert a.send_errors == {}
    a.close()
    b.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_flow_hash_source_ports_leave_through_the_pool(host: str) -> None:
    """RFC 8086 §3.2.1: each flow-hash port maps to one pool socket bound in 49152-65535;
    two flows get different source ports, one flow keeps its port, order is kept."""
    a = UdpEndpoint(host, 0, sport_pool=8)
    b = UdpEndpoint(host, 0)
    dest = b.sock.getsockname()[:2]
    flows = [50001, 50002, 50001, 50001, 50002, 50003]  # slots 1, 2, 1, 1, 2, 3
    dgrams = [bytes([i]) * 1000 for i in range(len(flows))]
    for _ in range(2):
        a.send_datagrams(dest, dgrams, flows)
    got = _drain(b, 2 * len(dgrams))
    assert [d for d, _ in got] == dgrams * 2
    ports = [addr[1] for _, addr in got]
    by_flow: dict[int, set[int]] = {}
    for f, port in zip(flows * 2, ports, strict=True):
        by_flow.setdefault(f, set()).add(port)
    assert all(len(v) == 1 for v in by_flow.values())  # stable per flow
    assert len({next(iter(v)) for v in by_flow.values()}) == 3  # distinct flows, ports
    assert all(49152 <= p <= 65535 for p in ports)
    assert a.sock.getsockname()[1] not in ports
    a.close()
    b.close()


def test_without_a_pool_the_listen_port_sends() -> None:
    a = UdpEndpoint("127.0.0.1", 0, sport_pool=0)
    b = UdpEndpoint("127.0.0.1", 0)
    a.send_datagrams(b.sock.getsockname()[:2], [b"x", b"y"], [50001, 50002])
    got = _drain(b, 2)
    assert {addr for _, addr in got} == {a.sock.getsockname()[:2]}
    a.close()
    b.close()


def test_oversized_datagram_counted_not_raised() -> None:
    a = UdpEndpoint("127.0.0.1", 0)
    a.send_datagrams(("127.0.0.1", 9), [bytes(70000)])
    assert a.send_errors == {"emsgsize": 1}
    a.close()


def _serve(srv: ControlServer | MetricsServer, n: int) -> threading.Thread:
    def run() -> None:
        p = select.poll()
        p.register(srv.fileno(), select.POLLIN)
        for _ in range(n):
            if p.poll(5000):
                srv.on_readable()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_control_socket_commands() -> None:
    name = f"@grebe-test/{os.getpid()}"
    srv = ControlServer(name)
    srv.register("status", lambda req: {"ok": True, "req": req})
    t = _serve(srv, 2)
    assert request(name, "status") == {"ok": True, "req": {"cmd": "status"}}
    assert "unknown command" in request(name, "nope")["error"]
    t.join()
    assert srv.handle(b"not json")["error"].startswith("bad request")
    assert srv.handle(b"[1]")["error"].startswith("bad request")
    srv.close()
    with pytest.raises(OSError):
        request(name, "status", timeout=1)


def test_metrics_http() -> None:
    import socket

    m = MetricsServer("127.0.0.1:0", lambda: "grebe_x 1\n")
    t = _serve(m, 1)
    with socket.create_connection(m.address, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    t.join()
    m.close()
    assert data.startswith(b"HTTP/1.0 200 OK")
    assert data.endswith(b"\r\n\r\ngrebe_x 1\n")


def test_cli_status_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    name = f"@grebe-test-status/{os.getpid()}"
    srv = ControlServer(name)
    st = {"tun": {"name": "grebe0", "mtu": 1424, "mtu_source": "auto"},
          "peers": [{"name": "site-b", "endpoint": "198.18.0.2:4754", "up": True,
                     "last_seen_s": 0.5, "rx_packets": 3, "rx_bytes": 300, "tx_packets": 4,
                     "tx_bytes": 400}],
          "drops": {"wrong_key": 2, "malformed": 0}, "events": {}, "io": {"udp_sends": 1}}
    srv.register("status", lambda req: st)
    t = _serve(srv, 2)
    assert cli.main(["status", "-s", name]) == 0
    out = capsys.readouterr().out
    assert "site-b" in out and "wrong_key=2" in out and "malformed" not in out
    assert cli.main(["status", "--json", "-s", name]) == 0
    assert json.loads(capsys.readouterr().out) == st
    t.join()
    srv.close()
    assert cli.main(["status", "-s", name]) == 1
    assert "no grebe on" in capsys.readouterr().err


def test_check_config_reports_every_error(tmp_path: object, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    import pathlib

    p = pathlib.Path(str(tmp_path)) / "bad.toml"
    p.write_text('[tun]\nname = "x"\nmtu = 5\n[listen]\naddress = "nope"\n'
                 '[[peers]]\nname = "b"\nendpoint = "198.18.0.2:4754"\nprefixes = ["1.2.3.4/8"]\n')
    assert cli.main(["check-config", str(p)]) == 2
    err = capsys.readouterr().err
    for key in ("tun.mtu", "listen.address", "peers[0].prefixes[0]"):
        assert key in err
    topo = pathlib.Path(__file__).parents[3] / "topologies"
    for good in sorted(topo.glob("two-sites*/*.toml")):
        assert cli.main(["check-config", str(good)]) == 0, good


def test_subcommand_table_is_extensible() -> None:
    calls = []
    cli.register("hello", "test", lambda p: p.add_argument("--x"),
                 lambda a: calls.append(a.x) or 7)
    try:
        assert cli.main(["hello", "--x", "1"]) == 7
        assert calls == ["1"]
    finally:
        del cli.COMMANDS["hello"]


def test_io_prometheus_renders_counters_and_flags() -> None:
    from bridge.io.metrics import io_prometheus

    text = io_prometheus({"tun": {"mtu": 1400}, "io": {"udp_sends": 3, "udp_gso": True,
                                                      "udp_send_errors": {"emsgsize": 2}}})
    assert 'grebe_io_syscalls_total{op="udp_send"} 3' in text
    assert 'grebe_io_errors_total{op="udp_send",errno_name="EMSGSIZE"} 2' in text
    assert 'grebe_udp_offload_enabled{feature="gso"} 1' in text
    assert "grebe_tun_mtu_bytes 1400" in text
    assert "True" not in text


def test_dual_stack_socket_speaks_plain_ipv4_addresses() -> None:
    dual = UdpEndpoint("::", 0)
    v4 = UdpEndpoint("127.0.0.1", 0)
    port = dual.sock.getsockname()[1]
    v4.send_datagrams(("127.0.0.1", port), [b"ping"])
    got = _drain(dual, 1)
    assert got == [(b"ping", v4.sock.getsockname())]  # not ::ffff:127.0.0.1
    dual.send_datagrams(got[0][1], [b"pong"])
    assert _drain(v4, 1) == [(b"pong", ("127.0.0.1", port))]
    dual.close()
    v4.close()


def test_dual_stack_gso_to_ipv4_keeps_the_ipv4_size_limit() -> None:
    """A "::" socket sending to an IPv4 peer: one GSO send may carry 65,507 bytes (IPv4 total
    length), not IPv6's 65,527. 44 datagrams of 1,489 bytes are 65,516: they must be split."""
    from bridge.gso import UdpRun

    dual = UdpEndpoint("::", 0)
    v4 = UdpEndpoint("127.0.0.1", 0, gro=False)
    dgrams = [bytes([i]) * 1489 for i in range(45)]
    run = UdpRun(b"".join(dgrams))
    run.seg = 1489
    for payload in ([run], dgrams):
        dual.send_datagrams(v4.sock.getsockname()[:2], payload)
        assert [d for d, _ in _drain(v4, 45)] == dgrams
    assert dual.send_errors == {} and not dual.too_big
    dual.close()
    v4.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_consecutive_gro_batches_of_one_source_are_joined(host: str) -> None:
    """Several GSO sends of equal datagrams queue several GRO buffers; one recv_datagrams call
    hands them to the core as one GroBatch (datagrams intact, in order), up to JOIN_MAX, and
    never joins across a short datagram or another source."""
    from bridge.gro import GroBatch
    from bridge.io.udp import JOIN_MAX

    a = UdpEndpoint(host, 0)
    c = UdpEndpoint(host, 0)
    b = UdpEndpoint(host, 0, gro_batch=GroBatch)
    assert b.gro  # this kernel has UDP GRO (without it the adapter builds no batches)
    assert b.caps.gro_batches and not a.caps.gro_batches
    dest = b.sock.getsockname()[:2]
    run = [bytes([i]) * 1000 for i in range(40)]
    for _ in range(3):
        a.send_datagrams(dest, run)
    a.send_datagrams(dest, [b"s" * 300])  # a short one: ends the joinable stretch
    a.send_datagrams(dest, run)
    c.send_datagrams(dest, run)  # another source: its own batch
    got: list = []
    b.recv_datagrams(got)
    flat: list[tuple[bytes, tuple]] = []
    for payload, addr in got:
        parts = payload.split() if type(payload) is GroBatch else [payload]
        flat += [(bytes(p), addr) for p in parts]
    sa, sc = a.sock.getsockname()[:2], c.sock.getsockname()[:2]
    assert flat == [(d, sa) for d in run * 3 + [b"s" * 300] + run] + [(d, sc) for d in run]
    batches = [p for p, _ in got if type(p) is GroBatch]
    assert len(got) < 6  # joined: not one entry per GRO buffer
    assert max(len(p.buf) for p in batches) >= 3 * 40 * 1000 + 300
    assert all(len(p.buf) <= JOIN_MAX for p in batches)
    for e in (a, b, c):
        e.close()


def test_emsgsize_marks_the_peer_for_a_path_mtu_update() -> None:
    """RFC 1191 / RFC 8201: EMSGSIZE (or a GSO batch's EINVAL above the path MTU) is counted
    and puts the peer, unmapped, in `too_big`; path_mtu() reads the kernel's value."""
    import errno

    u = UdpEndpoint("127.0.0.1", 0)
    u._err(OSError(errno.EMSGSIZE, "too long"), ("::ffff:198.18.0.2", 4754))  # noqa: SLF001
    u._err(OSError(errno.ECONNREFUSED, "refused"), ("198.18.0.3", 4754))  # noqa: SLF001
    assert u.too_big == {("198.18.0.2", 4754)}
    assert u.send_errors == {"emsgsize": 1, "econnrefused": 1}
    assert (u.path_mtu(("127.0.0.1", 9)) or 0) > 60000  # loopback: about 64 KB
    assert u._over_path_mtu(65536, ("127.0.0.1", 9))  # noqa: SLF001
    assert not u._over_path_mtu(1400, ("127.0.0.1", 9))  # noqa: SLF001
    u.close()
