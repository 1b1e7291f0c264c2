"""The batch planner and row conversion: pure code, no Kafka or ClickHouse."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cohere_gateway.consumers.batching import Planner, Range, TopicPartition
from cohere_gateway.consumers.rows import Rejected
from cohere_gateway.events import encode
from tests.fixtures.clickhouse import convert, make_event

TP = TopicPartition("t", 0)


@dataclass
class Rec:
    offset: int
    timestamp: int = 1000
    topic: str = "t"
    partition: int = 0
    value: bytes | None = b""


def test_without_intents_a_batch_is_everything_buffered() -> None:
    p = Planner()
    p.add(TP, [Rec(o) for o in range(5, 9)], arrived=0.0)
    batch = p.cut(TP)
    assert batch is not None and not batch.replay
    assert (batch.range.first_offset, batch.range.last_offset) == (5, 8)
    assert batch.range.dedup_token == "t:0:5-8:1000"


def test_a_recorded_intent_is_cut_again_exactly_even_with_more_buffered() -> None:
    p = Planner()
    p.load_intents(TP, [Range("t", 0, 5, 7, 1000)])
    p.add(TP, [Rec(5), Rec(6)], arrived=0.0)
    assert p.cut(TP) is None  # offset 7 not here yet: wait rather than cut a different range
    p.add(TP, [Rec(7), Rec(8), Rec(9)], arrived=0.1)
    batch = p.cut(TP)
    assert batch is not None and batch.replay and [r.offset for r in batch.records] == [5, 6, 7]
    p.done(batch, now=0.2)
    rest = p.cut(TP)
    assert rest is not None and (rest.range.first_offset, rest.range.last_offset) == (8, 9)


def test_an_intent_from_a_recreated_topic_is_ignored() -> None:
    p = Planner()
    p.load_intents(TP, [Range("t", 0, 0, 50, 999)])  # same offsets, other first timestamp
    p.add(TP, [Rec(0), Rec(1)], arrived=0.0)
    batch = p.cut(TP)
    assert batch is not None and not batch.replay and batch.range.last_offset == 1


def test_due_by_count_or_age() -> None:
    p = Planner()
    assert not p.due(now=100.0, batch_size=3, wait_s=1.0)
    p.add(TP, [Rec(0)], arrived=10.0)
    assert not p.due(now=10.5, batch_size=3, wait_s=1.0)
    assert p.due(now=11.0, batch_size=3, wait_s=1.0)
    p.add(TP, [Rec(1), Rec(2)], arrived=10.6)
    assert p.due(now=10.6, batch_size=3, wait_s=1.0)


def test_batch_size_counts_every_partition_because_a_flush_is_one_insert() -> None:
    p = Planner()
    other = TopicPartition("t", 1)
    p.add(TP, [Rec(0)], arrived=10.0)
    p.add(other, [Rec(0, partition=1)], arrived=10.0)
    assert not p.due(now=10.1, batch_size=3, wait_s=1.0)
    p.add(other, [Rec(1, partition=1)], arrived=10.1)  # three buffered, in two partitions
    assert p.due(now=10.1, batch_size=3, wait_s=1.0)


def test_records_held_during_a_flush_keep_the_time_they_were_polled() -> None:
    """Before, records polled while a flush was in flight started their batch wait when that flush
    ended, so they waited up to a whole insert longer than the wait."""
    p = Planner()
    p.add(TP, [Rec(0)], arrived=10.0)
    batch = p.cut(TP)
    assert batch is not None
    p.done(batch, now=10.5)  # the flush in flight lands; the records polled meanwhile join now
    p.add(TP, [Rec(1)], arrived=10.2)
    assert p.wait_left(now=10.5, wait_s=1.0) == pytest.approx(0.7)
    assert p.due(now=11.2, batch_size=100, wait_s=1.0)
    assert p.wait_left(now=12.0, wait_s=1.0) == 0.0


def test_convert_accepts_events_and_explains_rejections() -> None:
    assert isinstance(convert(encode(make_event(1)), 0, 0), bytes)
    assert "tombstone" in convert(None, 0, 0).reason  # type: ignore[union-attr]
    bad = convert(b'{"schema_version": "1.0"}', 0, 0)
    assert isinstance(bad, Rejected) and "missing required field" in bad.reason
    from datetime import UTC, datetime

    far = make_event(
        1, start_time=datetime(2400, 1, 1, tzinfo=UTC), end_time=datetime(2400, 1, 1, tzinfo=UTC)
    )
    rejected = convert(encode(far), 0, 0)
    assert isinstance(rejected, Rejected) and "outside 1970..2299" in rejected.reason
