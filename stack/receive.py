"""Receiver: the receive side of one connection (RCV.*, reassembly, ACK policy, window).

Rules:
- RFC 9293 §3.3.1: RCV.NXT (`nxt`), RCV.WND as the right edge last advertised (`adv`),
  IRS (`irs`), kept as absolute positions (stack/seq.py): the peer's SYN is 0, its first
  data byte 1. `unwrap` turns a 32-bit number into a position near RCV.NXT.
- RFC 9293 §3.10.7.4 seventh step: in-order text is delivered; text beyond RCV.NXT inside
  the window is kept for later (SHLD-31, bounded by the ReassemblyBuffer caps: what does
  not fit is dropped and counted); a duplicate part is trimmed. When a gap fills, the
  pieces behind it follow at once, and a FIN that came after the gap takes effect then
  (also a bare FIN, with no bytes held: `gap` covers both, and keeps header prediction off
  until the gap fills).
- ACK policy (RFC 9293 §3.8.6.3, RFC 5681 §4.2): ACK at least every second full-sized
  segment (SHLD-19; "full" is the largest segment seen, at most one MSS, as Linux's
  rcv_mss), otherwise within `delayed_ack` (MUST-40: < 0.5 s); ACK at once for
  out-of-order data and when a gap fills.
- Receive-buffer autotuning (`recv_buffer_max` > `recv_buffer`; Linux tcp_rmem and
  tcp_rcv_space_adjust): once per SRTT, RCV.BUFF grows to four times what arrived in the
  last SRTT plus 16 MSS when that is more, up to `recv_buffer_max`; the window
  scale is chosen for the maximum (TcpConfig.rcv_wscale, RFC 7323 §2.3).
- Receiver SWS avoidance (RFC 9293 §3.8.6.2.2, MUST-39): the right edge moves by at least
  min(RCV.BUFF/2, MSS); it never moves left (no window shrinking); a window update is worth
  sending when the window grew by min(RCV.BUFF/2, 2 MSS). RFC 7323 §2.3: the field is the
  window shifted right by Rcv.Wind.Shift, rounded up.
- SACK blocks (RFC 2018 §4): the most recent first, 3 next to a TSopt, 4 without, led once
  by a D-SACK block for a duplicate just received (RFC 2883 §4).
- RFC 9293 §3.10.7.4 first step, the acceptability test (four cases by SEG.LEN and
  RCV.WND): an unacceptable segment is dropped and ACKed (a duplicate with SACK is reported
  as D-SACK, RFC 2883 §4). An ACK exactly at RCV.NXT while the window is zero is not
  acceptable text but its ACK, URG and RST are processed (RFC 9293 §3.10.7.4, "If the
  RCV.WND is zero, no segments will be acceptable, but special allowance should be made
  to accept valid ACKs, URGs, and RSTs").
- RFC 7323 §3.2 / §5.3 before that test: with timestamps on, a non-RST segment without a
  TSopt is dropped; PAWS drops a segment whose TSval is older than TS.Recent (unless
  TS.Recent is older than 24 days) and sends an ACK (R1).
- RFC 5961 §7: challenge ACKs are limited to `challenge_ack_limit` per second. The ACKs
  answering an unacceptable or PAWS-rejected segment, or an ACK of unsent data, are
  limited to one per `invalid_ack_interval` (500 ms, Linux tcp_invalid_ratelimit) when the
  segment carried no data, SYN or FIN: else two stacks whose views of the sequence space
  were desynchronised by one injected segment answer each other's ACKs forever.
- RFC 7323 §4.3: TS.Recent takes a segment's TSval when the segment covers the last ACK
  sent (SEG.SEQ <= Last.ACK.sent) and the TSval is not older.
- Urgent data (RFC 9293 §3.8.5, MUST-30..33): RCV.UP (`up`, a stream offset) only moves
  forward; each advance queues UrgentData(end) before the bytes (MUST-32); the bytes stay
  inline. `urgent_remaining` counts those the application has not read (MUST-33).
- ECN receiver (RFC 3168 §6.1.3), when negotiated (the Sender's `ecn`): a CE-marked data segment
  (or window probe, §6.1.6) inside the window (§6.1.5: marks outside it are ignored) sets
  `ece`, and from then on every ACK we send carries ECE, until a segment with CWR
  arrives; CWR is taken before the same segment's CE mark, so a CE on the CWR segment
  starts a new echo (`ecn_input`). The first mark of an echo is ACKed at once, so the
  sender hears of it within an RTT (as Linux's quick ACK on CE). `ce_marks` counts marks.
- The application side: in-order bytes wait in `rx` until `read` or the DataReceived event
  takes them (joined: one copy); without `auto_consume`, bytes taken count as held until
  `consumed(n)` frees window. A chunk is copied on receipt so that the caller may reuse its
  buffer (`keep`), unless that buffer is immutable and mostly this payload: a memoryview
  into a `bytes` object of at most twice its length (a TSO/GRO frame from a TUN) is kept
  as it is. A copy there costs more than the bytes: each 64 KB copy alive when `take`
  joins them made that join's allocation page-fault (300 us against 20 us for four).

Theory of operation: a Receiver is owned by one TcpConnection (stack/connection.py), which
runs the RFC 9293 §3.10.7 steps in order and asks the Receiver for the receive-side ones
(`paws_rejects`, `acceptable`, `urg_text_fin`; header prediction works on the fields
inline). The event queue is shared with the connection: a DATA_MARK entry says where the
bytes in `rx` are delivered, so DataReceived keeps its place between Connected and
PeerFinished while read() can take the same bytes directly. The Receiver never changes
the connection's state: `urg_text_fin` returns whether the peer's FIN took effect, and
the connection makes the transition.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from stack.buffers import ReassemblyBuffer
from stack.events import LocalProtocolError, PeerFinished, UrgentData
from stack.loss import RtoEstimator
from stack.seq import HALF, MASK
from stack.tcp_config import TcpConfig

__all__ = ["Receiver", "DATA_MARK", "Acceptable", "keep"]


def keep(payload: bytes | memoryview) -> bytes | memoryview:
    """What `rx` holds of an in-order payload (module rules): the payload itself when no
    caller can change it and it pins no much larger buffer, else a copy."""
    if isinstance(payload, memoryview):
        obj = payload.obj
        if isinstance(obj, bytes) and 2 * payload.nbytes >= len(obj):
            return payload
        return bytes(payload)
    return payload if type(payload) is bytes else bytes(payload)  # a bytearray: copied

DATA_MARK = object()  # in the event queue: "deliver the receive queue here"


class Acceptable(Enum):
    """The first step's verdict on a segment (RFC 9293 §3.10.7.4)."""

    YES = "acceptable"
    ZERO_WINDOW_ACK = "not acceptable text, but its ACK, URG and RST count"
    NO = "unacceptable: drop, ACK"


