"""One flush, one insert: the consumer's flush against real storage (both backends), in process. No
Kafka here: the flush's records are handed to the planner as a poll would, and nothing is committed (the
commit path is tested end to end in test_consumer.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta

from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.batching import TopicPartition
from cohere_gateway.consumers.consumer import REVOKE_WAIT_S, Consumer, Converted, Inflight
from cohere_gateway.consumers.rows import to_row
from cohere_gateway.events import encode
from cohere_gateway.settings import ConsumerSettings
from tests.fixtures.clickhouse import make_event

BASE = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
TOPIC = "events-flush-test"


def polled(partition: int, offsets: range, first_event: int) -> list[Converted]:
    out = []
    for n, offset in enumerate(offsets):
        row = to_row(encode(make_event(first_event + n, BASE)), partition, offset)
        out.append(Converted(TOPIC, partition, offset, 1_000 + offset, row, None))
    return out


def stored(backend: Backend) -> dict[str, int]:
    q = {
        "raw": "SELECT count() AS n FROM events",
        "distinct_ids": "SELECT uniqExact(event_id) AS n FROM events",
        "agg_requests": "SELECT sum(requests) AS n FROM events_by_minute",
        "hour_requests": "SELECT sum(requests) AS n FROM all_by_hour",
    }
    return {k: int(backend.query(sql)[0]["n"] or 0) for k, sql in q.items()}


def counted(consumer: Consumer, sample: str) -> float | None:
    return consumer.metrics.registry.get_sample_value(sample)


def flush(consumer: Consumer) -> None:
    consumer._start_flush()
    assert consumer._inflight is not None
    assert consumer._inflight.written.result() == []
    consumer._inflight = None


def test_a_flush_across_partitions_is_one_insert_and_a_re_cut_range_counts_nothing_twice(
    clickhouse_backend: Backend,
) -> None:
    consumer = Consumer(ConsumerSettings(topic=TOPIC), clickhouse_backend)
    first = {p: polled(p, range(0, 40), 100 * p) for p in range(3)}
    for p, records in first.items():
        consumer.planner.add(TopicPartition(TOPIC, p), records, time.monotonic())

    flush(consumer)
    # Before: one insert per partition, each writing a part per materialized view.
    assert counted(consumer, "cohere_gateway_consumer_batches_total") == 1
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests"), 120
    )

    # The next owner of partition 1 after a crash (nothing committed) cuts its range again, alone, in
    # a flush of its own: another token than the first insert's, so only the id lookup keeps it out.
    next_owner = Consumer(ConsumerSettings(topic=TOPIC), clickhouse_backend)
    next_owner.planner.add(TopicPartition(TOPIC, 1), first[1], time.monotonic())
    flush(next_owner)
    assert counted(next_owner, "cohere_gateway_consumer_duplicates_total") == 40
    assert stored(clickhouse_backend)["agg_requests"] == 120


def test_a_revoked_partitions_rebalance_waits_for_its_flush_in_flight(clickhouse_backend: Backend) -> None:
    """The next owner's duplicate lookup sees only what has landed, so the member losing a partition
    holds the rebalance until its flush for that partition is written."""
    consumer = Consumer(ConsumerSettings(topic=TOPIC), clickhouse_backend)
    consumer.planner.add(TopicPartition(TOPIC, 0), polled(0, range(0, 5), 0), time.monotonic())
    batch = consumer.planner.cut(TopicPartition(TOPIC, 0))
    assert batch is not None
    written: Future[list[tuple[object, str]]] = Future()
    consumer._inflight = Inflight([batch], [], written)
    landed_at: list[float] = []

    def land() -> None:
        time.sleep(0.3)  # stands for an insert still running on the writer thread
        landed_at.append(time.monotonic())
        written.set_result([])

    # Not the flush's partition: no wait (a wait would run out its whole bound, nothing lands here).
    started = time.monotonic()
    consumer.on_revoked([TopicPartition(TOPIC, 2)])
    assert time.monotonic() - started < REVOKE_WAIT_S
    writer = threading.Thread(target=land)
    writer.start()
    consumer.on_revoked([TopicPartition(TOPIC, 0)])
    returned_at = time.monotonic()
    writer.join()
    assert landed_at and landed_at[0] <= returned_at
