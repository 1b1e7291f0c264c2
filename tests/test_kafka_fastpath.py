"""The consumer's faster kafka-python reading (consumers/kafka_fastpath.py) returns exactly what
kafka-python's own code returns: on batches built by kafka-python's builder, and on a real broker's
fetches (compressed and not, tombstones, headers, a start inside a compressed batch)."""

from __future__ import annotations

import time
from typing import Any

import kafka
import kafka.net.manager
import pytest
from cohere_gateway.consumers import kafka_fastpath
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords
from kafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder
from kafka.serializer import Deserializer

from tests.fixtures.kafka import create_topic

BASE_TS = 1_764_000_000_000

# Every length class of every varint field: one byte, two and three bytes, null and empty.
RECORDS: list[tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
    (0, BASE_TS, None, b'{"a":1}', []),
    (1, BASE_TS + 5, b"", b"", []),
    (2, BASE_TS - 40, b"k" * 70, b"v" * 300, [("h", b"1")]),
    (3, BASE_TS + 90_000, b"acct/gw", None, []),
    (70, BASE_TS + 7, b"k", b"x" * 70_000, [("trace", None), ("ü", b"")]),
    (9_000, BASE_TS + 86_400_000, None, b"last", []),
]


def _batch(compression: int = 0) -> bytes:
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for offset, ts, key, value, headers in RECORDS:
        assert builder.append(offset, ts, key, value, headers) is not None
    return bytes(builder.build())


def _fast(data: bytes) -> list[tuple[Any, ...]]:
    batch = MemoryRecords(data).next_batch()
    batch._maybe_uncompress()
    header = batch._header_data
    raw = kafka_fastpath.read_records(bytes(batch._buffer), batch._pos, header[12])
    return [(header[0] + od, header[7] + td, k, v, h) for od, td, k, v, h, _size in raw]


@pytest.mark.parametrize("compression", [0, 1], ids=["plain", "gzip"])
def test_read_records_matches_kafka_python(compression: int) -> None:
    data = _batch(compression)
    stock = [(r.offset, r.timestamp, r.key, r.value, r.headers) for r in MemoryRecords(data).next_batch()]
    assert stock == [tuple(r) for r in RECORDS]  # the builder wrote what we meant
    assert _fast(data) == stock


def test_record_sizes_match_kafka_python() -> None:
    batch = MemoryRecords(_batch()).next_batch()
    sizes = [r.size_in_bytes for r in MemoryRecords(_batch()).next_batch()]
    raw = kafka_fastpath.read_records(bytes(batch._buffer), batch._pos, batch._header_data[12])
    assert [r[5] for r in raw] == sizes


def _legacy_batch(magic: int) -> bytes:
    builder = LegacyRecordBatchBuilder(magic=magic, compression_type=0, batch_size=1 << 20)
    for offset, ts, key, value, _headers in RECORDS:
        assert builder.append(offset, ts if magic else None, key, value) is not None
    return bytes(builder.build())


@pytest.mark.parametrize(
    "data",
    [_batch(), _batch(1) + _batch(), _legacy_batch(0), _legacy_batch(1)],
    ids=["v2", "v2-gzip-then-plain", "v0", "v1"],
)
@pytest.mark.parametrize("fetch_offset", [0, 3])
def test_partition_records_match_kafka_python(data: bytes, fetch_offset: int) -> None:
    """The whole unpacking loop, without a broker: positions, skipping to the fetch offset inside a
    batch, and message formats v0/v1 (gone from Kafka 4 brokers), which take kafka-python's records."""
    tp = TopicPartition("t", 0)

    def read(cls: type) -> tuple[list[tuple[Any, ...]], int, int]:
        records = cls(fetch_offset, tp, MemoryRecords(data))
        taken = [tuple(r) for r in records.take()]
        return taken, records.next_fetch_offset, records.records_read

    stock = read(Fetcher.PartitionRecords)
    assert stock[0] and stock[0][0][3] >= fetch_offset
    assert read(kafka_fastpath.FastPartitionRecords) == stock


