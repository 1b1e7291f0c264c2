"""Faster reading for the consumer's kafka-python client: record batches and socket reads.

The consumer's Python threads spent about 16 µs per event draining a backlog on this machine class, about
half of it in kafka-python: decoding records through a chain of pure-Python calls per record (a varint
function per field, a record object, properties on the batch), and reading sockets 4 KiB at a time,
about 250 calls per MiB fetched. `read_records` decodes a whole batch in one loop
with the one-byte varint case inline, `FastPartitionRecords` uses it in place of kafka-python's
per-record loop, and `WideRecvTransport` reads whatever the socket holds into one reusable buffer.
Together they take about 3 µs per event off (bench/RESULTS.md, sink).

Everything around them stays kafka-python's: fetching, CRC checks, decompression, positions, the group
protocol, TLS (left on kafka-python's own transport). Batches in message formats v0/v1 go through
kafka-python's record objects. `install` changes nothing unless the installed kafka-python is the
version these were checked against (tests/test_kafka_fastpath.py compares both readers record by
record, on built batches and on a real broker's fetches).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import kafka
import kafka.errors
import kafka.net.manager
import kafka.net.transport
from kafka.consumer.fetcher import ConsumerRecord, Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch

log = logging.getLogger(__name__)

# The kafka-python whose internals the classes below subclass (pyproject pins it); another version may
# have changed them, so nothing is installed there.
CHECKED_VERSION = "3.0.12"

# (offset_delta, timestamp_delta, key, value, headers, length): length as kafka-python counts a
# record's size, without its own length prefix
RawRecord = tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]], int]


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A zigzag varint of any length starting at `pos`: (value, position after it)."""
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptRecordError("varint longer than 10 bytes in record batch")


def read_records(buf: bytes, pos: int, count: int) -> list[RawRecord]:
    """The `count` records of an uncompressed v2 batch body starting at `pos`.

    Record => Length Attributes TimestampDelta OffsetDelta Key Value [Header], every integer a zigzag
    varint. Most of them fit in one byte, decoded inline; longer ones go through `_varint`.
    """
    try:
        return _read(buf, pos, count)
    except IndexError:
        raise CorruptRecordError(f"record batch ends inside one of its {count} records") from None


def _read(buf: bytes, pos: int, count: int) -> list[RawRecord]:
    out: list[RawRecord] = []
    append = out.append
    end = len(buf)
    for _ in range(count):
        if pos >= end:
            raise CorruptRecordError(f"record batch holds fewer than its {count} records")
        b = buf[pos]
        if b < 0x80:
            length, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            length, pos = _varint(buf, pos)
        body_start = pos
        if buf[pos] < 0x80:  # attributes: unused in v2 records
            pos += 1
        else:
            pos = _varint(buf, pos)[1]
        b = buf[pos]
        if b < 0x80:
            ts_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            ts_delta, pos = _varint(buf, pos)
        b = buf[pos]
        if b < 0x80:
            offset_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            offset_delta, pos = _varint(buf, pos)
        b = buf[pos]
        if b < 0x80:
            key_len, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            key_len, pos = _varint(buf, pos)
        key = None
        if key_len >= 0:
            key, pos = buf[pos : pos + key_len], pos + key_len
        b = buf[pos]
        if b < 0x80:
            value_len, pos = (b >> 1) ^ -(b & 1), pos + 1
        else:
            value_len, pos = _varint(buf, pos)
        value = None
        if value_len >= 0:
            value, pos = buf[pos : pos + value_len], pos + value_len
        headers: list[tuple[str, bytes | None]] = []
        if buf[pos] == 0:
            pos += 1
        else:
            pos = _read_headers(buf, pos, headers)
        if pos - body_start != length:
            raise CorruptRecordError(
                f"Invalid record size: expected to read {length} bytes in record payload, "
                f"but instead read {pos - body_start}"
            )
        append((offset_delta, ts_delta, key, value, headers, length))
    if pos != end:
        raise CorruptRecordError(f"{end - pos} unconsumed bytes after all {count} records of a batch")
    return out


def _read_headers(buf: bytes, pos: int, headers: list[tuple[str, bytes | None]]) -> int:
    count, pos = _varint(buf, pos)
    if count < 0:
        raise CorruptRecordError(f"Found invalid number of record headers {count}")
    for _ in range(count):
        key_len, pos = _varint(buf, pos)
        if key_len < 0:
            raise CorruptRecordError(f"Invalid negative header key size {key_len}")
        key = buf[pos : pos + key_len].decode("utf-8")
        pos += key_len
        value_len, pos = _varint(buf, pos)
        value = None
        if value_len >= 0:
            value, pos = buf[pos : pos + value_len], pos + value_len
        headers.append((key, value))
    return pos


