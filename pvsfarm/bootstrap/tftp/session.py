"""The pure state machine of one TFTP read transfer (server side).

Time is passed in (`now`, seconds on any monotonic scale), the file is read
through an injected ``read_at(offset, length) -> bytes`` callable (in
`READ_AHEAD_BYTES` chunks, laid out at once as ready DATA datagrams), and the
caller moves datagrams: `receive` → `datagrams_to_send` → re-arm a timer at
`next_deadline` → `handle_timer` when it fires.  No sockets, no clock.  The
in-order ACK has a fast path: `next_run`, or `plan` then `commit` to send
several windows while their ACKs come back (the per-block cost in Python
is most of lock-step TFTP's).

Rules, in RFC order:

* RFC 2347: options the server does not know or accept are left out of the
  OACK; if none is accepted the transfer starts with DATA 1 as in RFC 1350.
  A value that is not a decimal number is refused with ERROR 8.
* RFC 2348 blksize 8..65464: below 8 → option declined; above our
  ``max_blksize`` → the OACK carries ``max_blksize`` (the server may answer a
  smaller value; tftpd-hpa clamps the same way).
* RFC 2349 timeout 1..255 s (else declined) and tsize (answered with the real
  size on a read request).
* RFC 7440 windowsize 1..65535 (else declined), clamped to ``max_windowsize``
  and to ``max_window_bytes`` of blocks.
  The sender keeps a window of unacknowledged blocks; an ACK inside it slides
  the window to just after the acknowledged block and sends what is new.
* RFC 1350 sorcerer's apprentice: a duplicate ACK (the block already
  acknowledged) sends nothing; only the timer retransmits.  An ACK outside
  [last acknowledged, last sent] is ignored (never sent → never advance).
* Retransmission: the whole outstanding window (or the OACK) is resent each
  ``timeout_s`` after the last send; after ``max_retries`` unanswered tries
  the transfer ends with `TransferTimedOut`.
* Block numbers are 16 bits and roll over to 0 after 65535, as tftpd-hpa
  (default), atftpd, curl and iPXE expect.
* netascii requests are served byte for byte (no CR/LF translation), like
  octet: boot files are binary and translation would change ``tsize``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pvsfarm.bootstrap.tftp.wire import (
    MAX_BLOCK,
    Ack,
    Error,
    ErrorCode,
    MalformedMessage,
    Opcode,
    OptionAck,
    Options,
    ReadRequest,
    ack_block,
    parse,
    serialize,
)
from pvsfarm.bootstrap.tftp.run_cache import RunCache
from pvsfarm.errors import StoreError

__all__ = [
    "DEFAULT_BLKSIZE",
    "MAX_BLKSIZE",
    "MessageIgnored",
    "Plan",
    "ReadSession",
    "SessionLimits",
    "TransferAborted",
    "TransferComplete",
    "TransferEvent",
    "TransferTimedOut",
    "negotiate",
    "split_run",
]

DEFAULT_BLKSIZE = 512
"""RFC 1350 block size when no blksize option is negotiated."""
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
"""RFC 2348 §"Blocksize Option Specification": 8..65464 octets."""

ReadAt = Callable[[int, int], bytes]

READ_AHEAD_BYTES = 64 * 1024
"""File bytes read at once (or one window, if larger): one ``os.pread`` per
~44 blocks of 1468 instead of one per block."""


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """What the server allows a client to negotiate."""

    timeout_s: float = 1.0
    """Retransmission timeout when the client sends no timeout option
    (tftpd-hpa's default is 1 s; PXE ROMs retry within 1-4 s)."""
    max_retries: int = 5
    """Retransmissions of one window before giving up (tftpd-hpa: ~6 tries)."""
    max_blksize: int = MAX_BLKSIZE
    """Ceiling of the blksize option, in octets (RFC 2348 maximum)."""
    max_windowsize: int = 64
    """Ceiling of the windowsize option, in blocks (RFC 7440 allows 65535; a
    cap bounds one burst to 64 x blksize, ~94 KiB at 1468)."""
    max_window_bytes: int = 256 * 1024
    """Ceiling of windowsize x blksize: a transfer holds its read-ahead of at
    least one window, so 64 blocks of 65464 would be 4 MiB per transfer (2 GiB
    at 500 transfers).  A smaller window is answered in the OACK (RFC 7440
    lets the server lower it); 1468-octet blocks keep the full 64."""


@dataclass(frozen=True, slots=True)
class TransferComplete:
    """The last block was acknowledged."""

    blocks: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class TransferTimedOut:
    """No acknowledgement after ``retries`` retransmissions; given up."""

    retries: int
    acked_blocks: int


@dataclass(frozen=True, slots=True)
class TransferAborted:
    """The transfer ended on an ERROR (``sent`` True: ours, else the peer's)."""

    code: int
    message: str
    sent: bool


@dataclass(frozen=True, slots=True)
class MessageIgnored:
    """A datagram that changed nothing (malformed, stale or unexpected)."""

    reason: str


TransferEvent = TransferComplete | TransferTimedOut | TransferAborted | MessageIgnored


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The parameters in force and the OACK to send (None: start with DATA)."""

    blksize: int
    windowsize: int
    timeout_s: float
    oack: OptionAck | None


def negotiate(options: Options, size_bytes: int, limits: SessionLimits) -> Negotiated:
    """Apply RFC 2347/2348/2349/7440; raise `MalformedMessage` (code 8) on a
    value that is not a decimal number."""
    blksize, windowsize, timeout_s = DEFAULT_BLKSIZE, 1, limits.timeout_s
    accepted: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, raw in options:
        if name in seen or name not in _KNOWN:
            continue
        seen.add(name)
        if not raw.isascii() or not raw.isdigit():
            raise MalformedMessage(f"option {name}={raw!r} is not a number", code=8)
        value = int(raw)
        if name == "blksize" and value >= MIN_BLKSIZE:
            blksize = min(value, limits.max_blksize, MAX_BLKSIZE)
            accepted.append((name, str(blksize)))
        elif name == "windowsize" and 1 <= value <= MAX_BLOCK:
            windowsize = min(value, limits.max_windowsize)
            accepted.append((name, str(windowsize)))
        elif name == "timeout" and 1 <= value <= 255:
            timeout_s = float(value)
            accepted.append((name, raw))
        elif name == "tsize":
            accepted.append((name, str(size_bytes)))
    if windowsize * blksize > limits.max_window_bytes:
        windowsize = max(1, limits.max_window_bytes // blksize)
        accepted = [(n, str(windowsize) if n == "windowsize" else v) for n, v in accepted]
    return Negotiated(blksize, windowsize, timeout_s, OptionAck(tuple(accepted)) if accepted else None)


_KNOWN = frozenset({"blksize", "windowsize", "timeout", "tsize"})
_DATA, _ACK = int(Opcode.DATA), int(Opcode.ACK)
_DATA_HEADER = _ACK_OF = struct.Struct(">HH").pack
"""`wire.data_header` in one C call, ``(_DATA, block)``: the per-block hot path."""


Plan = tuple[list[bytes], list[bytes | None], int]
"""What `ReadSession.plan` answers, ``(runs, acks, start)``: send
``runs[start]``, then each next run once the ACK in ``acks`` at the previous
one's index arrives (None: the file's last run, whose ACK `receive` takes).
A plain tuple: a NamedTuple's construction cost more than a lock-step block."""


