"""Issue 11 #7: receive-buffer autotuning and send-buffer growth (Linux tcp_rmem/tcp_wmem
style) over a long fat link; goodput printed, never asserted."""

from __future__ import annotations

from netsim import LinkSpec, transfer

from stack.tcp_config import TcpConfig

SPEC = LinkSpec(delay=0.025, rate=50e6, queue=2000)  # 50 ms RTT, BDP 2.5 MB


def _cfg(**kw: int) -> TcpConfig:
    return TcpConfig(rto_min=0.2, rto_var_min=0.2, isn_key=b"netsim", recv_buffer=65536,
                     send_buffer=65536, **kw)


def test_buffers_grow_with_the_bandwidth_delay_product() -> None:
    fixed = transfer(8_000_000, SPEC, seed=1, config=_cfg())
    tuned = transfer(8_000_000, SPEC, seed=1,
                     config=_cfg(recv_buffer_max=4 << 20, send_buffer_max=4 << 20))
    print(f"\n64 KB fixed: {fixed.goodput_sim:.1f} MB/s; autotuned to 4 MB: "
          f"{tuned.goodput_sim:.1f} MB/s ({tuned.goodput_sim / fixed.goodput_sim:.1f}x)")
    assert fixed.ok and tuned.ok
    assert fixed.receiver_info["wscale"] == (1, 1)  # type: ignore[comparison-overlap]
    ws = tuned.receiver_info["wscale"]
    assert isinstance(ws, tuple) and ws[1] >= 7  # room for 4 MB (RFC 7323 §2.3)
    # the advertised window and the send buffer left 64 KB far behind
    assert tuned.receiver_info["rcv_buff"] > 16 * 65536  # type: ignore[operator]
    assert tuned.sender_info["snd_buff"] > 16 * 65536  # type: ignore[operator]
    assert fixed.receiver_info["rcv_buff"] == 65536