def test_corrupt_batches_raise_corrupt_record_error() -> None:
    batch = MemoryRecords(_batch()).next_batch()
    body, pos, count = bytes(batch._buffer), batch._pos, batch._header_data[12]
    with pytest.raises(CorruptRecordError, match="ends inside"):
        kafka_fastpath.read_records(body[:-3], pos, count)
    with pytest.raises(CorruptRecordError, match="fewer than"):
        kafka_fastpath.read_records(body, pos, count + 1)
    with pytest.raises(CorruptRecordError, match="unconsumed"):
        kafka_fastpath.read_records(body + b"\0\0", pos, count)
    # A record whose length prefix disagrees with its fields: the first record's length, one too big.
    bad = bytearray(body)
    bad[pos] += 2  # zigzag: +2 encodes +1
    with pytest.raises(CorruptRecordError, match="Invalid record size"):
        kafka_fastpath.read_records(bytes(bad), pos, count)


def _consumer(bootstrap: str, fast: bool, **config: Any) -> KafkaConsumer:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        **config,
    )
    if fast:
        assert kafka_fastpath.install(consumer)
    return consumer


def _read_all(consumer: KafkaConsumer, tp: TopicPartition, start: int, count: int) -> list[tuple[Any, ...]]:
    consumer.assign([tp])
    consumer.seek(tp, start)
    out: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 30
    while len(out) < count and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            out.extend(tuple(r) for r in records)
    consumer.close()
    return out


def test_fast_consumer_reads_what_kafka_python_reads(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # install() swaps the transport class for the whole process; the test puts it back afterwards.
    monkeypatch.setattr(kafka.net.manager, "KafkaTCPTransport", kafka.net.manager.KafkaTCPTransport)
    topic = create_topic(kafka_bootstrap, f"fastpath-{time.monotonic_ns()}", partitions=1)
    sent = 0
    for compression in (None, "gzip"):
        producer = KafkaProducer(
            bootstrap_servers=kafka_bootstrap, compression_type=compression, linger_ms=50, batch_size=1 << 20
        )
        for i in range(400):
            value = None if i % 97 == 1 else (b"%d:" % i) * (1 + i % 300)  # None: a tombstone
            key = None if i % 5 == 0 and value is not None else f"k{i}".encode()
            headers = [("n", str(i).encode())] if i % 3 == 0 else []
            producer.send(topic, key=key, value=value, headers=headers)
            sent += 1
        producer.flush()
        producer.close()
    tp = TopicPartition(topic, 0)
    # 410 is inside the gzip batches: both must skip that batch's first records the same way.
    for start in (0, 410):
        stock = _read_all(_consumer(kafka_bootstrap, fast=False), tp, start, sent - start)
        fast = _read_all(_consumer(kafka_bootstrap, fast=True), tp, start, sent - start)
        assert len(stock) == sent - start
        assert [r[3] for r in stock] == list(range(start, sent))
        assert fast == stock
    assert kafka.net.manager.KafkaTCPTransport is kafka_fastpath.WideRecvTransport


class _Text(Deserializer):  # type: ignore[misc]
    def deserialize(self, topic: str, headers: Any, data: bytes | None) -> str | None:
        return data.decode() if data is not None else None


def test_install_leaves_other_versions_and_deserializing_consumers_alone(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kafka.net.manager, "KafkaTCPTransport", kafka.net.manager.KafkaTCPTransport)
    stock_transport = kafka.net.manager.KafkaTCPTransport
    deserializing = KafkaConsumer(bootstrap_servers=kafka_bootstrap, value_deserializer=_Text())
    assert not kafka_fastpath.install(deserializing)
    deserializing.close()
    plain = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    monkeypatch.setattr(kafka, "__version__", "3.0.13")
    assert not kafka_fastpath.install(plain)
    assert plain._fetcher.PartitionRecords is not kafka_fastpath.FastPartitionRecords
    plain.close()
    assert kafka.net.manager.KafkaTCPTransport is stock_transport