def split_run(run: bytes, blksize: int) -> list[bytes]:
    """A run's DATA datagrams (every one ``blksize + 4`` octets but the file's last)."""
    size = blksize + 4
    return [run[i : i + size] for i in range(0, len(run), size)]


class ReadSession:
    """One RRQ being served.  Create with `ReadSession.start`."""

    def __init__(self, size_bytes: int, read_at: ReadAt, params: Negotiated, limits: SessionLimits,
                 cache: RunCache | None = None, file_key: Hashable | None = None) -> None:
        self.size_bytes = size_bytes
        self.blksize = params.blksize
        self.windowsize = params.windowsize
        self.timeout_s = params.timeout_s
        self.max_retries = limits.max_retries
        self.total_blocks = size_bytes // params.blksize + 1  # last block is short (maybe empty)
        self.finished = False
        self._read_at = read_at
        self._cache, self._file_key = cache, file_key  # runs shared with other transfers of this file
        # The read-ahead, laid out as runs (see `plan`): windows from block _plan_first.
        self._runs: list[bytes] = []
        self._acks: list[bytes | None] = []  # the ACK of each run's last block (None: the file's last)
        self._ends: list[int] = []  # each run's last block
        self._plan_first = 1
        self._plan_at = 0  # the run the last `plan` started at
        self._next_run = -1  # the run starting at block _sent + 1, if known (-1: look it up)
        self._oack = serialize(params.oack) if params.oack else None
        self._acked = 0  # absolute number of the last acknowledged block
        self._sent = 0  # absolute number of the last block sent
        self._fast_ack: bytes | None = None  # the ACK `plan` takes: of _sent, if not the last
        self._queue: list[bytes | int] = []  # datagrams, or block numbers read when sent
        self._deadline: float | None = None
        self._retries = 0
        self.retransmissions = 0
        """Timer-driven resends so far (a health signal: loss or a slow client)."""
        if self._oack is not None:
            self._queue.append(self._oack)
        else:
            self._queue_window(1)

    @classmethod
    def start(cls, request: ReadRequest, size_bytes: int, read_at: ReadAt, limits: SessionLimits,
              cache: RunCache | None = None, file_key: Hashable | None = None) -> ReadSession:
        """Negotiate ``request``'s options.  A refused negotiation gives a
        finished session whose only datagram is ERROR 8.  ``file_key``
        names this version of the file (it must change whenever its content
        can have: device, inode, size and mtime); with a ``cache``, the DATA
        laid out for it is shared with every transfer of the same key."""
        try:
            params = negotiate(request.options, size_bytes, limits)
        except MalformedMessage as exc:
            session = cls(size_bytes, read_at, Negotiated(DEFAULT_BLKSIZE, 1, limits.timeout_s, None), limits)
            session._fail(ErrorCode.OPTION_NEGOTIATION, str(exc))
            return session
        return cls(size_bytes, read_at, params, limits, cache, file_key)

    # -- input -------------------------------------------------------------

    def plan(self, datagram: bytes) -> Plan | None:
        """The fast path: if ``datagram`` is exactly the ACK of the last block
        sent (the whole window acknowledged) and blocks remain, the windows
        that follow, ready to send, with the ACK that acknowledges each whole
        window.  Nothing changes until `commit`.  None, with nothing changed,
        for anything else (the ACK of an OACK, a partial or duplicate ACK, the
        last ACK, an ACK before the previous datagrams were taken, any other
        datagram): then call `receive` and `datagrams_to_send`.

        The caller sends ``runs[start]``, and while the reply is
        ``acks[start]`` the next run, and so on; then `commit` with how many
        it sent.  A run is its window's DATA datagrams back to back, each
        ``blksize + 4`` octets but the file's last (one datagram in
        lock-step; a UDP GSO send, or `split_run`).  The runs are built once
        per read-ahead (`READ_AHEAD_BYTES`), so a lock-step block costs the
        caller a send, a recv and a comparison."""
        if datagram != self._fast_ack or self._queue or self.finished:
            return None
        start = self._next_run
        if start < 0:
            start = self._locate()
        self._plan_at = start
        return self._runs, self._acks, start

    def next_run(self, datagram: bytes, now: float) -> bytes | None:
        """`plan` and ``commit(1, now)`` in one call (the path of a transfer
        woken once per ACK, as in a boot storm): the next window's run, or
        None as `plan`."""
        if datagram != self._fast_ack or self._queue or self.finished:
            return None
        start = self._next_run
        if start < 0:
            start = self._locate()
        self._acked = self._sent
        self._sent = self._ends[start]
        self._fast_ack = self._acks[start]
        self._retries = 0
        self._deadline = now + self.timeout_s
        self._next_run = start + 1 if start + 1 < len(self._runs) else -1
        return self._runs[start]

    def commit(self, count: int, now: float) -> None:
        """Record that the first ``count`` (>= 1) runs of the last `plan` were
        sent and the ACK of each but the last arrived: the same state as
        ``count`` rounds of `receive` and `datagrams_to_send`."""
        last = self._plan_at + count - 1
        self._acked = self._ends[last - 1] if count > 1 else self._sent
        self._sent = self._ends[last]
        self._fast_ack = self._acks[last]
        self._retries = 0
        self._deadline = now + self.timeout_s
        self._next_run = last + 1 if last + 1 < len(self._runs) else -1

    def receive(self, datagram: bytes, now: float) -> list[TransferEvent]:
        """Feed one datagram from the client's TID."""
        if self.finished:
            return [MessageIgnored("transfer already finished")]
        block = ack_block(datagram)
        if block is not None:
            return self._on_ack(block)
        try:
            msg = parse(datagram)
        except MalformedMessage as exc:
            return [MessageIgnored(f"malformed: {exc}")]
        if isinstance(msg, Ack):
            return self._on_ack(msg.block)
        if isinstance(msg, Error):
            self.finished = True
            return [TransferAborted(int(msg.code), msg.message, sent=False)]
        return [self._fail(ErrorCode.ILLEGAL_OPERATION, f"unexpected {type(msg).__name__}")]

    def _on_ack(self, wire_block: int) -> list[TransferEvent]:
        if self._oack is not None and self._sent == 0:
            if wire_block != 0:
                return [MessageIgnored(f"ACK {wire_block} while waiting for ACK 0 of the OACK")]
            self._queue_window(1)
            return []
        # Map the 16-bit number into [acked, sent]: a window never spans 65536 blocks.
        block = self._acked + ((wire_block - self._acked) & MAX_BLOCK)
        if block > self._sent:
            return [MessageIgnored(f"ACK {wire_block} for a block never sent")]
        if block == self._acked:
            return [MessageIgnored(f"duplicate ACK {wire_block}")]
        self._acked = block
        self._retries = 0
        if block == self.total_blocks:
            self.finished = True
            self._deadline = None
            return [TransferComplete(self.total_blocks, self.size_bytes)]
        # RFC 7440 §4: an ACK before the window's end means the receiver lost
        # what followed; the next window starts right after the ACKed block.
        self._queue_window(block + 1)
        return []

    def handle_timer(self, now: float) -> list[TransferEvent]:
        """Call when `next_deadline` has passed: retransmit or give up."""
        if self.finished or self._deadline is None or now < self._deadline:
            return []
        if self._retries >= self.max_retries:
            self.finished = True
            self._deadline = None
            return [TransferTimedOut(self._retries, self._acked)]
        self._retries += 1
        self.retransmissions += 1
        if self._oack is not None and self._sent == 0:
            self._queue.append(self._oack)
        else:
            self._queue.extend(range(self._acked + 1, self._sent + 1))
        self._deadline = None
        return []

    # -- output ------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Datagrams to send now, in order; arms the retransmission timer.
        DATA payloads are read here (``read_at`` errors surface here)."""
        queue, self._queue = self._queue, []
        if queue and not self.finished:
            self._deadline = now + self.timeout_s
        out = []
        for item in queue:
            out.append(self._block(item) if item.__class__ is int else item)
        return out

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next be called (None: nothing pending)."""
        return None if self.finished else self._deadline

    # -- internals ---------------------------------------------------------

    def _queue_window(self, first: int) -> None:
        last = self._acked + self.windowsize
        if last > self.total_blocks:
            last = self.total_blocks
        self._queue.extend(range(first, last + 1))
        self._next_run = -1
        if last > self._sent:
            self._sent = last
            self._fast_ack = _ACK_OF(_ACK, last & MAX_BLOCK) if last < self.total_blocks else None

    def _locate(self) -> int:
        """The run that starts at block ``_sent + 1`` (read ahead from there if none does)."""
        first = self._sent + 1
        step = first - self._plan_first
        if step < 0 or step % self.windowsize or step // self.windowsize >= len(self._runs):
            self._build(first)
            return 0
        return step // self.windowsize

    def _block(self, n: int) -> bytes:
        """DATA ``n``, from the runs of the read-ahead (read anew from ``n``
        when it is not there: a new window, or one resent after long)."""
        step = n - self._plan_first
        if step < 0 or step // self.windowsize >= len(self._runs):
            self._build(n)
            step = 0
        run, k = divmod(step, self.windowsize)
        size = self.blksize + 4
        return self._runs[run][k * size : (k + 1) * size]

    def _build(self, first: int) -> None:
        """Lay the windows that start at block ``first`` out as runs: from
        the shared `RunCache` when another transfer of this file version
        already did, else read ahead (one ``read_at`` per ~44 blocks of 1468,
        or per window if a window is larger than `READ_AHEAD_BYTES`)."""
        w, blksize, total = self.windowsize, self.blksize, self.total_blocks
        key = None
        if self._cache is not None and self._file_key is not None:
            key = (self._file_key, blksize, w, first)
            cached = self._cache.get(key)
            if cached is not None:
                self._runs, self._acks, self._ends = cached
                self._plan_first, self._next_run = first, -1
                return
        offset = (first - 1) * blksize
        windows = max(1, READ_AHEAD_BYTES // (w * blksize))
        length = min(windows * w * blksize, self.size_bytes - offset)
        data = self._read_at(offset, length) if length > 0 else b""
        if len(data) != length:
            raise StoreError(f"short read at offset {offset}: file changed while served")
        last = min(first + windows * w - 1, total)
        pack = _DATA_HEADER
        if w == 1:  # lock-step: a run per block, built in one comprehension (3x the loop's speed)
            ends = list(range(first, last + 1))
            runs = [
                pack(_DATA, n & MAX_BLOCK) + data[rel : rel + blksize]
                for n, rel in zip(ends, range(0, (last - first + 1) * blksize, blksize))
            ]
        else:  # headers and payloads interleaved by slice assignment, then one join per window
            view, count = memoryview(data), last - first + 1
            pieces: list[bytes | memoryview] = [b""] * (2 * count)
            pieces[0::2] = [pack(_DATA, n & MAX_BLOCK) for n in range(first, last + 1)]
            pieces[1::2] = [view[rel : rel + blksize] for rel in range(0, count * blksize, blksize)]
            runs = [b"".join(pieces[2 * k : 2 * (k + w)]) for k in range(0, count, w)]
            ends = [min(start + w - 1, last) for start in range(first, last + 1, w)]
        acks = [_ACK_OF(_ACK, end & MAX_BLOCK) if end < total else None for end in ends]
        self._runs, self._acks, self._ends = runs, acks, ends
        self._plan_first, self._next_run = first, -1
        if key is not None and self._cache is not None:
            self._cache.put(key, (runs, acks, ends), length + 4 * len(ends))

    def _fail(self, code: ErrorCode, message: str) -> TransferAborted:
        self.finished = True
        self._deadline = None
        self._queue = [serialize(Error(code, message))]
        return TransferAborted(int(code), message, sent=True)