class Receiver:
    """RCV.* variables, the receive queue, reassembly and the ACK owed to the peer."""

    __slots__ = (
        "irs", "nxt", "adv", "wscale", "cap", "sws_min", "wu_min", "mss", "rx", "rx_len",
        "rx_held", "auto_consume", "ooo", "ooo_fin", "gap", "up", "fin", "ack_now", "delack_at",
        "delay", "unacked", "big", "last_ack_sent", "dsack", "ts_on", "sack_on", "ws_on",
        "ts_recent", "ts_recent_at", "bytes_in", "last_rx", "chal_limit", "chal_start",
        "chal_count", "oow_gap", "oow_at", "events", "drops", "cap_max", "space_at",
        "space_mark", "ooo_auto", "rtt_est", "ece", "ce_marks",
    )

    def __init__(
        self, cfg: TcpConfig, my_mss: int, events: deque[object], drops: dict[str, int]
    ) -> None:
        self.irs = 0
        self.nxt = 0  # RCV.NXT
        self.adv = 0  # the right edge of the window last advertised (RCV.NXT + RCV.WND)
        self.wscale = 0  # Rcv.Wind.Shift (RFC 7323 §2.2)
        self.ws_on = False  # window scaling negotiated (both SYNs carried WSopt)
        self.cap = cfg.recv_buffer  # RCV.BUFF
        self.sws_min = min(cfg.recv_buffer // 2, my_mss)  # smallest opening (MUST-39)
        self.wu_min = min(cfg.recv_buffer // 2, 2 * my_mss)  # growth worth an update
        self.mss = my_mss  # our MSS option (MMS_R)
        self.rx: list[bytes | memoryview] = []
        self.rx_len = 0
        self.rx_held = 0
        self.auto_consume = cfg.auto_consume
        self.ooo = ReassemblyBuffer(cfg.reassembly_cap or cfg.recv_buffer, cfg.reassembly_ranges)
        self.ooo_fin: int | None = None  # a FIN seen beyond a gap
        self.gap = False  # bytes or a FIN held beyond RCV.NXT (header prediction is off)
        self.up = 0  # RCV.UP: stream offset where the peer's urgent data ends
        self.fin = False  # the peer's FIN was accepted
        self.ack_now = False
        self.delack_at: float | None = None
        self.delay = cfg.delayed_ack
        self.unacked = 0  # bytes received since the last ACK
        self.big = 536  # largest in-order segment seen, at most one MSS
        self.last_ack_sent = 0  # RFC 7323 Last.ACK.sent
        self.dsack: tuple[int, int] | None = None  # a duplicate to report (RFC 2883)
        self.ts_on = False
        self.sack_on = False
        self.ts_recent: int | None = None  # RFC 7323 TS.Recent
        self.ts_recent_at = 0.0
        self.bytes_in = 0
        self.last_rx = 0.0  # when the peer's last segment arrived (keep-alive idle time)
        self.chal_limit = cfg.challenge_ack_limit
        self.chal_start = 0.0
        self.chal_count = 0
        self.oow_gap = cfg.invalid_ack_interval  # RFC 5961 §7 / Linux tcp_invalid_ratelimit
        self.oow_at = -cfg.invalid_ack_interval  # when the last such ACK was allowed
        self.events = events
        self.drops = drops
        # Receive-buffer autotuning (Linux tcp_rcv_space_adjust, "DRS"): RCV.BUFF grows
        # toward cap_max with what arrives per RTT (the Sender's estimator, `rtt_est`).
        self.cap_max = max(cfg.recv_buffer_max, cfg.recv_buffer)
        self.space_at = 0.0  # start of the current measurement period
        self.space_mark = 0  # bytes_in at its start
        self.ooo_auto = not cfg.reassembly_cap  # the reassembly cap follows RCV.BUFF
        self.rtt_est: RtoEstimator | None = None
        self.ece = False  # an ECN-Echo is owed: ECE on every ACK until CWR (§6.1.3)
        self.ce_marks = 0  # CE-marked segments received on an ECN connection

    # ------------------------------------------------------------------ input

    def _drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def ecn_input(self, flags: int, ecn: int, text: bool) -> None:
        """An acceptable segment of an ECN connection (RFC 3168 §6.1.3): its CWR ends the
        echo, then a CE mark on its data (`text`: inside the window, §6.1.5) starts one."""
        if flags & 0x80:  # CWR
            self.ece = False
        if ecn == 3 and text:  # CE
            self.ce_marks += 1
            if not self.ece:
                self.ece = True
                self.ack_now = True  # the sender hears of it within an RTT

    def paws_rejects(self, ts: tuple[int, int] | None, now: float, seg_len: int = 0) -> bool:
        """RFC 7323 §3.2 / §5.3 for a non-RST segment of `seg_len`: True when it must be
        dropped."""
        if ts is None:
            self._drop("missing_timestamp")  # SHOULD silently drop
            return True
        recent = self.ts_recent
        if recent is not None and (ts[0] - recent) & MASK >= HALF:
            if now - self.ts_recent_at <= 24 * 86400:
                self._drop("paws")
                self.invalid_ack(seg_len, now)  # R1: send an ACK (rate limited), drop it
                return True
        return False

    def acceptable(self, seg_abs: int, seg_len: int, ack: bool) -> Acceptable:
        """The acceptability test, four cases (RFC 9293 §3.10.7.4 table)."""
        nxt = self.nxt
        wnd = max(self.adv - nxt, 0)
        if seg_len == 0:
            ok = seg_abs == nxt if wnd == 0 else nxt <= seg_abs < nxt + wnd
        elif wnd == 0:
            ok = False
        else:
            end = seg_abs + seg_len - 1
            ok = nxt <= seg_abs < nxt + wnd or nxt <= end < nxt + wnd
        if ok:
            return Acceptable.YES
        if wnd == 0 and seg_abs == nxt and ack:
            return Acceptable.ZERO_WINDOW_ACK
        return Acceptable.NO

    def unacceptable(self, seg_abs: int, n: int, seg_len: int, now: float) -> None:
        """An unacceptable segment with `n` bytes of text (`seg_len` with SYN and FIN):
        drop it, send <SEQ=SND.NXT><ACK=RCV.NXT><CTL=ACK> (rate limited when it carried
        nothing: `invalid_ack`), report a duplicate (RFC 2883 §4)."""
        self._drop("unacceptable")
        self.invalid_ack(seg_len, now)
        if n and seg_abs + n <= self.nxt and self.sack_on:
            self.dsack = (seg_abs, seg_abs + n)

    def invalid_ack(self, seg_len: int, now: float) -> None:
        """The ACK owed for an invalid segment (unacceptable, PAWS, an ACK of unsent data).
        A segment that occupies sequence space (data, SYN, FIN: a retransmission wants its
        ACK, or D-SACK) always gets it; an empty one at most once per `invalid_ack_interval`
        (RFC 5961 §7 rate limiting; Linux tcp_invalid_ratelimit and its exemption of data
        and SYNs), so two stacks cannot answer each other's answers forever."""
        if seg_len:
            self.ack_now = True
        elif now - self.oow_at >= self.oow_gap:
            self.oow_at = now
            self.ack_now = True
        else:
            self._drop("invalid_ack_limited")

    def challenge(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2/§5.2 challenge ACK, rate limited (§7)."""
        if now - self.chal_start >= 1.0:
            self.chal_start = now
            self.chal_count = 0
        if self.chal_count < self.chal_limit:
            self.chal_count += 1
            self.ack_now = True
        else:
            self._drop("challenge_ack_limited")

    def unwrap(self, seq: int) -> int:
        """The absolute position of the 32-bit `seq`, the nearest one to RCV.NXT."""
        d = (seq - self.irs - self.nxt) & MASK
        return self.nxt + (d - 0x100000000 if d >= HALF else d)

    def full_mss(self) -> int:
        """Full-sized segment from the peer: our MSS less the options it sends."""
        return self.mss - (12 if self.ts_on else 0)

    def take_ts(self, tsval: int, seg_abs: int, now: float) -> None:
        """RFC 7323 §4.3 TS.Recent update for an acceptable segment."""
        recent = self.ts_recent
        if tsval != recent and seg_abs <= self.last_ack_sent:
            if recent is None or (tsval - recent) & MASK < HALF:
                self.ts_recent = tsval
                self.ts_recent_at = now

    def urgent(self, seg_abs: int, urg: int) -> None:
        """The sixth step: SEG.UP names the first non-urgent octet (MUST-32: report advances)."""
        end = seg_abs + urg - 1  # as a stream offset
        if end > self.up:
            self.up = end
            self.events.append(UrgentData(end))

    def accept(self, payload: bytes | memoryview, n: int, now: float) -> None:
        """In-order text (RFC 9293 §3.10.7.4 seventh step) and the ACK policy (§3.8.6.3)."""
        self.nxt += n
        self.bytes_in += n
        self.rx.append(keep(payload))  # a copy unless nobody can change it (module rules)
        self.rx_len += n
        events = self.events
        if not events or events[-1] is not DATA_MARK:
            events.append(DATA_MARK)
        self.unacked += n
        if n > self.big:  # estimate the peer's full segment size (Linux rcv_mss)
            self.big = min(n, self.full_mss())
        if self.unacked >= 2 * self.big:  # SHLD-19: every second full segment
            self.ack_now = True
        elif self.delack_at is None:
            self.delack_at = now + self.delay  # MUST-40: < 0.5 s

    def text(self, seg_abs: int, payload: bytes | memoryview, now: float) -> bool:
        """Acceptable text at `seg_abs`. Returns True when a FIN held beyond a gap is now
        at RCV.NXT (the caller then processes it as the eighth step does)."""
        nxt = self.nxt
        if seg_abs < nxt:  # trim what we already have
            if self.sack_on:
                self.dsack = (seg_abs, nxt)  # RFC 2883 §4: report the duplicate part
            payload = memoryview(payload)[nxt - seg_abs :]
            seg_abs = nxt
        room = self.adv - seg_abs
        if len(payload) > room:  # trim to the window
            payload = memoryview(payload)[: max(room, 0)]
        if not payload:
            self.ack_now = True
            return False
        if seg_abs == nxt:
            self.accept(payload, len(payload), now)
            if self.gap:  # bytes or a FIN wait beyond this segment
                nxt, pieces = self.ooo.pop_ready(self.nxt)
                for piece in pieces:
                    self.accept(piece, len(piece), now)
                self.nxt = nxt
                self.ack_now = True  # RFC 5681 §4.2: ACK at once when a gap fills
                fin = self.ooo_fin
                if fin is not None and fin <= nxt:
                    self.ooo_fin = None  # due now (or overtaken by text: not a FIN)
                self.gap = bool(self.ooo.nbytes) or self.ooo_fin is not None
                return fin == nxt
            return False
        # Out of order: queue it (SHLD-31) and send a duplicate ACK at once (RFC 5681 §4.2).
        kept = self.ooo.insert(seg_abs, payload)
        if kept < 0:
            self._drop("reassembly_full")
        elif kept == 0 and self.sack_on:
            # All of it is held already, above a hole: a D-SACK names it (RFC 2883 §4 Example 3,
            # as Linux does), so a sender that retransmitted too early learns of it.
            self.dsack = (seg_abs, seg_abs + len(payload))
        self.gap = bool(self.ooo.nbytes) or self.ooo_fin is not None
        self.ack_now = True
        return False

    def ooo_tail(self, seq: int, payload: bytes | memoryview,
                 ts: tuple[int, int] | None) -> bool:
        """Header prediction for the common segment while a hole is open: the next one of
        the run above it (SEG.SEQ = the end of the highest range held, inside the window,
        TSval not older than TS.Recent). Queued as the slow path would (SHLD-31) with an
        immediate ACK (RFC 5681 §4.2); False: let the slow path decide."""
        tail = self.ooo.tail
        if tail is None or seq != (self.irs + tail) & MASK or tail + len(payload) > self.adv:
            return False
        if self.ts_on:
            recent = self.ts_recent
            if ts is None or (recent is not None and (ts[0] - recent) & MASK >= HALF):
                return False
        if self.ooo.insert(tail, payload) < 0:
            return False
        self.ack_now = True
        return True

    def urg_text_fin(self, seg_abs: int, urg: int, payload: bytes | memoryview, fin: bool,
                     text: bool, open_: bool, now: float) -> bool:
        """RFC 9293 §3.10.7.4 sixth to eighth steps for a segment that passed the ACK step:
        SEG.UP `urg` (0: none), the text, the FIN. `text` is False for an ACK in a zero
        window (only its ACK counted); `open_` says the state still takes text. Returns
        True when the peer's FIN took effect now (the caller changes the state)."""
        if urg and open_ and text:
            self.urgent(seg_abs, urg)
        fin_now = False
        if payload and text:
            if open_:
                if self.text(seg_abs, payload, now):  # a FIN held beyond a gap is due
                    fin_now = self.take_fin()
            else:
                self._drop("data_after_fin")
        elif payload:
            self._drop("zero_window")
            self.ack_now = True
        if fin and text:
            fin_pos = seg_abs + len(payload)
            if fin_pos < self.adv or fin_pos == self.nxt:
                if fin_pos == self.nxt:
                    fin_now = self.take_fin() or fin_now
                elif open_:
                    self.ooo_fin = fin_pos  # FIN after a gap: take it when the gap fills
                    self.gap = True  # (the in-order segment that fills it takes the slow path)
                    self.ack_now = True
        return fin_now

    def take_fin(self) -> bool:
        """The peer's FIN at RCV.NXT (eighth step): ACK it; True the first time only
        (PeerFinished is queued after all preceding text)."""
        self.nxt += 1
        self.ack_now = True
        if self.fin:
            return False
        self.fin = True
        self.events.append(PeerFinished())
        return True

    # ------------------------------------------------------------------ output fields

    def window_field(self) -> int:
        """The 16-bit window to advertise; moves RCV.ADV (RFC 9293 §3.8.6.2.2, RFC 7323 §2.3)."""
        nxt = self.nxt
        if self.cap < self.cap_max:
            self.autotune()
        space = self.cap - self.rx_len - self.rx_held
        if space < self.sws_min:
            space = 0  # MUST-39: no small window increments
        edge = nxt + space
        if edge < self.adv:
            edge = self.adv  # never shrink the window
        s = self.wscale
        field = (edge - nxt + (1 << s) - 1) >> s
        if field > 0xFFFF:
            field = 0xFFFF
        self.adv = nxt + (field << s)
        return field

    def autotune(self) -> None:
        """Once per smoothed RTT: RCV.BUFF grows to 4 * what arrived in the last one + 16
        MSS, up to `cap_max` (Linux's tcp_rcv_space_adjust: twice the data per RTT, and
        twice again for what a loss holds out of order for the RTT recovery takes), so the
        advertised window keeps ahead of the sender's bandwidth-delay product. It never
        shrinks."""
        est = self.rtt_est
        srtt = est.srtt if est is not None else None
        now = self.last_rx
        if srtt is None or now - self.space_at < srtt:
            return
        got = self.bytes_in - self.space_mark
        self.space_at = now
        self.space_mark = self.bytes_in
        cap = 4 * got + 16 * self.mss
        if cap > self.cap:
            self.cap = cap if cap < self.cap_max else self.cap_max
            if self.ooo_auto and self.ooo.cap_bytes < self.cap:
                self.ooo.cap_bytes = self.cap

    def sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """SACK blocks, most recent first (RFC 2018 §4), behind a D-SACK block naming a
        duplicate just received (RFC 2883 §4: first, reported once)."""
        irs = self.irs
        limit = 3 if self.ts_on else 4
        blocks = []
        if self.dsack is not None:
            blocks.append(self.dsack)
            self.dsack = None
            limit -= 1
        blocks.extend(self.ooo.blocks(limit))
        return tuple(((irs + s) & MASK, (irs + e) & MASK) for s, e in blocks)

    def ack_sent(self) -> None:
        """A segment carrying our ACK went out: nothing is owed any more."""
        self.ack_now = False
        self.delack_at = None
        self.unacked = 0
        self.last_ack_sent = self.nxt

    # ------------------------------------------------------------------ application side

    def window_grew(self) -> bool:
        """True when freed space makes a window update worth sending (§3.8.6.2.2)."""
        return self.nxt + self.cap - self.rx_len - self.rx_held - self.adv >= self.wu_min

    def take(self) -> bytes:
        """All queued in-order bytes (for a DataReceived event); b"" when none."""
        rx = self.rx
        if not rx:
            return b""
        data = rx[0] if len(rx) == 1 and type(rx[0]) is bytes else b"".join(rx)
        self.rx = []
        self.rx_len = 0
        if not self.auto_consume:
            self.rx_held += len(data)
        return data

    def read(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` (all if negative) of the queued in-order bytes."""
        if not self.rx:
            return b""
        data = b"".join(self.rx)
        if 0 <= max_bytes < len(data):
            rest = data[max_bytes:]
            data = data[:max_bytes]
            self.rx = [rest]
        else:
            self.rx = []
        self.rx_len -= len(data)
        if not self.auto_consume:
            self.rx_held += len(data)
        return data

    def consumed(self, n: int) -> None:
        """The application processed `n` delivered bytes. Raises LocalProtocolError for
        more than it holds."""
        if n < 0 or n > self.rx_held:
            raise LocalProtocolError(f"consumed({n}) but {self.rx_held} bytes are held")
        self.rx_held -= n

    @property
    def urgent_remaining(self) -> int:
        """Bytes of the peer's urgent data not yet read by the application (MUST-33)."""
        return max(self.up - (self.bytes_in - self.rx_len), 0)
