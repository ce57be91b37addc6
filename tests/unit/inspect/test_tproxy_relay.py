"""bridge/kernel/relay.py without privileges: the nft ruleset text, and the relay on loopback.

The relay tests run the real asyncio relay with `transparent=False` and the original destination
overridden (no TPROXY on loopback): half-close, RST propagation both ways, connect failure,
inspector RESET, rewriting, and bounded buffers under a reader that does not read.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
from helpers_inspect import rule

from bridge.inspect.rules import parse_rules
from bridge.kernel.relay import TproxyBackend, TproxySettings, nft_ruleset

# --- the ruleset ---------------------------------------------------------------------------


def rules_of(text: str):  # type: ignore[no-untyped-def]
    import tomllib
    return parse_rules(tomllib.loads(text)["inspect"])


def test_ruleset_first_match_order_families_and_iif() -> None:
    rules = rules_of("""
[[inspect]]
name = "skip-admin"
action = "forward"
src = ["198.18.1.99/32"]
[[inspect]]
name = "user"
dst_ports = [443]
inspectors = ["tls"]
[[inspect]]
name = "web"
backend = "kernel"
dst = ["198.18.2.0/24", "2001:db8:2::/64"]
dst_ports = [80, "8000-8080"]
inspectors = ["log"]
[[inspect]]
name = "v6only"
backend = "kernel"
action = "drop"
dst = ["2001:db8:66::/64"]
[[inspect]]
name = "after-last-kernel"
dst_ports = [25]
inspectors = ["log"]
""")
    text = nft_ruleset(rules, TproxySettings(port=15001, mark=0x10, iifnames=("lan0",)))
    lines = [ln.strip() for ln in text.splitlines() if "# rule" in ln]
    assert [ln.split("# rule ")[1] for ln in lines] == [
        "skip-admin", "user", "user", "web", "web", "v6only"]
    assert lines[0].startswith('iifname "lan0"') and "ip saddr 198.18.1.99/32" in lines[0]
    assert lines[0].split("  #")[0].endswith("accept") and "tproxy" not in lines[0]
    assert "tcp dport { 80, 8000-8080 } tproxy ip to :15001 meta mark set 0x10 accept" in lines[3]
    assert "ip6 daddr 2001:db8:2::/64" in lines[4] and "tproxy ip6 to :15001" in lines[4]
    assert "ip6 daddr 2001:db8:66::/64" in lines[5]
    assert lines[5].split("  #")[0].endswith("reject with tcp reset")
    assert "socket transparent 1 meta mark set 0x10 accept" in text
    assert all("tcp flags & (fin | syn | rst | ack) == syn" in ln for ln in lines)
    assert text.startswith("table inet grebe_tproxy\ndelete table inet grebe_tproxy\n")


# --- the relay on loopback -----------------------------------------------------------------


class LoopbackBackend(TproxyBackend):
    """Sends every accepted flow to `target` instead of the TPROXY original destination."""

    target: tuple[str, int] = ("127.0.0.1", 9)

    def original_destination(self, transport):  # type: ignore[no-untyped-def]
        return self.target


async def start_backend(body: str, target: tuple[str, int]) -> LoopbackBackend:
    r = rule('dst = ["127.0.0.0/8"]\nbackend = "kernel"\n' + body)
    b = LoopbackBackend([r], TproxySettings(port=0, transparent=False, flush_interval=0.05),
                        install=False)
    b.target = target
    await b.start()
    return b


def port_of(b: TproxyBackend) -> int:
    return next(p for host, p in b.listening if host == "0.0.0.0")


@asynccontextmanager
async def relayed(
    server: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], body: str,
) -> AsyncIterator[tuple[LoopbackBackend, asyncio.StreamReader, asyncio.StreamWriter]]:
    """`server` on loopback, a backend with rule `body` relaying to it, and a client connected
    to the backend; on exit the backend stops and the server closes."""
    srv = await asyncio.start_server(server, "127.0.0.1", 0)
    try:
        b = await start_backend(body, srv.sockets[0].getsockname())
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(b))
            yield b, reader, writer
        finally:
            await b.stop()
    finally:
        srv.close()


async def read_or_reset(reader: asyncio.StreamReader) -> bytes | ConnectionResetError:
    """All the bytes up to EOF, or the ConnectionResetError that ended the stream."""
    try:
        return await reader.read()
    except ConnectionResetError as exc:
        return exc


async def wait_until(pred, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


def rst_close(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_half_close_both_ways_rewrite_and_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    log_path = tmp_path / "flows.jsonl"
    seen: dict[str, bytes] = {}

    async def main() -> None:
        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen["request"] = await reader.read()          # until the client's FIN
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nhello, nginx!")
            await writer.drain()
            writer.close()

        async with relayed(server, f'inspectors = ["log", "http", "replace"]\n'
                                   f'replace = [["nginx", "grebe"]]\nlog_path = "{log_path}"'
                           ) as (b, reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            writer.write_eof()                            # half-close: we still read
            seen["response"] = await reader.read()
            writer.close()
            await wait_until(lambda: not b.relays, "relay finished")

    run(main())
    assert seen["request"] == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert seen["response"].endswith(b"hello, grebe!")
    rec = json.loads(log_path.read_text())
    assert rec["close"] == "closed" and rec["replaced"] == 1 and rec["backend"] == "kernel"
    assert rec["http"][0]["status"] == 200 and rec["bytes_c2s"] == 27


@pytest.mark.parametrize("who", ["client", "server"])
def test_reset_propagates(who: str) -> None:
    got: dict[str, object] = {}

    async def main() -> None:
        server_writer: list[asyncio.StreamWriter] = []
        server_done = asyncio.Event()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            server_writer.append(writer)
            got["server"] = await read_or_reset(reader)
            server_done.set()

        async with relayed(server, 'inspectors = ["log"]') as (b, reader, writer):
            writer.write(b"ping")
            await wait_until(lambda: server_writer, "server accepted")
            if who == "client":
                rst_close(writer)
                await asyncio.wait_for(server_done.wait(), 5)
            else:
                rst_close(server_writer[0])
                got["client"] = await read_or_reset(reader)
            await wait_until(lambda: not b.relays, "relay finished")
            got["counters"] = dict(b.counters)

    run(main())
    if who == "client":
        assert isinstance(got.get("server"), ConnectionResetError), got
        assert got["counters"]["client_reset"] == 1   # type: ignore[index]
    else:
        assert isinstance(got.get("client"), ConnectionResetError), got
        assert got["counters"]["server_reset"] == 1   # type: ignore[index]


def test_connect_refused_resets_client() -> None:
    async def main() -> object:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
        s.close()                                        # nothing listens there now
        b = await start_backend('inspectors = ["log"]', dead)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(b))
        res = await read_or_reset(reader)
        await wait_until(lambda: not b.relays, "relay finished")
        assert b.counters["connect_failed"] == 1
        await b.stop()
        return res

    assert isinstance(run(main()), ConnectionResetError)


def test_block_resets_both_sides() -> None:
    got: dict[str, object] = {}

    async def main() -> None:
        done = asyncio.Event()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got["server"] = await read_or_reset(reader)
            done.set()

        async with relayed(server, 'inspectors = ["block"]\nblock = ["forbidden"]'
                           ) as (b, reader, writer):
            writer.write(b"hello ")
            await asyncio.sleep(0.05)
            writer.write(b"forbidden words")
            got["client"] = await read_or_reset(reader)
            await asyncio.wait_for(done.wait(), 5)

    run(main())
    assert isinstance(got.get("client"), ConnectionResetError), got
    # the server got "hello " and then the RST, never the forbidden bytes
    assert isinstance(got.get("server"), ConnectionResetError), got


def test_back_pressure_bounds_the_relay_buffer() -> None:
    async def main() -> tuple[int, int]:
        sent = 0
        stop = asyncio.Event()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal sent
            chunk = b"x" * 65536
            while not stop.is_set() and sent < 64 << 20:
                writer.write(chunk)
                sent += len(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.2)
                except TimeoutError:
                    break        # the relay stopped reading from us: back-pressure works
            await stop.wait()
            writer.close()

        async with relayed(server, 'inspectors = ["log"]\nmax_buffer = 65536'
                           ) as (b, reader, writer):
            await asyncio.sleep(0.5)        # the client reads nothing meanwhile
            relay = next(iter(b.relays.values()))
            assert relay.client.transport is not None
            buffered = relay.client.transport.get_write_buffer_size()
            stop.set()
            got = 0
            while got < sent:
                data = await reader.read(1 << 20)
                if not data:
                    break
                got += len(data)
            writer.close()
        return buffered, sent

    buffered, sent = run(main())
    assert buffered <= 65536 + 262144       # bounded: max_buffer + one read
    assert sent < 64 << 20                  # the server was stopped well before the end


def test_deny_at_flow_start_resets_client_and_never_connects() -> None:
    accepted: list[int] = []

    async def main() -> object:
        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            writer.close()

        async with relayed(server, 'inspectors = ["block"]\nblock_dst = ["127.0.0.0/8"]'
                           ) as (b, reader, _writer):
            res = await read_or_reset(reader)
            await wait_until(lambda: not b.relays, "relay finished")
            assert b.counters["denied"] == 1
        return res

    assert isinstance(run(main()), ConnectionResetError)
    assert accepted == []


def test_reload_changes_new_flows_only() -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
            writer.close()

        async with relayed(server, 'inspectors = ["replace"]\nreplace = [["cat", "dog"]]'
                           ) as (b, r1, w1):
            w1.write(b"cat\n")
            first = await r1.readline()
            b.reload([rule('dst = ["127.0.0.0/8"]\nbackend = "kernel"\n'
                           'inspectors = ["replace"]\nreplace = [["cat", "cow"]]')])
            w1.write(b"cat\n")                   # the live flow keeps its old inspectors
            old = await r1.readline()
            r2, w2 = await asyncio.open_connection("127.0.0.1", port_of(b))
            w2.write(b"cat\n")
            new = await r2.readline()
            for w in (w1, w2):
                w.close()
            await wait_until(lambda: not b.relays, "relays finished")
            assert b.counters["reloads"] == 1
        return first, old, new

    assert run(main()) == (b"dog\n", b"dog\n", b"cow\n")
