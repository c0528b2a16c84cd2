"""The standard-image write cache: a read-only base + a sparse overlay file.

Modelled on nbdkit's ``filters/cow``: the vDisk is cut into blocks, a map
says where each block's current content lives, and writes that do not cover a
whole block are read-modify-write. The base file is only ever opened O_RDONLY.

Overlay file layout (one file, no sidecar, so it moves as one with the target
on a shared store)::

    0            header (4 KiB): magic, version, block size, base size, base id, CRC
    4096         block map, one state byte per block
    data_a       slot A: nblocks * block_size bytes (sparse)
    data_b       slot B: nblocks * block_size bytes (sparse)

Block states: BASE (read the base), ZERO (reads as zeros, no data), SLOT_A,
SLOT_B. Crash safety (kill -9 of the node, failover to another node on a
shared store) comes from never overwriting the live copy of a block: a write
puts the block's whole new content in the slot the block is *not* using, then
persists the map bytes. A crash before the map write leaves the old content
visible, after it the new; a map byte is never torn, so each block is old or
new, never a mix, even if the data write itself was cut short. Writes reach
the page cache before they are acknowledged, so they survive process death;
power loss is covered only after FUA or flush (fdatasync, data before map).

A superseded slot is not punched out on overwrite: a concurrent read of
*other* bytes of the block may still be streaming from it (read_extents hands
out file ranges, not bytes), and rewriting a slot with read-modify-write only
ever rewrites those bytes with equal values. The cost is up to twice the
written size on disk for blocks written more than once; whole-block
TRIM/WRITE_ZEROES (which overlap any such reader, so NBD leaves the result
undefined) do punch both slots.

Locking and processes: the overlay is flock'ed exclusively by the instance
that owns the session (`create`/`open_existing`); a second such open, here or
in another process or node, is a `Conflict`, and that flock is what fences a
dead node off (exports.py). The node's NBD worker processes open the same
inode with `attach` (no flock: the owner holds it, and a worker dies with its
node). Every instance reads the block map through a shared read-only mapping
of the file's map bytes (MAP_SHARED), so a map byte written by one process is
seen by all at once; map bytes are only ever written with ``pwrite``. A
write's read-state, write-data, write-map sequence holds an OFD byte-range
lock (``F_OFD_SETLKW``) on the map bytes of the blocks it touches, so writes
to one block from two processes are serialized (no lost read-modify-write,
and no writer can fill the slot another just made live), while writes to
other blocks and all reads proceed in parallel. The crash-safety argument
above is unchanged: data still lands before the map byte that points at it,
and readers in other processes see a map byte only after its data.
Connections may sit in different processes and still flush each other's
writes (``fdatasync`` on any fd of the inode covers all its dirty pages), so
``can_multi_conn`` holds. On NFS, Linux emulates flock with a whole-file
byte-range lock, which would block attached writers: run such stores with
``nbd.workers: 0``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from threading import Lock

from pvsfarm.errors import NotFound, StoreError
from pvsfarm.store.device import (
    ZERO_FD,
    Extent,
    check_range,
    file_ident,
    lock_or_conflict,
    open_verified,
    pread_exact,
    punch_hole,
    pwrite_all,
)
from pvsfarm.store.digest import base_fingerprint
from pvsfarm.store.images import BaseImage

# 64 KiB, as nbdkit cow (BLKSIZE) and the qcow2 default cluster. Smaller blocks
# mean less read-modify-write for the 4 KiB writes guests mostly do, but a
# bigger map (1 byte per block held in RAM: 16 KiB per GiB at 64 KiB, 256 KiB
# at 4 KiB) and more Python work per read: read_extents walks the map, and a
# 32 MiB NBD read (the usual client maximum) spans 512 blocks at 64 KiB but
# 8192 at 4 KiB. Reads are the hot path of a boot storm, so bigger blocks win.
DEFAULT_BLOCK_BYTES = 64 * 1024

BASE, ZERO, SLOT_A, SLOT_B = 0, 1, 2, 3
_VALID_STATES = bytes((BASE, ZERO, SLOT_A, SLOT_B))

MAGIC = b"PVSFWC\r\n"
VERSION = 1
HEADER_BYTES = 4096
MAP_OFFSET = HEADER_BYTES
MAX_BASE_ID_BYTES = 128
_HEADER = struct.Struct("<8sIIQQH128s")
_CRC = struct.Struct("<I")
_FLOCK = struct.Struct("hhqqixxxx")  # struct flock (x86-64/aarch64 Linux layout)


def _align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclass(frozen=True, slots=True)
class CacheHeader:
    block_size: int
    base_size: int
    base_id: str

    @property
    def nblocks(self) -> int:
        return -(-self.base_size // self.block_size)

    @property
    def data_a(self) -> int:
        return _align_up(MAP_OFFSET + self.nblocks, max(self.block_size, 4096))

    @property
    def data_b(self) -> int:
        return self.data_a + self.nblocks * self.block_size

    @property
    def file_bytes(self) -> int:
        return self.data_b + self.nblocks * self.block_size

    def pack(self) -> bytes:
        base_id = self.base_id.encode()
        body = _HEADER.pack(
            MAGIC, VERSION, self.block_size, self.base_size, self.nblocks,
            len(base_id), base_id,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, raw: bytes, where: str) -> CacheHeader:
        end = _HEADER.size + _CRC.size
        if len(raw) < end:
            raise StoreError(f"write cache {where}: truncated header")
        fields = _HEADER.unpack_from(raw)
        magic, version, block_size, base_size, nblocks, id_len, base_id = fields
        if magic != MAGIC:
            raise StoreError(f"write cache {where}: not a pvsfarm write cache")
        if version != VERSION:
            raise StoreError(f"write cache {where}: unsupported version {version}")
        (crc,) = _CRC.unpack_from(raw, _HEADER.size)
        if crc != zlib.crc32(raw[: _HEADER.size]):
            raise StoreError(f"write cache {where}: header checksum mismatch")
        header = cls(block_size, base_size, base_id[:id_len].decode(errors="replace"))
        _check_block_size(block_size)
        if nblocks != header.nblocks:
            raise StoreError(f"write cache {where}: inconsistent block count")
        return header


def _check_block_size(block_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1):
        raise StoreError(f"write cache block size {block_size} is not a power of two >= 512")


def _as_base(base: BaseImage | str | os.PathLike[str]) -> tuple[BaseImage, bool]:
    if isinstance(base, BaseImage):
        return base, False
    return BaseImage(base), True


class WriteCache:
    """A `BlockDevice`: reads come from the base or the overlay, writes go to
    the overlay. Build with `create` (fresh cache) or `open_existing`
    (failover); the constructor is internal."""

    read_only = False
    can_multi_conn = True

    def __init__(self, base: BaseImage, owns_base: bool, path: Path, fd: int,
                 header: CacheHeader) -> None:
        self.base = base
        self._owns_base = owns_base
        self.path = path
        self.fd = fd
        self.header = header
        self.block_size = header.block_size
        self.size_bytes = header.base_size
        self._states = _map_states(fd, header.nblocks)
        self._lock = Lock()
        self._base_fd = base.fd

    # -- construction -------------------------------------------------------

    @classmethod
    def create(
        cls,
        base: BaseImage | str | os.PathLike[str],
        cache_path: str | os.PathLike[str],
        *,
        base_id: str | None = None,
        block_size: int = DEFAULT_BLOCK_BYTES,
    ) -> WriteCache:
        """A fresh, empty cache at ``cache_path``, replacing any old one.

        ``base`` is an open `BaseImage` (left open by `close`, so many caches
        can share it) or a path (opened here, closed with the cache).

        ``base_id`` identifies the base (pass the vDisk's content digest when
        known; default: `base_fingerprint`) and must be given the same way to
        `open_existing`. The file is built beside the target name and renamed
        over it, so a session still holding the old cache (a target that
        rebooted before its old node noticed) keeps writing into the orphaned
        old file and never disturbs the new one.
        """
        _check_block_size(block_size)
        image, owns = _as_base(base)
        try:
            ident = base_id if base_id is not None else base_fingerprint(image.fd, image.size_bytes)
            if len(ident.encode()) > MAX_BASE_ID_BYTES:
                raise StoreError(f"base id longer than {MAX_BASE_ID_BYTES} bytes")
            header = CacheHeader(block_size, image.size_bytes, ident)
            path = Path(cache_path)
            fd = _create_file(path, header)
        except BaseException:
            if owns:
                image.close()
            raise
        return cls._build(image, owns, path, fd, header)

    @classmethod
    def open_existing(
        cls,
        base: BaseImage | str | os.PathLike[str],
        cache_path: str | os.PathLike[str],
        *,
        base_id: str | None = None,
    ) -> WriteCache:
        """Reopen a cache left by a session that ended or died (failover).

        Raises `NotFound` if there is no file, `Conflict` if another session
        holds it, and `StoreError` if it is damaged or belongs to another base
        (size or id differ).
        """
        return cls._open(base, Path(cache_path), base_id, lambda path: _open_file(path))

    @classmethod
    def attach(
        cls,
        base: BaseImage | str | os.PathLike[str],
        cache_path: str | os.PathLike[str],
        *,
        base_id: str,
        ident: tuple[int, int],
    ) -> WriteCache:
        """Open a cache another process of this node owns (and holds the flock of):
        an NBD worker serving one of the session's connections. ``ident`` is the
        owner's ``(st_dev, st_ino)`` (`handoff_spec`); a different file at the
        path (taken over since) is a `StoreError`, so a worker never writes into
        a file its node does not hold."""
        def opener(path: Path) -> int:
            return open_verified(path, os.O_RDWR, ident, "write cache")
        return cls._open(base, Path(cache_path), base_id, opener)

    @classmethod
    def _open(cls, base, path: Path, base_id: str | None, opener) -> WriteCache:  # type: ignore[no-untyped-def]
        image, owns = _as_base(base)
        try:
            fd = opener(path)
            try:
                header = _load(fd, path, image, base_id)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            if owns:
                image.close()
            raise
        return cls._build(image, owns, path, fd, header)

    @classmethod
    def _build(cls, image: BaseImage, owns: bool, path: Path, fd: int, header: CacheHeader) -> WriteCache:
        try:
            return cls(image, owns, path, fd, header)
        except BaseException:
            os.close(fd)
            if owns:
                image.close()
            raise

    def handoff_spec(self) -> dict[str, object]:
        """How another process of this node re-opens this cache (`attach`)."""
        return {"kind": "cache", "base": str(self.base.path), "base_ident": self.base.ident(),
                "cache": str(self.path), "base_id": self.header.base_id, "ident": list(file_ident(self.fd))}

    # -- BlockDevice --------------------------------------------------------

    def read_extents(self, offset: int, length: int) -> list[Extent]:
        """Runs of blocks with the same source become one extent each, so a
        read the overlay never touched is a single extent of the base fd."""
        if offset < 0 or length <= 0 or offset + length > self.size_bytes:
            check_range(self.size_bytes, offset, length)
            return []
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        # the hot path (profiled): one block, or a run in one state; a slice of
        # the shared map is a consistent copy (one memcpy under the GIL)
        if first == last:
            return [self._extent(self._states[first], offset, length)]
        states = self._states[first : last + 1]
        if states.count(states[0]) == len(states):
            return [self._extent(states[0], offset, length)]
        end = offset + length
        extents: list[Extent] = []
        pos, block = offset, first
        for state, run in groupby(states):
            block += sum(1 for _ in run)
            run_end = min(end, block * bs)
            extents.append(self._extent(state, pos, run_end - pos))
            pos = run_end
        return extents

    def pwrite(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data).cast("B")
        check_range(self.size_bytes, offset, len(view))
        if not view:
            return
        with self._lock, self._blocks_locked(offset, len(view)):
            self._write(offset, view, fua)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        """As write_zeroes: TRIM may leave any content, but returning the base
        again would resurrect old data, so the trimmed range reads as zeros."""
        self.write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Whole blocks become ZERO in the map (no data, both slots punched);
        the partial blocks at either end are read-modify-written."""
        check_range(self.size_bytes, offset, length)
        if not length:
            return
        end = offset + length
        lo = -(-offset // self.block_size)
        hi = self.header.nblocks if end == self.size_bytes else end // self.block_size
        with self._lock, self._blocks_locked(offset, length):
            if lo >= hi:
                self._write(offset, memoryview(bytes(length)), fua=False)
                return
            if offset < lo * self.block_size:
                head = lo * self.block_size - offset
                self._write(offset, memoryview(bytes(head)), fua=False)
            tail_start = min(end, hi * self.block_size)
            if tail_start < end:
                self._write(tail_start, memoryview(bytes(end - tail_start)), fua=False)
            self._zero_blocks(lo, hi)

    def close(self) -> None:
        """Release the overlay (and the base if we opened it). Nothing needs
        writing: every acknowledged write is already in the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self._states.close()
        if self._owns_base:
            self.base.close()

    def __enter__(self) -> WriteCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- statistics ---------------------------------------------------------

    def cached_blocks(self) -> int:
        """Blocks whose content is no longer the base's (data or zero)."""
        return len(self._states) - bytes(self._states).count(BASE)

    # -- internals ----------------------------------------------------------

    def _blocks_locked(self, offset: int, length: int) -> _BlockLock:
        bs = self.block_size
        first = offset // bs
        return _BlockLock(self.fd, MAP_OFFSET + first, (offset + length - 1) // bs - first + 1)

    def _extent(self, state: int, pos: int, length: int) -> Extent:
        if state == BASE:
            return Extent(self._base_fd, pos, length)
        if state == ZERO:
            return Extent(ZERO_FD, 0, length)
        return Extent(self.fd, self._slot_base(state) + pos, length)

    def _slot_base(self, state: int) -> int:
        return self.header.data_a if state == SLOT_A else self.header.data_b

    def _block_len(self, block: int) -> int:
        return min(self.block_size, self.size_bytes - block * self.block_size)

    def _read_block(self, block: int) -> bytes:
        start, length = block * self.block_size, self._block_len(block)
        state = self._states[block]
        if state == ZERO:
            return bytes(length)
        if state == BASE:
            return pread_exact(self.base.fd, length, start)
        return pread_exact(self.fd, length, self._slot_base(state) + start)

    def _payloads(self, offset: int, view: memoryview) -> list[bytes | memoryview]:
        """The whole new content of every block the write touches."""
        bs, end = self.block_size, offset + len(view)
        out: list[bytes | memoryview] = []
        for block in range(offset // bs, (end - 1) // bs + 1):
            start = block * bs
            lo, hi = max(offset, start), min(end, start + self._block_len(block))
            piece = view[lo - offset : hi - offset]
            if hi - lo == self._block_len(block):
                out.append(piece)
            else:
                merged = bytearray(self._read_block(block))
                merged[lo - start : hi - start] = piece
                out.append(bytes(merged))
        return out

    def _write(self, offset: int, view: memoryview, fua: bool) -> None:
        first = offset // self.block_size
        payloads = self._payloads(offset, view)
        old = self._states[first : first + len(payloads)]
        new = bytes(SLOT_B if s == SLOT_A else SLOT_A for s in old)
        block = first
        for slot, run in groupby(zip(new, payloads), key=lambda pair: pair[0]):
            bufs = [buf for _, buf in run]
            data = bufs[0] if len(bufs) == 1 else b"".join(bufs)
            self._write_data(self._slot_base(slot) + block * self.block_size, data)
            block += len(bufs)
        if fua:
            os.fdatasync(self.fd)  # data on disk before the map that points at it
        self._persist_states(first, new)
        if fua:
            os.fdatasync(self.fd)

    def _zero_blocks(self, lo: int, hi: int) -> None:
        self._persist_states(lo, bytes([ZERO]) * (hi - lo))
        span = (hi - lo) * self.block_size
        for region in (self.header.data_a, self.header.data_b):
            punch_hole(self.fd, region + lo * self.block_size, span)

    # The two steps a crash can fall between; tests replace them to inject one.
    def _write_data(self, file_offset: int, data: bytes | memoryview) -> None:
        pwrite_all(self.fd, data, file_offset)

    def _persist_states(self, first: int, states: bytes) -> None:
        pwrite_all(self.fd, states, MAP_OFFSET + first)


def _create_file(path: Path, header: CacheHeader) -> int:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create write cache {str(path)!r}: {exc}") from exc
    try:
        lock_or_conflict(fd, exclusive=True, message=f"write cache {str(tmp)!r} is in use")
        os.ftruncate(fd, header.file_bytes)
        pwrite_all(fd, header.pack(), 0)
        os.replace(tmp, path)
    except BaseException as exc:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot create write cache {str(path)!r}: {exc}") from exc
        raise
    return fd


def _open_file(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NotFound(f"write cache {str(path)!r} does not exist") from exc
    except OSError as exc:
        raise StoreError(f"cannot open write cache {str(path)!r}: {exc}") from exc
    try:
        lock_or_conflict(
            fd, exclusive=True,
            message=f"write cache {str(path)!r} is already open in another session",
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _load(fd: int, path: Path, base: BaseImage, base_id: str | None) -> CacheHeader:
    where = repr(str(path))
    header = CacheHeader.unpack(os.pread(fd, HEADER_BYTES, 0), where)
    if header.base_size != base.size_bytes:
        raise StoreError(
            f"write cache {where} belongs to a base of {header.base_size} bytes,"
            f" not {base.size_bytes}"
        )
    expected = base_id if base_id is not None else base_fingerprint(base.fd, base.size_bytes)
    if header.base_id != expected:
        raise StoreError(f"write cache {where} belongs to another base ({header.base_id})")
    if os.fstat(fd).st_size < header.file_bytes:
        raise StoreError(f"write cache {where} is truncated")
    states = bytearray(pread_exact(fd, header.nblocks, MAP_OFFSET))
    if states.translate(None, _VALID_STATES):
        raise StoreError(f"write cache {where}: corrupt block map")
    return header


def _map_states(fd: int, nblocks: int) -> mmap.mmap:
    """The block map, shared with every process that has the file open. Mapped
    through a second open file description of the same inode, so the mapping
    (which keeps its own fd) holds neither the owner's flock nor its OFD locks:
    closing ``fd`` still releases them, as a process death does."""
    map_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return mmap.mmap(map_fd, nblocks, mmap.MAP_SHARED, mmap.PROT_READ, offset=MAP_OFFSET)
    finally:
        os.close(map_fd)


class _BlockLock:
    """An exclusive OFD lock on ``count`` map bytes from ``start`` (a context manager).

    OFD locks belong to the open file description, so instances in other
    processes (and other opens in this one) wait, while the owner's flock,
    a different kind of lock, does not interfere on local filesystems."""

    __slots__ = ("_fd", "_start", "_count")

    def __init__(self, fd: int, start: int, count: int) -> None:
        self._fd, self._start, self._count = fd, start, count

    def __enter__(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLKW, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, self._start, self._count, 0))

    def __exit__(self, *exc: object) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self._start, self._count, 0))
