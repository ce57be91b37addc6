"""What the kernel termination backend shows: TCP_INFO of its sockets, flow records, counters.

Rules
- `parse_tcp_info(raw)` is pure: the bytes of getsockopt(IPPROTO_TCP, TCP_INFO) (struct
  tcp_info of include/uapi/linux/tcp.h, native byte order) -> a leg record with the keys the
  userspace backend's legs use (state, srtt, rto, cwnd, retransmissions, bytes_in, bytes_out),
  so that `grebe flows` prints both alike. Times are converted from the kernel's microseconds to
  seconds. A short or empty buffer (an old kernel, a closed socket) gives None, never raises.
- `tcp_info(sock)` is the one system call; a closed or failing socket gives None.
- `flow_record(relay, now)` is one kernel flow: the flow's part that both backends share
  (`InspectSession.info`, bridge/inspect/session.py) plus `"backend": "kernel"` and the legs.
- `summary(counters, live, bytes)` gives the counters `grebe status` and the Prometheus endpoint
  show; `format_status` / `prometheus` render them. All of these are pure.

Theory of operation
The relay (bridge/kernel/relay.py) owns two kernel sockets per flow: the client leg (the accepted
transparent socket) and the server leg (the transparent upstream socket). The kernel keeps the
TCP state of both, so unlike the userspace backend there is nothing of ours to report about
the legs but what TCP_INFO says: the kernel's state, its smoothed RTT (tcpi_rtt, RFC 6298 SRTT),
RTO, congestion window (segments), total retransmissions and the bytes acked / received.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

# struct tcp_info up to tcpi_bytes_received: 8 u8 (state .. wscale/app_limited bit fields),
# 24 u32 (tcpi_rto .. tcpi_total_retrans), 4 u64 (pacing_rate, max_pacing_rate, bytes_acked,
# bytes_received). Linux >= 4.1 fills at least this much.
_TCP_INFO = struct.Struct("=8B24I4Q")
TCP_INFO_LEN = _TCP_INFO.size
_TCP_INFO_OPT = getattr(socket, "TCP_INFO", 11)

# include/net/tcp_states.h
TCP_STATES = ("?", "ESTABLISHED", "SYN-SENT", "SYN-RECEIVED", "FIN-WAIT-1", "FIN-WAIT-2",
              "TIME-WAIT", "CLOSED", "CLOSE-WAIT", "LAST-ACK", "LISTEN", "CLOSING",
              "NEW-SYN-RECV")


def parse_tcp_info(raw: bytes) -> dict[str, Any] | None:
    """The leg record from raw struct tcp_info bytes, or None if too short."""
    if len(raw) < TCP_INFO_LEN:
        return None
    v = _TCP_INFO.unpack_from(raw, 0)
    state, _ca, retransmits = v[0], v[1], v[2]
    # u32 fields from tcpi_rto: rto ato snd_mss rcv_mss | unacked sacked lost retrans fackets |
    # last_data_sent last_ack_sent last_data_recv last_ack_recv | pmtu rcv_ssthresh rtt rttvar
    # snd_ssthresh snd_cwnd advmss reordering | rcv_rtt rcv_space | total_retrans
    u = v[8:32]
    rto, snd_mss = u[0], u[2]
    rtt, rttvar, ssthresh, cwnd = u[15], u[16], u[17], u[18]
    total_retrans = u[23]
    bytes_acked, bytes_received = v[34], v[35]
    return {
        "state": TCP_STATES[state] if state < len(TCP_STATES) else str(state),
        "srtt": rtt / 1e6, "rttvar": rttvar / 1e6, "rto": rto / 1e6,
        "cwnd": cwnd, "ssthresh": ssthresh, "mss": snd_mss,
        "retransmissions": total_retrans, "retransmits_now": retransmits,
        "bytes_in": bytes_received, "bytes_out": bytes_acked,
    }


def tcp_info(sock: socket.socket | None) -> dict[str, Any] | None:
    """getsockopt(TCP_INFO) of a live socket, parsed; None for a missing or closed socket."""
    if sock is None or sock.fileno() < 0:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO_OPT, 256)
    except OSError:
        return None
    return parse_tcp_info(raw)


def _sock(transport: Any) -> socket.socket | None:
    if transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    # asyncio hands out a TransportSocket wrapper: getsockopt passes through.
    return sock  # type: ignore[no-any-return]


def flow_record(relay: Any, now: float) -> dict[str, Any]:
    """One relayed flow for `grebe flows` (the userspace record's keys, backend "kernel")."""
    rec: dict[str, Any] = relay.session.info(now, relay.created, relay.flow.last_seen)
    rec["backend"] = "kernel"
    rec["client_leg"] = tcp_info(_sock(relay.client.transport))
    rec["server_leg"] = tcp_info(_sock(relay.server.transport))
    return rec


# Reasons a relay ends that are resets (an RST went out to at least one side).
RESET_REASONS = ("client_reset", "server_reset", "inspector_reset", "inspector_error", "idle",
                 "shutdown", "connect_failed")


def summary(counters: dict[str, int], live: int, live_c2s: int, live_s2c: int,
            rejected: int | None) -> dict[str, int]:
    """The backend's headline counters for `grebe status` and the metrics."""
    return {
        "accepted": counters.get("accepted", 0),
        "active": live,
        "denied": counters.get("denied", 0),
        "rejected": rejected or 0,          # SYNs answered with an RST by action = "drop"
        "reset": sum(counters.get(r, 0) for r in RESET_REASONS),
        "idle": counters.get("idle", 0),
        "closed": counters.get("closed", 0),
        "relay_errors": counters.get("relay_errors", 0),
        "bytes_c2s": counters.get("bytes_c2s", 0) + live_c2s,
        "bytes_s2c": counters.get("bytes_s2c", 0) + live_s2c,
        "reloads": counters.get("reloads", 0),
    }


def format_status(kernel: dict[str, Any]) -> str:
    """The `grebe status` line(s) of the kernel backend."""
    s = kernel.get("summary", {})
    return "inspect kernel (tproxy): " + ", ".join(f"{k}={v}" for k, v in s.items())


# summary key -> (metric, labels, help); one meaning per metric (bridge/io/metrics.py)
_TPROXY_METRICS: dict[str, tuple[str, str, str]] = {
    "accepted": ("grebe_tproxy_flows_total", 'outcome="accepted"',
                 "Connections the kernel backend intercepted, by what it did with them."),
    "denied": ("grebe_tproxy_flows_total", 'outcome="denied"', ""),
    "rejected": ("grebe_tproxy_flows_total", 'outcome="rejected"', ""),
    "reset": ("grebe_tproxy_flow_ends_total", 'cause="reset"',
              "Relayed flows that ended, by cause."),
    "idle": ("grebe_tproxy_flow_ends_total", 'cause="idle"', ""),
    "closed": ("grebe_tproxy_flow_ends_total", 'cause="closed"', ""),
    "relay_errors": ("grebe_tproxy_relay_errors_total", "",
                     "Socket errors of the kernel backend's relay."),
    "bytes_c2s": ("grebe_tproxy_bytes_total", 'direction="client_to_server"',
                  "Bytes relayed by the kernel backend, by direction."),
    "bytes_s2c": ("grebe_tproxy_bytes_total", 'direction="server_to_client"', ""),
    "reloads": ("grebe_tproxy_reloads_total", "", "Rule reloads of the kernel backend."),
}


def prometheus(kernel: dict[str, Any]) -> str:
    """Prometheus text for the kernel backend's summary (counters, and `active` as a gauge)."""
    s = kernel.get("summary", {})
    lines = ["# HELP grebe_tproxy_active_flows Flows the kernel backend relays now.",
             "# TYPE grebe_tproxy_active_flows gauge",
             f"grebe_tproxy_active_flows {int(s.get('active', 0))}"]
    done: set[str] = set()
    for metric, _labels, help_text in _TPROXY_METRICS.values():
        if metric in done or not help_text:
            continue
        done.add(metric)
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        for k, (m, labels, _h) in _TPROXY_METRICS.items():
            if m == metric:
                n = int(s.get(k, 0))
                lines.append(f"{metric}{{{labels}}} {n}" if labels else f"{metric} {n}")
    for k, v in s.items():  # a summary key not named above is still exported
        if k != "active" and k not in _TPROXY_METRICS:
            lines += [f"# HELP grebe_tproxy_{k}_total Kernel backend counter {k}.",
                      f"# TYPE grebe_tproxy_{k}_total counter", f"grebe_tproxy_{k}_total {int(v)}"]
    return "\n".join(lines) + "\n"


def _ep(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _leg(info: dict[str, Any] | None) -> str:
    if not info:
        return "-"
    srtt = info.get("srtt") or 0.0
    return (f"{info.get('state', '?')} rtt={srtt * 1000:.1f}ms rto={info.get('rto', 0):.3f}s"
            f" cwnd={info.get('cwnd', 0)} retx={info.get('retransmissions', 0)}"
            f" in={info.get('bytes_in', 0)} out={info.get('bytes_out', 0)}")


def format_flows(answer: dict[str, Any]) -> str:
    """The `grebe flows` table: userspace flows as bridge/terminate_cli prints them, then the
    kernel backend's flows (backend column, the kernel's TCP_INFO for both legs)."""
    flows = answer.get("flows", [])
    user = [f for f in flows if f.get("backend", "userspace") != "kernel"]
    kern = [f for f in flows if f.get("backend") == "kernel"]
    parts = []
    if user or "inspect_kernel" not in answer:
        from bridge.io.flows import format_flows as user_table

        parts.append(user_table({"flows": user, "inspect": answer.get("inspect", {})}))
    if "inspect_kernel" in answer:
        lines = [f"{'id':>5} {'backend':<9} {'client':<40} {'server':<40} {'rule':<12}"
                 f" {'phase':<10} {'age':>8} {'c2s':>11} {'s2c':>11}"]
        for f in kern:
            lines.append(f"{f['id']:>5} {'kernel':<9} {_ep(f['src'], f['sport']):<40}"
                         f" {_ep(f['dst'], f['dport']):<40} {f['rule']:<12} {f['phase']:<10}"
                         f" {f['age']:>7.1f}s {f['bytes_c2s']:>11} {f['bytes_s2c']:>11}")
            lines.append(f"      client leg (kernel TCP_INFO): {_leg(f.get('client_leg'))}")
            lines.append(f"      server leg (kernel TCP_INFO): {_leg(f.get('server_leg'))}")
            lines.append(f"      inspectors: {', '.join(f.get('inspectors', [])) or '-'}")
        lines.append(f"{len(kern)} kernel flow(s); "
                     + format_status(answer["inspect_kernel"]))
        parts.append("\n".join(lines))
    return "\n".join(parts)
