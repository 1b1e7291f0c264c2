"""An append-only, checksummed, size-capped spool of Kafka records on local disk.

Events Kafka has not acknowledged in time land here and are replayed, in order, once it is back.

Layout: numbered segment files `<dir>/000000000001.seg`, ... rolled at `segment_bytes`, plus a `cursor`
file saying how far replay got inside the oldest segment. A record is

    magic u32 | length u32 | crc32c(length bytes + payload) u32 | payload
    payload = key_len u16 | key | value

The magic lets the reader find the next record after a torn or corrupt one; the CRC covers the length so a
damaged length is caught rather than trusted. A process only ever appends to a segment it created, so a
torn tail left by a crash is never followed by new records in the same file.

Thread model: one writer (`append`, from the publishing thread) and one reader (`read`/`commit`, from the
delivery thread) may run concurrently; an internal lock keeps them apart.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, get_args

import crc32c

from cohere_gateway import settings
from cohere_gateway.settings import FsyncMode

log = logging.getLogger(__name__)

FSYNC_MODES: tuple[str, ...] = get_args(FsyncMode)

MAGIC = 0xC06E5E11
HEADER = struct.Struct("<III")  # magic, length, crc
KEY_LEN = struct.Struct("<H")
MAX_KEY = 0xFFFF
# A record bigger than this is corruption, not data: Kafka's default max message is 1 MiB and the gateway
# truncates payloads long before that.
MAX_RECORD = 64 * 1024 * 1024
SEGMENT_SUFFIX = ".seg"
CURSOR_FILE = "cursor"
DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
LOCK_FILE = "lock"


class SpoolInUseError(RuntimeError):
    """Another process has this spool open; two writers would interleave their segments."""


@dataclass(frozen=True, order=True)
class Position:
    """A place in the spool: byte `offset` inside segment number `segment`."""

    segment: int
    offset: int


@dataclass(frozen=True)
class SpooledRecord:
    key: bytes
    value: bytes
    end: Position  # where the next record starts; commit(end) means "this one is delivered"


def encode_record(key: bytes, value: bytes) -> bytes:
    if len(key) > MAX_KEY:
        raise ValueError(f"key is {len(key)} bytes; the spool stores keys of at most {MAX_KEY} bytes")
    payload = KEY_LEN.pack(len(key)) + key + value
    length = struct.pack("<I", len(payload))
    return HEADER.pack(MAGIC, len(payload), crc32c.crc32c(length + payload)) + payload


def decode_payload(payload: bytes) -> tuple[bytes, bytes]:
    (key_len,) = KEY_LEN.unpack_from(payload)
    return payload[2 : 2 + key_len], payload[2 + key_len :]


def _valid_at(buf: bytes, at: int) -> int:
    """Length of the valid record starting at `buf[at]`, or 0 if there is none there."""
    if at + HEADER.size > len(buf):
        return 0
    magic, length, crc = HEADER.unpack_from(buf, at)
    end = at + HEADER.size + length
    if magic != MAGIC or length < KEY_LEN.size or length > MAX_RECORD or end > len(buf):
        return 0
    payload = buf[at + HEADER.size : end]
    if crc32c.crc32c(struct.pack("<I", length) + payload) != crc:
        return 0
    (key_len,) = KEY_LEN.unpack_from(payload)
    return HEADER.size + length if key_len <= length - KEY_LEN.size else 0


def next_valid(buf: bytes, start: int) -> int:
    """Offset of the first valid record at or after `start`, or len(buf) if none: how the reader resyncs."""
    needle = HEADER.pack(MAGIC, 0, 0)[:4]
    at = buf.find(needle, start)
    while at != -1:
        if _valid_at(buf, at):
            return at
        at = buf.find(needle, at + 1)
    return len(buf)


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        fsync: FsyncMode = settings.ProxySettings.spool_fsync,
        fsync_interval_ms: int = settings.ProxySettings.spool_fsync_interval_ms,
        segment_bytes: int | None = None,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"spool fsync must be one of {', '.join(FSYNC_MODES)}, got {fsync!r}")
        if max_bytes <= 0:
            raise ValueError(f"spool max bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        # Spooled events may hold request and response bodies: owner-only, whatever the umask.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        self._lock_fd: int | None = _lock_directory(self.directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval_s = max(fsync_interval_ms, 0) / 1000
        # Small caps get small segments, so replayed segments are freed (and the cap relieved) early.
        self.segment_bytes = segment_bytes or min(DEFAULT_SEGMENT_BYTES, max(64 * 1024, max_bytes // 8))
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # segment number -> bytes written (flushed or buffered)
        self._active: int | None = None  # the segment this process appends to
        self._file: BinaryIO | None = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self.corrupt_records = 0
        for path in sorted(self.directory.glob("*" + SEGMENT_SUFFIX)):
            if path.stem.isdigit():
                self._sizes[int(path.stem)] = path.stat().st_size
        self._next_segment = max(self._sizes, default=0) + 1
        self.start = self._load_cursor()

    # -- state ---------------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def _end(self) -> Position:
        """Position just past the last appended record (lock held)."""
        if not self._sizes:
            return Position(self._next_segment, 0)
        last = max(self._sizes)
        return Position(last, self._sizes[last])

    def pending_bytes(self, since: Position | None = None) -> int:
        """Bytes not yet delivered, counting from `since` (default: the committed start)."""
        since = since or self.start
        with self._lock:
            return sum(
                size - (since.offset if seg == since.segment else 0)
                for seg, size in self._sizes.items()
                if seg >= since.segment
            )

    def is_drained(self, pos: Position) -> bool:
        with self._lock:
            return pos >= self._end()

    # -- writing -------------------------------------------------------------------------------------

    def append(self, key: bytes, value: bytes) -> bool:
        """Append one record; False (nothing written) when it would push the spool past its cap."""
        record = encode_record(key, value)
        with self._lock:
            if sum(self._sizes.values()) + len(record) > self.max_bytes:
                return False
            if self._file is None:
                self._open_segment()
            assert self._file is not None and self._active is not None
            self._file.write(record)
            self._sizes[self._active] += len(record)
            self._dirty = True
            if self.fsync == "always" or time.monotonic() - self._last_sync >= self.fsync_interval_s:
                self._sync()
            if self._sizes[self._active] >= self.segment_bytes:
                self._seal()
            return True

    def tick(self) -> None:
        """Flush (and fsync, per policy) if the interval has passed; the delivery loop calls this often."""
        with self._lock:
            if self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval_s:
                self._sync()

    def flush(self) -> None:
        """Everything appended so far reaches the disk (fsync unless the policy is `never`)."""
        with self._lock:
            if self._dirty:
                self._sync()

    def _open_segment(self) -> None:
        number = self._next_segment
        self._next_segment += 1
        path = self.directory / f"{number:012d}{SEGMENT_SUFFIX}"
        self._file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
        self._active = number
        self._sizes[number] = 0
        if self.fsync != "never":
            self._fsync_dir()

    def _sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.fsync != "never":
                os.fsync(self._file.fileno())
        self._dirty = False
        self._last_sync = time.monotonic()

    def _seal(self) -> None:
        self._sync()
        if self._file is not None:
            self._file.close()
        self._file = None
        self._active = None

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------------------------------

    def read(self, pos: Position, max_records: int) -> tuple[list[SpooledRecord], Position]:
        """Up to `max_records` records from `pos` on, and the position after the last one read.

        Torn or corrupt bytes are skipped (and counted); reading continues at the next valid record.
        """
        records: list[SpooledRecord] = []
        while len(records) < max_records:
            with self._lock:
                segments = sorted(s for s in self._sizes if s >= pos.segment)
                if not segments:
                    return records, pos
                if segments[0] != pos.segment:
                    pos = Position(segments[0], 0)
                if pos.segment == self._active and self._file is not None:
                    # The reader must see what was appended (records are whole after a flush); fsync stays
                    # on the policy's schedule.
                    self._file.flush()
                limit = self._sizes[pos.segment]
                sealed = pos.segment != self._active
                last = pos.segment == segments[-1]
            if pos.offset < limit:
                pos = self._read_segment(pos, limit, max_records - len(records), records)
            if pos.offset >= limit:
                if last or not sealed:
                    return records, pos
                pos = Position(segments[1], 0)
        return records, pos

    def _read_segment(self, pos: Position, limit: int, room: int, out: list[SpooledRecord]) -> Position:
        path = self.directory / f"{pos.segment:012d}{SEGMENT_SUFFIX}"
        offset = pos.offset
        with open(path, "rb") as f:
            f.seek(offset)
            while room > 0 and offset < limit:
                header = f.read(HEADER.size)
                if len(header) == HEADER.size:
                    magic, length, crc = HEADER.unpack(header)
                    if magic == MAGIC and KEY_LEN.size <= length <= MAX_RECORD:
                        end = offset + HEADER.size + length
                        if end <= limit:
                            payload = f.read(length)
                            if len(payload) == length and crc32c.crc32c(header[4:8] + payload) == crc:
                                key, value = decode_payload(payload)
                                offset = end
                                out.append(SpooledRecord(key, value, Position(pos.segment, offset)))
                                room -= 1
                                continue
                offset = self._skip_corrupt(f, pos.segment, offset, limit)
                f.seek(offset)
        return Position(pos.segment, offset)

    def _skip_corrupt(self, f: BinaryIO, segment: int, offset: int, limit: int) -> int:
        # Corruption is rare, so scanning the rest of the (bounded) segment in memory is fine.
        f.seek(offset)
        rest = f.read(limit - offset)
        skip = next_valid(rest, 1)
        self.corrupt_records += 1
        log.error(
            "spool: skipped a torn or corrupt record in segment %d at byte %d (%d bytes); %d skipped so far",
            segment,
            offset,
            skip,
            self.corrupt_records,
        )
        return offset + skip

    # -- delivery progress ---------------------------------------------------------------------------

    def commit(self, pos: Position, *, persist: bool = True) -> None:
        """Everything before `pos` reached Kafka: free whole segments before it and remember `pos`."""
        with self._lock:
            for seg in [s for s in self._sizes if s < pos.segment and s != self._active]:
                (self.directory / f"{seg:012d}{SEGMENT_SUFFIX}").unlink(missing_ok=True)
                del self._sizes[seg]
            self.start = pos
        if persist:
            self._save_cursor(pos)

    def reset_if_drained(self, pos: Position) -> bool:
        """If `pos` is the end (all delivered), delete every segment and the cursor; True if so.

        The caller holds the lock that orders appends, so no append can slip in between check and reset.
        """
        with self._lock:
            if pos < self._end():
                return False
            if self._file is not None:
                self._file.close()
            self._file = None
            self._active = None
            self._dirty = False
            for seg in list(self._sizes):
                (self.directory / f"{seg:012d}{SEGMENT_SUFFIX}").unlink(missing_ok=True)
            self._sizes.clear()
            (self.directory / CURSOR_FILE).unlink(missing_ok=True)
            self.start = Position(self._next_segment, 0)
            return True

    def _load_cursor(self) -> Position:
        first = min(self._sizes, default=self._next_segment)
        try:
            raw = json.loads((self.directory / CURSOR_FILE).read_text())
            cursor = Position(int(raw["segment"]), int(raw["offset"]))
        except FileNotFoundError:
            return Position(first, 0)
        except (ValueError, KeyError, TypeError):
            log.error("spool: unreadable cursor in %s; replaying from the oldest segment", self.directory)
            return Position(first, 0)
        for seg in [s for s in self._sizes if s < cursor.segment]:
            (self.directory / f"{seg:012d}{SEGMENT_SUFFIX}").unlink(missing_ok=True)
            del self._sizes[seg]
        if cursor.segment not in self._sizes:
            return Position(min(self._sizes, default=self._next_segment), 0)
        return cursor

    def _save_cursor(self, pos: Position) -> None:
        tmp = self.directory / (CURSOR_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"segment": pos.segment, "offset": pos.offset}))
        os.replace(tmp, self.directory / CURSOR_FILE)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._seal()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def _lock_directory(directory: Path) -> int:
    """An exclusive flock on <dir>/lock for the life of the Spool; the kernel drops it if we die."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise SpoolInUseError(
            f"spool directory {directory} is in use by another process (pid {holder}); "
            "give each gateway process its own --spool-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
