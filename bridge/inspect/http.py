"""Built-in `http` inspector: HTTP/1.x requests and responses of a flow, parsed with h11.

Rules
- Read-only: it never changes or delays a byte (data() returns None).
- Both directions are parsed (RFC 9112): requests from the client, responses from the server,
  keep-alive and pipelining included. Each exchange becomes an entry of `flow.metadata["http"]`:
  method, target, version, request headers, request body bytes, then status, reason, response
  headers, response body bytes. At most MAX_EXCHANGES entries are kept; the rest are counted in
  `flow.metadata["http_more"]`.
- Tolerant of non-HTTP: on the first parse error (h11 RemoteProtocolError), a protocol switch
  (101 / CONNECT) or state it cannot follow, it stops parsing the flow and notes why in
  `flow.metadata["http_stopped"]`. It never raises on what the peers send.
- Bounded memory: h11 keeps at most its incomplete-event limit per direction; response bytes that
  arrive before the request they answer are held up to HOLD_LIMIT, then parsing stops.

Theory of operation
h11 is a protocol *endpoint*, not a sniffer, so each flow gets two mirrored h11 connections:
`srv` plays the server and reads the client's bytes; `cli` plays the client and reads the
server's bytes. Each one needs to believe it sent the other half of every exchange, so when `srv`
yields a Request we `send()` a header-only copy of it (framing headers replaced by
`content-length: 0`) into `cli`, which then knows how to frame the response (HEAD, 304...). When
`cli` yields the Response we send a header-only copy into `srv`, and when the response ends both
mirrors finish the cycle and `start_next_cycle()`, which releases the next pipelined request that
`srv` was holding (h11 pauses after each request until it is answered). The bytes the mirrors
"send" are discarded.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any

import h11

from bridge.inspect.api import Direction, Flow, Inspector

MAX_EXCHANGES = 64
SKIP_MIN = 64 * 1024        # Content-Length bodies from this size on are counted, not parsed
MAX_HEADERS = 64
HOLD_LIMIT = 256 * 1024
_FRAMING = {b"content-length", b"transfer-encoding", b"expect"}


def _headers(raw: Any) -> list[list[str]]:
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in list(raw)[:MAX_HEADERS]]


def _content_length(raw: Any) -> int | None:
    """The Content-Length of a message framed by it alone (RFC 9112 §6.3), else None."""
    values = [v for n, v in raw if n == b"content-length"]
    if len(values) != 1 or any(n == b"transfer-encoding" for n, _ in raw):
        return None
    try:
        return int(values[0])
    except ValueError:
        return None


def _header_only(raw: Any, *, length: bool) -> list[tuple[bytes, bytes]]:
    out = [(n, v) for n, v in raw if n not in _FRAMING]
    if length:
        out.append((b"content-length", b"0"))
    return out


class _Stop(Exception):
    """Internal: give up parsing this flow."""


# RFC 9112 §3: request-line = method SP request-target SP HTTP-version (method is a token);
# §4: status-line = HTTP-version SP status-code SP [reason-phrase]
_REQUEST_START = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}( |$)")
_RESPONSE_START = re.compile(rb"H(T(T(P(/|$)|$)|$)|$)")


def _sniff(head: bytes, start: re.Pattern[bytes], what: str) -> bool:
    """Fail fast on a stream that cannot be HTTP/1.x (SSH, TLS...).

    `head` is the stream's first bytes so far. Returns True once they look like HTTP, False
    while undecided; raises _Stop when they cannot be.
    """
    m = start.match(head[:40])
    if m is None:
        raise _Stop(f"not HTTP/1.x (does not start with {what})")
    return m.end() < len(head) or m.group(0).endswith((b" ", b"/"))


class _HttpFlow:
    __slots__ = ("srv", "cli", "pending", "queue", "exchanges", "answering", "requesting",
                 "stopped", "skip", "close_after", "head_c2s", "head_s2c")

    def __init__(self) -> None:
        self.srv = h11.Connection(h11.SERVER)
        self.cli = h11.Connection(h11.CLIENT)
        self.pending = bytearray()             # server bytes that came before their request
        self.queue: deque[dict[str, Any]] = deque()   # exchanges waiting for their response
        self.exchanges: list[dict[str, Any]] = []
        self.answering: dict[str, Any] | None = None
        self.requesting: dict[str, Any] | None = None
        self.stopped = False
        self.skip = 0               # response body bytes still to count without h11
        self.close_after = False    # the skipped response ends the connection (no keep-alive)
        self.head_c2s: bytes | None = b""    # first bytes, until they look like HTTP
        self.head_s2c: bytes | None = b""


class HttpInspector(Inspector):
    """See the module docstring."""

    name = "http"

    observer = True  # only watches (bridge/inspect/api.py)

    def __init__(self, rule: object = None) -> None:
        self.rule = rule

    def _state(self, flow: Flow) -> _HttpFlow:
        st: _HttpFlow | None = flow.state.get(self)
        if st is None:
            st = flow.state[self] = _HttpFlow()
            flow.metadata["http"] = st.exchanges
        return st

    def data(self, flow: Flow, direction: Direction, data: bytes) -> None:
        st = self._state(flow)
        if st.stopped or not data:      # h11 takes b"" for end of stream: never pass it on
            return None
        try:
            if direction is Direction.CLIENT_TO_SERVER:
                if st.head_c2s is not None:
                    st.head_c2s += data[:40]
                    if _sniff(st.head_c2s, _REQUEST_START, "a request line"):
                        st.head_c2s = None
                st.srv.receive_data(data)
                self._pump_requests(flow, st)
                return None
            if st.head_s2c is not None:
                st.head_s2c += data[:40]
                if _sniff(st.head_s2c, _RESPONSE_START, "a status line"):
                    st.head_s2c = None
            if st.skip:
                self._skip_body(flow, st, data)
                return None
            if st.cli.our_state is not h11.IDLE:
                st.cli.receive_data(data)
                self._pump_responses(flow, st)
            else:
                st.pending += data
                if len(st.pending) > HOLD_LIMIT:
                    raise _Stop("server data without a request")
        except h11.RemoteProtocolError as exc:
            self._stop(flow, st, f"{direction.value}: not HTTP/1.x ({exc})")
        except (h11.LocalProtocolError, RuntimeError) as exc:
            self._stop(flow, st, f"{direction.value}: cannot follow ({exc})")
        except _Stop as exc:
            self._stop(flow, st, f"{direction.value}: {exc}")
        return None

    def eof(self, flow: Flow, direction: Direction) -> None:
        st = flow.state.get(self)
        if st is None or st.stopped:
            return None
        conn = st.srv if direction is Direction.CLIENT_TO_SERVER else st.cli
        if direction is Direction.SERVER_TO_CLIENT and conn.our_state is h11.IDLE:
            return None
        try:
            conn.receive_data(b"")
            if direction is Direction.CLIENT_TO_SERVER:
                self._pump_requests(flow, st)
            else:
                self._pump_responses(flow, st)
        except (h11.ProtocolError, RuntimeError, _Stop) as exc:
            self._stop(flow, st, f"{direction.value}: at close: {exc}")
        return None

    def _stop(self, flow: Flow, st: _HttpFlow, why: str) -> None:
        st.stopped = True
        st.pending.clear()
        flow.metadata["http_stopped"] = why

    # -- client -> server ------------------------------------------------------------------

    def _pump_requests(self, flow: Flow, st: _HttpFlow) -> None:
        while True:
            ev = st.srv.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                ex = {"method": ev.method.decode("latin-1"),
                      "target": ev.target.decode("latin-1"),
                      "version": ev.http_version.decode("ascii"),
                      "headers": _headers(ev.headers), "request_body": 0}
                if len(st.exchanges) < MAX_EXCHANGES:
                    st.exchanges.append(ex)
                else:
                    flow.metadata["http_more"] = flow.metadata.get("http_more", 0) + 1
                if ev.method == b"CONNECT":
                    raise _Stop("CONNECT tunnel")
                st.queue.append(ex)
                st.requesting = ex
                self._register(flow, st, ev)
            elif isinstance(ev, h11.Data):
                if st.requesting is not None:
                    st.requesting["request_body"] += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                # The response may have ended before the request did (early answer).
                self._next_cycle(st)

    def _register(self, flow: Flow, st: _HttpFlow, req: h11.Request) -> None:
        """Tell the `cli` mirror that this request was sent, then read held server bytes."""
        headers = _header_only(req.headers, length=True)
        if not any(n == b"host" for n, _ in headers):
            headers.append((b"host", b"unknown"))
        st.cli.send(h11.Request(method=req.method, target=req.target, headers=headers))
        st.cli.send(h11.EndOfMessage())
        if st.pending:
            held = bytes(st.pending)
            st.pending.clear()
            st.cli.receive_data(held)
        self._pump_responses(flow, st)

    # -- server -> client ------------------------------------------------------------------

    def _pump_responses(self, flow: Flow, st: _HttpFlow) -> None:
        while True:
            ev = st.cli.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.InformationalResponse):
                ex = st.queue[0] if st.queue else {}
                ex.setdefault("informational", []).append(ev.status_code)
                if ev.status_code == 101:
                    raise _Stop("protocol switched (101)")
                st.srv.send(h11.InformationalResponse(status_code=ev.status_code,
                                                      headers=_header_only(ev.headers,
                                                                           length=False)))
            elif isinstance(ev, h11.Response):
                ex = st.queue[0] if st.queue else {}
                ex.update(status=ev.status_code, reason=ev.reason.decode("latin-1"),
                          response_version=ev.http_version.decode("ascii"),
                          response_headers=_headers(ev.headers), response_body=0)
                st.answering = ex
                no_body = ev.status_code in (204, 304) or ex.get("method") == "HEAD"
                st.srv.send(h11.Response(status_code=ev.status_code,
                                         headers=_header_only(ev.headers, length=not no_body)))
                length = None if no_body else _content_length(ev.headers)
                if length is not None and length >= SKIP_MIN:
                    self._start_skip(flow, st, ev, length)
                    return
            elif isinstance(ev, h11.Data):
                if st.answering is not None:
                    st.answering["response_body"] += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                self._end_cycle(flow, st)

    # -- large bodies: counted, not parsed ---------------------------------------------------

    def _start_skip(self, flow: Flow, st: _HttpFlow, resp: h11.Response, length: int) -> None:
        """Count a Content-Length body ourselves: h11 would copy every byte three times.

        The `cli` mirror is replaced by a fresh connection (what it would be after
        start_next_cycle); the body bytes h11 already buffered are taken back from it.
        """
        buffered, _closed = st.cli.trailing_data
        req_headers = st.answering.get("headers", []) if st.answering else []
        tokens = ",".join(v.lower() for n, v in req_headers if n == "connection")
        tokens += "," + ",".join(v.decode("latin-1").lower()
                                 for n, v in resp.headers if n == b"connection")
        st.close_after = ("close" in tokens or resp.http_version != b"1.1"
                          or (st.answering or {}).get("version") != "1.1")
        st.cli = h11.Connection(h11.CLIENT)
        st.skip = length
        self._skip_body(flow, st, bytes(buffered))

    def _skip_body(self, flow: Flow, st: _HttpFlow, data: bytes) -> None:
        """Count up to `st.skip` body bytes of `data`; what follows goes to `pending`.

        Raises _Stop on data after a response that closes the connection.
        """
        n = min(st.skip, len(data))
        st.skip -= n
        if st.answering is not None:
            st.answering["response_body"] += n
        if st.skip:
            return
        if st.close_after and len(data) > n:
            raise _Stop("data after the response that closes the connection")
        # What follows the body answers the next request: it waits in `pending` until
        # _end_cycle -> _pump_requests -> _register tells the fresh mirror that request.
        st.pending += data[n:]
        self._end_cycle(flow, st)     # with close_after the srv mirror is now MUST_CLOSE
        if len(st.pending) > HOLD_LIMIT:
            raise _Stop("server data without a request")

    def _end_cycle(self, flow: Flow, st: _HttpFlow) -> None:
        st.srv.send(h11.EndOfMessage())
        if st.queue:
            st.queue.popleft()
        st.answering = None
        if self._next_cycle(st):
            # The next pipelined request (held by h11 while paused) can now come out.
            self._pump_requests(flow, st)

    @staticmethod
    def _next_cycle(st: _HttpFlow) -> bool:
        """Start the next exchange once both mirrors finished this one (keep-alive)."""
        done = {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}
        fresh = st.cli.states == {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}
        if st.srv.states != done or not (fresh or st.cli.states == done):
            return False    # MUST_CLOSE (Connection: close / HTTP/1.0) or a message unfinished
        st.srv.start_next_cycle()
        if not fresh:       # a fresh mirror (after a counted body) is already at a cycle start
            st.cli.start_next_cycle()
        return True