class FastPartitionRecords(Fetcher.PartitionRecords):  # type: ignore[misc]
    """kafka-python's PartitionRecords, with v2 data batches decoded by `read_records`. The loop is
    kafka-python 3.0.12's `_unpack_records` for a read-uncommitted consumer without deserializers (the
    only kind `install` gives it to), with the per-record work replaced."""

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[ConsumerRecord]:
        try:
            batch = records.next_batch()
            last_batch = None
            while batch is not None:
                last_batch = batch
                if self.check_crcs and not batch.validate_crc():
                    raise CorruptRecordError(
                        f"Record batch for partition {self.topic_partition} at offset "
                        f"{batch.base_offset} failed crc check"
                    )
                if batch.magic == 2:
                    self.leader_epoch = batch.leader_epoch
                    if batch.is_control_batch:
                        self.next_fetch_offset = batch.next_offset
                        batch = records.next_batch()
                        continue
                if isinstance(batch, DefaultRecordBatch):
                    yield from self._v2_records(tp, batch)
                else:
                    yield from self._legacy_records(tp, batch)
                batch = records.next_batch()
            else:
                # As kafka-python: the next fetch starts after the batch's last offset even when
                # compaction removed its last records.
                if last_batch and last_batch.magic == 2:
                    self.next_fetch_offset = last_batch.next_offset
                self.drain()
        except StopIteration:
            raise RuntimeError("StopIteration raised unpacking messageset") from None

    def _v2_records(self, tp: Any, batch: DefaultRecordBatch) -> Iterator[ConsumerRecord]:
        batch._maybe_uncompress()
        header = batch._header_data
        base_offset, first_ts, max_ts = header[0], header[7], header[8]
        ts_type = batch.timestamp_type
        log_append_time = ts_type == batch.LOG_APPEND_TIME
        topic, partition, epoch = tp.topic, tp.partition, self.leader_epoch
        raw = read_records(bytes(batch._buffer), batch._pos, header[12])
        for offset_delta, ts_delta, key, value, headers, size in raw:
            offset = base_offset + offset_delta
            self.records_read += 1
            self.bytes_read += size
            self.next_fetch_offset = offset + 1
            yield ConsumerRecord(
                topic,
                partition,
                epoch,
                offset,
                max_ts if log_append_time else first_ts + ts_delta,
                ts_type,
                key,
                value,
                headers,
                None,
                len(key) if key is not None else -1,
                len(value) if value is not None else -1,
                _header_size(headers),
            )

    def _legacy_records(self, tp: Any, batch: Any) -> Iterator[ConsumerRecord]:
        for record in batch:
            if self.check_crcs and not record.validate_crc():
                raise CorruptRecordError(
                    f"Record for partition {self.topic_partition} at offset {record.offset} failed crc check"
                )
            key, value, headers = record.key, record.value, record.headers
            self.records_read += 1
            self.bytes_read += record.size_in_bytes
            self.next_fetch_offset = record.offset + 1
            yield ConsumerRecord(
                tp.topic,
                tp.partition,
                self.leader_epoch,
                record.offset,
                record.timestamp,
                record.timestamp_type,
                key,
                value,
                headers,
                record.checksum,
                len(key) if key is not None else -1,
                len(value) if value is not None else -1,
                _header_size(headers),
            )


def _header_size(headers: list[tuple[str, bytes | None]]) -> int:
    if not headers:
        return -1
    return sum(len(k.encode("utf-8")) + (len(v) if v is not None else 0) for k, v in headers)


class WideRecvTransport(kafka.net.transport.KafkaTCPTransport):  # type: ignore[misc]
    """kafka-python's plaintext transport, reading up to 256 KiB per call into a buffer it keeps."""

    RECV_BYTES = 256 * 1024

    def _sock_recv(self) -> tuple[bytes, Exception | None]:
        buf = getattr(self, "_recv_buf", None)
        if buf is None:
            buf = self._recv_buf = memoryview(bytearray(self.RECV_BYTES))
        chunks: list[bytes] = []
        err: Exception | None = None
        while True:
            try:
                n = self._sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except Exception as exc:
                log.warning("%s: error receiving from the socket, closing it: %s", self, exc)
                err = kafka.errors.KafkaConnectionError(exc)
                break
            if not n:
                err = kafka.errors.KafkaConnectionError("socket disconnected")
                break
            chunks.append(bytes(buf[:n]))
        return b"".join(chunks), err


def install(consumer: Any) -> bool:
    """Give `consumer` (a kafka-python KafkaConsumer, before it subscribes) the fast batch reader, and
    every plaintext connection this process opens from now on the wide reads. Only for the kafka-python
    version they were checked against, and a consumer that reads uncommitted records without
    deserializers (the only kind `FastPartitionRecords` implements). Returns whether it did."""
    fetcher = getattr(consumer, "_fetcher", None)
    config = getattr(consumer, "config", {})
    if kafka.__version__ != CHECKED_VERSION or fetcher is None:
        log.info("kafka-python %s: keeping its own record reader", kafka.__version__)
        return False
    if config.get("isolation_level") != "read_uncommitted" or (
        config.get("key_deserializer") or config.get("value_deserializer")
    ):
        return False
    fetcher.PartitionRecords = FastPartitionRecords
    # The manager builds each connection's transport from this module-level name.
    kafka.net.manager.KafkaTCPTransport = WideRecvTransport
    return True
