"""One flush, one insert, and the rollups' insert serving several flushes: the consumer's flush against
real storage (both backends), in process. No Kafka here: the flush's records are handed to the planner as
a poll would, and the commits go to a stand-in that records them (`Offsets`; the commit path against a
real broker is tested end to end in test_consumer.py)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cohere_gateway.consumers import schema
from cohere_gateway.consumers.backends import Backend, BackendUnavailable, FaultInjectingBackend
from cohere_gateway.consumers.batching import TopicPartition
from cohere_gateway.consumers.consumer import REVOKE_WAIT_S, Consumer, Converted, Inflight, Written
from cohere_gateway.consumers.rows import EVENT_COLUMNS, to_row
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


class Offsets:
    """Stands in for the Kafka consumer's assignment and commit (no broker in these tests): records
    every commit, so a test can tell what was committed and when."""

    def __init__(self, partitions: range) -> None:
        self.owned = {TopicPartition(TOPIC, p) for p in partitions}
        self.commits: list[dict[int, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    def commit(self, offsets: dict[Any, Any], timeout_ms: int) -> None:
        self.commits.append({tp.partition: meta.offset for tp, meta in offsets.items()})


def consumer_on(backend: Backend, partitions: range = range(3), **settings: Any) -> tuple[Consumer, Offsets]:
    # No poll loop here: a batch wait of a minute keeps "nothing arrived for twice the batch wait"
    # (rollups due) from depending on how fast the host runs the test.
    consumer = Consumer(ConsumerSettings(topic=TOPIC, **{"batch_wait_ms": 60_000} | settings), backend)
    consumer._kafka = offsets = Offsets(partitions)
    return consumer, offsets


def add(consumer: Consumer, records: list[Converted]) -> None:
    consumer.planner.add(TopicPartition(TOPIC, records[0].partition), records, time.monotonic())


def stored(backend: Backend) -> dict[str, int]:
    q = {
        "raw": "SELECT count() AS n FROM events",
        "distinct_ids": "SELECT uniqExact(event_id) AS n FROM events",
        "agg_requests": "SELECT sum(requests) AS n FROM events_by_minute",
        "hour_requests": "SELECT sum(requests) AS n FROM all_by_hour",
        "day_requests": "SELECT sum(requests) AS n FROM events_by_day",
    }
    return {k: int(backend.query(sql)[0]["n"] or 0) for k, sql in q.items()}


def counted(consumer: Consumer, sample: str) -> float | None:
    return consumer.metrics.registry.get_sample_value(sample)


def test_a_flush_across_partitions_is_one_insert_and_a_re_cut_range_counts_nothing_twice(
    clickhouse_backend: Backend,
) -> None:
    consumer, offsets = consumer_on(clickhouse_backend)
    first = {p: polled(p, range(0, 40), 100 * p) for p in range(3)}
    for records in first.values():
        add(consumer, records)

    consumer.flush()
    # Before: one insert per partition, each writing a part per materialized view.
    assert counted(consumer, "cohere_gateway_consumer_batches_total") == 1
    # The raw rows and the per-minute views at once; the hour and day rollups when they are due (here
    # the end of the run), and the offsets only then.
    assert stored(clickhouse_backend) == {**dict.fromkeys(("raw", "distinct_ids", "agg_requests"), 120)} | {
        "hour_requests": 0,
        "day_requests": 0,
    }
    assert offsets.commits == []
    consumer.flush(final=True)
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 120
    )
    assert offsets.commits == [{0: 40, 1: 40, 2: 40}]

    # The next owner of partition 1 after a crash (nothing committed) cuts its range again, alone, in
    # a flush of its own: another token than the first insert's, so only the id lookups keep it out.
    next_owner, _ = consumer_on(clickhouse_backend)
    add(next_owner, first[1])
    next_owner.flush(final=True)
    assert counted(next_owner, "cohere_gateway_consumer_duplicates_total") == 40
    assert counted(next_owner, "cohere_gateway_consumer_rollup_inserts_total") == 0
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 120
    )


def test_one_rollup_insert_serves_the_flushes_of_rollup_wait_and_commits_them(
    clickhouse_backend: Backend,
) -> None:
    """Each insert writes a part per view whatever its size: the 12 hour and day rollups are fed once
    for several flushes, and nothing is committed before they hold the rows."""
    consumer, offsets = consumer_on(clickhouse_backend, rollup_wait_ms=60_000)
    for n in range(3):
        add(consumer, polled(n % 2, range(20 * (n // 2), 20 * (n // 2) + 20), 1000 * n))
        consumer.flush()
    assert counted(consumer, "cohere_gateway_consumer_batches_total") == 3
    assert counted(consumer, "cohere_gateway_consumer_rollup_inserts_total") == 0
    assert consumer._backlog.rows and len(consumer._backlog.rows) == 60
    assert stored(clickhouse_backend)["hour_requests"] == 0
    assert offsets.commits == []

    consumer.flush(final=True)  # nothing buffered: the rollups alone
    assert counted(consumer, "cohere_gateway_consumer_rollup_inserts_total") == 1
    assert counted(consumer, "cohere_gateway_consumer_rollup_events_total") == 60
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 60
    )
    assert offsets.commits == [{0: 40, 1: 20}]


def test_rollup_wait_0_feeds_the_rollups_with_every_flush(clickhouse_backend: Backend) -> None:
    consumer, offsets = consumer_on(clickhouse_backend, rollup_wait_ms=0)
    add(consumer, polled(0, range(0, 10), 0))
    consumer.flush()
    assert stored(clickhouse_backend)["hour_requests"] == 10
    assert offsets.commits == [{0: 10}]


def test_a_crash_between_the_raw_and_the_rollup_insert_is_mended_by_the_replay(
    clickhouse_backend: Backend,
) -> None:
    """The raw rows of two flushes are stored, the rollups lack them and nothing is committed when the
    consumer dies. Its successor reads the partition again from its last commit (offset 0) and more
    after it: the raw table leaves out what it holds, the rollups take exactly what they lack."""
    crashed, _ = consumer_on(clickhouse_backend, rollup_wait_ms=60_000)
    records = polled(0, range(0, 30), 0)
    add(crashed, records[:10])
    crashed.flush()
    add(crashed, records[10:20])
    crashed.flush()
    assert stored(clickhouse_backend) == dict.fromkeys(("raw", "distinct_ids", "agg_requests"), 20) | {
        "hour_requests": 0,
        "day_requests": 0,
    }

    successor, offsets = consumer_on(clickhouse_backend, rollup_wait_ms=60_000)
    add(successor, records)
    while successor.planner.buffered():  # the recorded ranges first, cut as they were (intent log)
        successor.flush()
    successor.flush(final=True)
    assert counted(successor, "cohere_gateway_consumer_duplicates_total") == 20
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 30
    )
    assert offsets.commits == [{0: 30}]


def test_a_large_flush_feeds_the_raw_table_and_the_rollups_in_one_insert(clickhouse_backend: Backend) -> None:
    """A backlog being read comes in large flushes (here: a whole --batch-size, below TOGETHER_ROWS):
    parsing each row twice, once per insert, cost a drain about a fifth of its rate. Rows an earlier
    attempt stored raw still reach the rollups once."""
    crashed, _ = consumer_on(clickhouse_backend, batch_size=100, rollup_wait_ms=60_000)
    records = polled(0, range(0, 20), 0)
    add(crashed, records[:10])
    crashed.flush()  # raw only, then the consumer dies

    successor, offsets = consumer_on(clickhouse_backend, batch_size=10, rollup_wait_ms=60_000)
    add(successor, records)
    successor.flush()  # the recorded range 0-9: stored raw, so its rows wait for the rollups' insert
    assert stored(clickhouse_backend)["hour_requests"] == 0 and offsets.commits == []
    # 10-19, a whole batch: one insert feeds both; the waiting rows (a batch's worth too) are fed with it.
    successor.flush()
    assert counted(successor, "cohere_gateway_consumer_events_inserted_total") == 10
    assert counted(successor, "cohere_gateway_consumer_batches_total") == 1
    assert counted(successor, "cohere_gateway_consumer_rollup_inserts_total") == 2
    assert counted(successor, "cohere_gateway_consumer_rollup_events_total") == 20
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 20
    )
    assert offsets.commits == [{0: 20}]


def test_a_failed_rollup_insert_commits_nothing_and_its_retry_counts_each_event_once(
    clickhouse_backend: Backend, tmp_path: Path
) -> None:
    flag = tmp_path / "clickhouse-down"
    consumer, offsets = consumer_on(FaultInjectingBackend(clickhouse_backend, flag))
    add(consumer, polled(0, range(0, 10), 0))
    flag.write_text("rollup_feed")  # ClickHouse fails between the flush's two inserts
    with pytest.raises(BackendUnavailable):
        consumer.flush(final=True)
    assert stored(clickhouse_backend)["raw"] == 10
    assert stored(clickhouse_backend)["hour_requests"] == 0
    assert offsets.commits == []

    flag.unlink()
    consumer.flush(final=True)  # the batch is cut again: the raw insert finds it stored
    assert stored(clickhouse_backend) == dict.fromkeys(
        ("raw", "distinct_ids", "agg_requests", "hour_requests", "day_requests"), 10
    )
    assert offsets.commits == [{0: 10}]


def test_a_rollup_insert_repeated_with_its_token_is_counted_once(clickhouse_backend: Backend) -> None:
    """The engine behaviour a retry after a partial write relies on: views fed from a Null table
    deduplicate a block repeated with the same token (each view's table keeps its own window)."""
    lines = b"".join(p.row.line for p in polled(0, range(0, 5), 0))  # type: ignore[union-attr]
    for _ in range(2):
        clickhouse_backend.insert_json_rows("rollup_feed", lines, "rollup:test", EVENT_COLUMNS)
    assert stored(clickhouse_backend)["hour_requests"] == 5
    assert stored(clickhouse_backend)["day_requests"] == 5
    assert stored(clickhouse_backend)["raw"] == 0  # the feed stores nothing itself


def test_a_revoked_partition_leaves_the_backlog_and_is_read_again_from_its_last_commit(
    clickhouse_backend: Backend,
) -> None:
    consumer, offsets = consumer_on(clickhouse_backend, rollup_wait_ms=60_000)
    add(consumer, polled(0, range(0, 10), 0))
    add(consumer, polled(1, range(0, 10), 100))
    consumer.flush()
    consumer.on_revoked([TopicPartition(TOPIC, 1)])
    offsets.owned.discard(TopicPartition(TOPIC, 1))
    assert consumer._rewind == {TopicPartition(TOPIC, 1): 0}
    consumer.flush(final=True)
    # Partition 1's rows are the next owner's to feed (its lookup finds them missing), not ours.
    assert stored(clickhouse_backend)["hour_requests"] == 10
    assert offsets.commits == [{0: 10}]


def test_a_revoked_partitions_rebalance_waits_for_its_flush_in_flight(clickhouse_backend: Backend) -> None:
    """The next owner's duplicate lookup sees only what has landed, so the member losing a partition
    holds the rebalance until its flush for that partition is written."""
    consumer = Consumer(ConsumerSettings(topic=TOPIC), clickhouse_backend)
    consumer.planner.add(TopicPartition(TOPIC, 0), polled(0, range(0, 5), 0), time.monotonic())
    batch = consumer.planner.cut(TopicPartition(TOPIC, 0))
    assert batch is not None
    written: Future[Written] = Future()
    consumer._inflight = Inflight([batch], [], written, rollup=False)
    landed_at: list[float] = []

    def land() -> None:
        time.sleep(0.3)  # stands for an insert still running on the writer thread
        landed_at.append(time.monotonic())
        written.set_result(Written([], []))

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


def test_the_rollup_feed_migration_counts_what_earlier_inserts_fed_once(storage: Any) -> None:
    """Before migration 0016 the insert into `events` fed the rollups itself. After it, a replay of those
    events (read again after a crash before their commit) finds them in `rollup_ids`, which the
    migration filled from `event_ids`, and new events reach the rollups through the consumer's feed."""
    backend = storage.open()
    schema.migrate(backend, until=15)
    earlier = polled(0, range(0, 30), 0)
    lines = b"".join(p.row.line for p in earlier)  # type: ignore[union-attr]
    backend.insert_json_rows("events", lines, "before-0016", EVENT_COLUMNS)
    assert stored(backend) == dict.fromkeys(stored(backend), 30)
    assert schema.migrate(backend) == [16]

    consumer, offsets = consumer_on(backend)
    add(consumer, earlier + polled(0, range(30, 40), 30))
    consumer.flush(final=True)
    assert counted(consumer, "cohere_gateway_consumer_duplicates_total") == 30
    assert counted(consumer, "cohere_gateway_consumer_rollup_events_total") == 10
    assert stored(backend) == dict.fromkeys(stored(backend), 40)
    assert offsets.commits == [{0: 40}]


def test_the_rollups_are_fed_once_nothing_has_arrived_for_twice_the_batch_wait(
    clickhouse_backend: Backend,
) -> None:
    """A drained topic: the last rows' rollups need not wait out --rollup-wait-ms."""
    now = [0.0]
    consumer = Consumer(
        ConsumerSettings(topic=TOPIC, batch_wait_ms=100, rollup_wait_ms=60_000),
        clickhouse_backend,
        clock=lambda: now[0],
    )
    consumer._kafka = offsets = Offsets(range(1))
    add(consumer, polled(0, range(0, 10), 0))
    consumer.flush()
    assert consumer._rollups_wait_left(now[0]) == 0.2 and not consumer._rollups_due(now[0])
    now[0] = 0.2
    assert consumer._rollups_due(now[0])
    consumer.flush()
    assert stored(clickhouse_backend)["hour_requests"] == 10
    assert offsets.commits == [{0: 10}]


def test_a_flush_written_while_its_partition_was_revoked_is_neither_fed_nor_committed(
    clickhouse_backend: Backend,
) -> None:
    """The rebalance revokes partition 1 while its flush is being written; the flush finishes after.
    Before: the finished flush put partition 1 back into the backlog, and a commit retried after the
    rebalance moved its new owner's committed offset (tests/test_scale_out.py caught it)."""
    consumer, offsets = consumer_on(clickhouse_backend, rollup_wait_ms=60_000)
    add(consumer, polled(0, range(0, 10), 0))
    add(consumer, polled(1, range(0, 10), 100))
    consumer._start_flush()
    consumer.on_revoked([TopicPartition(TOPIC, 1)])  # waits for the write in flight
    offsets.owned.discard(TopicPartition(TOPIC, 1))
    consumer._finish_flush()
    assert consumer._backlog.partitions() == {TopicPartition(TOPIC, 0)}
    assert consumer._rewind == {TopicPartition(TOPIC, 1): 0}
    consumer.flush(final=True)
    assert stored(clickhouse_backend)["hour_requests"] == 10
    assert offsets.commits == [{0: 10}]


def test_a_paused_consumer_polls_until_its_retry_not_every_millisecond(clickhouse_backend: Backend) -> None:
    """Through a storage outage the loop polled every millisecond for a flush it could not start."""
    now = [100.0]
    consumer = Consumer(
        ConsumerSettings(topic=TOPIC, batch_wait_ms=100), clickhouse_backend, clock=lambda: now[0]
    )
    consumer.planner.add(TopicPartition(TOPIC, 0), polled(0, range(0, 10), 0), now[0])
    now[0] = 101.0  # the flush is due
    assert consumer._poll_ms(0.1) == 1
    consumer._paused, consumer._retry_at = True, 103.0
    assert consumer._poll_ms(0.1) == 200
    now[0] = 102.95
    assert consumer._poll_ms(0.1) == 50
