"""The consume loop: Kafka consumer group -> batched, deduplicated inserts -> offset commit.

Delivery is at-least-once with no duplicates visible to queries:
- offsets are committed only after the batch is in ClickHouse, raw table and rollups (and its dead
  letters are acknowledged);
- each batch is one partition's offset range, recorded before the insert (the intent log), so a restart
  re-cuts the same ranges;
- a flush inserts every partition's batch in one insert whose deduplication token names its ranges, so a
  retry of the same flush is a no-op for the raw table and its materialized views, and the ids already
  stored are left out of every insert (consumers/dedup.py), so a re-cut range inserted in another
  combination is not counted twice either;
- the hour and day rollups are fed by a second insert (table rollup_feed, migration 0016) that serves the
  flushes of up to --rollup-wait-ms, with its own id lookup (table rollup_ids): a restart between the two
  inserts reads the batches again, finds their raw rows stored and feeds the rollups what they lack.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from cohere_gateway.consumers import dedup, schema
from cohere_gateway.consumers.assignment import Watch
from cohere_gateway.consumers.backends import Backend, BackendRejected, BackendUnavailable
from cohere_gateway.consumers.batching import Backlog, Batch, Planner, Range
from cohere_gateway.consumers.dead_letters import dead_letter
from cohere_gateway.consumers.metrics import Metrics
from cohere_gateway.consumers.rows import EVENT_COLUMNS, Rejected, Row, outside_retention, to_row
from cohere_gateway.consumers.write_sql import sql as write_sql
from cohere_gateway.kafka_topics import ensure_topic
from cohere_gateway.settings import ConsumerSettings

log = logging.getLogger(__name__)

# Test hook: the consumer kills itself with SIGKILL right after its Nth insert, before committing.
CRASH_AFTER_INSERTS_ENV = "COHERE_GATEWAY_TEST_CRASH_AFTER_INSERTS"

COMMIT_TIMEOUT_MS = 10_000
# ClickHouse's max_partitions_per_insert_block (default 100); `events` is partitioned by day.
MAX_PARTITIONS_PER_INSERT = 100
SESSION_TIMEOUT_MS = 10_000
# From this many rows a flush feeds the rollups in its own insert. Measured (embedded engine, 2 cores):
# the rollups' views add 30-40 ms to an insert whatever its size, and a second insert of the same rows
# costs about 12 us a row more than one insert feeding both (10k rows: 383 against 262 ms); so from about
# 3,000 rows one insert is cheaper, and a flush that large is no longer a latency-bound one. A whole
# --batch-size below that counts as large too (the consumer is behind).
TOGETHER_ROWS = 3_000
REVOKE_WAIT_S = SESSION_TIMEOUT_MS / 2000


class Backoff:
    def __init__(self, initial: float = 0.2, maximum: float = 10.0) -> None:
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.maximum, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.initial


class Converted(NamedTuple):
    """A polled record with its raw-table row, or why it is a dead letter."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    row: Row | Rejected
    record: Any  # as polled, for the dead-letter topic


class Written(NamedTuple):
    refused: list[tuple[Any, str]]  # (record, reason): what ClickHouse refused as data, to dead-letter
    pending: list[Converted]  # the flush's rows the raw table holds now and the rollups may lack


@dataclass
class Inflight:
    """A flush whose inserts run on the writer thread; committed by the loop once written."""

    batches: list[Batch]
    rejected: list[tuple[Any, str]]  # (record, reason): dead letters, sent once the inserts succeeded
    written: Future[Written]
    rollup: bool  # the write feeds the rollups the backlog's rows and this flush's
    # Partitions revoked while it was written (on_revoked): read again from their last commit, so what
    # this flush holds of them is neither fed to the rollups nor committed here.
    revoked: set[tuple[str, int]] = field(default_factory=set)


def dlq_topic(cfg: ConsumerSettings) -> str:
    return cfg.dlq_topic or f"{cfg.topic}.dlq"


class Consumer:
    def __init__(
        self,
        cfg: ConsumerSettings,
        backend: Backend,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.planner = Planner()
        self._backlog = Backlog()
        self._last_arrival = clock()  # when a poll last returned records
        self._revocations = 0  # rebalances that took partitions from this consumer (on_revoked)
        self._kafka: Any = None
        self._watch: Watch | None = None
        self._producer: Any = None
        self._rewind: dict[Any, int] = {}
        self._paused = False
        self._retry_at = 0.0
        self._backoff = Backoff()
        self._inserts = 0
        self._inflight: Inflight | None = None
        self._held: dict[Any, list[Any]] = {}  # polled while a flush is in flight
        self._held_since = 0.0  # when the first of them was polled
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="clickhouse-writer")
        crash = os.environ.get(CRASH_AFTER_INSERTS_ENV)
        self._crash_after = int(crash) if crash else None

    # -- start-up -------------------------------------------------------------------------------------

    def prepare_storage(self, stop: threading.Event) -> bool:
        """Apply migrations and retention, retrying with backoff while ClickHouse is unavailable."""
        backoff = Backoff(maximum=30.0)
        while not stop.is_set():
            try:
                schema.migrate(self.backend)
                schema.apply_retention(
                    self.backend, self.cfg.retention_days, self.cfg.aggregate_retention_days
                )
                self.metrics.storage_ready = True
                return True
            except BackendUnavailable as exc:
                self._note_error(f"storage not ready: {exc}")
                stop.wait(backoff.next())
        return False

    def _connect_kafka(self, stop: threading.Event) -> Any:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        backoff = Backoff(maximum=10.0)
        # Unique in the group (pids repeat across containers): the assignment watch finds this member
        # in the broker's group description by it.
        client_id = f"cohere-gateway-consumer-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        while not stop.is_set():
            try:
                # Before the first event, so the topic gets --partitions, not the broker's default.
                ensure_topic(self.cfg.kafka_bootstrap, self.cfg.topic, self.cfg.partitions)
                consumer = KafkaConsumer(
                    bootstrap_servers=self.cfg.kafka_bootstrap.split(","),
                    group_id=self.cfg.group_id,
                    client_id=client_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    max_poll_records=max(1, min(self.cfg.batch_size, 10_000)),
                    # Fewer, larger fetches while draining a backlog (about 10 % less CPU per event
                    # than kafka-python's 1 MiB per partition); bounded at 32 MiB per fetch.
                    max_partition_fetch_bytes=4 << 20,
                    fetch_max_bytes=32 << 20,
                    # kafka-python 3 defaults to 45 s: a consumer that died without leaving the group
                    # would hold its partitions, and stall every rebalance, that long.
                    session_timeout_ms=SESSION_TIMEOUT_MS,
                    heartbeat_interval_ms=3_000,
                )
            except KafkaError as exc:
                self._note_error(f"Kafka at {self.cfg.kafka_bootstrap} not reachable: {exc}; retrying")
                stop.wait(backoff.next())
                continue
            consumer.subscribe([self.cfg.topic], listener=_rebalance_listener(self))
            self._watch = Watch(
                self.cfg.kafka_bootstrap, self.cfg.topic, self.cfg.group_id, client_id, note=self._note_error
            )
            self._watch.start()
            self.metrics.kafka_ready = True
            return consumer
        return None

    def _dlq_producer(self) -> Any:
        if self._producer is None:
            from kafka import KafkaProducer

            self._ensure_dlq_topic()
            self._producer = KafkaProducer(
                bootstrap_servers=self.cfg.kafka_bootstrap.split(","), acks="all", linger_ms=5
            )
        return self._producer

    def _ensure_dlq_topic(self) -> None:
        """Create the dead-letter topic if missing (kafka-python's producer does not auto-create)."""
        ensure_topic(self.cfg.kafka_bootstrap, dlq_topic(self.cfg), 1)

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        from kafka.errors import KafkaError

        if not self.prepare_storage(stop):
            return
        self._kafka = self._connect_kafka(stop)
        if self._kafka is None:
            return
        wait_s = self.cfg.batch_wait_ms / 1000
        last_lag = 0.0
        log.info(
            "consuming %s as group %s into %s", self.cfg.topic, self.cfg.group_id, self.backend.description
        )
        try:
            while not stop.is_set():
                try:
                    polled = self._kafka.poll(
                        timeout_ms=self._poll_ms(wait_s), max_records=self.cfg.batch_size
                    )
                    self._check_kafka()
                    if self._watch is not None:
                        replace = self._watch.tick(self._kafka)
                        self.metrics.assignment_repairs = self._watch.repairs
                        if replace:
                            if self._inflight is not None:  # committed by the consumer that read it
                                self._guarded(self._finish_flush)
                            if self._backlog.batches:  # its rollups and commit, by the same
                                self._guarded(lambda: self.flush(final=True))
                            if not self._replace_member(stop):
                                return
                except KafkaError as exc:
                    self.metrics.kafka_ready = False
                    self._note_error(f"Kafka poll failed: {exc}; retrying")
                    stop.wait(self._backoff.next())
                    continue
                now = self.clock()
                for tp, records in polled.items():
                    self._take(tp, records, now)
                if polled:
                    self._last_arrival = now
                if self._inflight is not None and (
                    self._inflight.written.done() or sum(map(len, self._held.values())) >= self.cfg.batch_size
                ):
                    self._guarded(self._finish_flush)
                self.metrics.buffered = self.planner.buffered() + sum(map(len, self._held.values()))
                self.metrics.rollup_pending = len(self._backlog.rows)
                if now - last_lag >= 1.0:
                    self._update_lag()
                    last_lag = now
                if self._inflight is not None:
                    continue
                if self._paused:
                    if now >= self._retry_at:
                        self._guarded(self.flush)
                elif self.planner.due(now, self.cfg.batch_size, wait_s) or self._rollups_due(now):
                    self._guarded(self._start_flush)
            # SIGTERM: write and commit what is in hand; if storage is down it stays uncommitted.
            if self._inflight is not None:
                self._guarded(self._finish_flush)
            if not self._paused or self.clock() >= self._retry_at:
                self._guarded(lambda: self.flush(final=True))
        finally:
            self._close()

    def _replace_member(self, stop: threading.Event) -> bool:
        """Leave the group and join it again as a new member (the assignment watch asks when rejoining
        could not end a stall). Only asked while this consumer reads nothing, so it holds no records.
        False: stopped before Kafka could be reached again."""
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        try:
            self._kafka.close(autocommit=False)
        except Exception as exc:  # one stuck outside its group may not close cleanly: replace it anyway
            log.warning("closing the stalled Kafka consumer: %s", exc)
        self._backlog = Backlog()  # uncommitted: the new member reads it again from the last commit
        self._kafka = self._connect_kafka(stop)
        return self._kafka is not None

    def _take(self, tp: Any, records: list[Any], now: float) -> None:
        """Convert records as they arrive, so conversion overlaps the writer thread's insert. Records
        polled while a flush is in flight wait beside the planner, so the next cut cannot include the
        batches being written."""
        if not records:
            return
        wall = datetime.now(UTC)
        converted = []
        for r in records:
            row = to_row(r.value, r.partition, r.offset)
            if isinstance(row, Row) and (
                why := outside_retention(row.start_time, wall, self.cfg.retention_days)
            ):
                row = Rejected(f"not storable: {why}")
            converted.append(Converted(r.topic, r.partition, r.offset, r.timestamp, row, r))
        if self._inflight is None:
            self.planner.add(tp, converted, now)
        else:
            if not self._held:
                self._held_since = now
            self._held.setdefault(tp, []).extend(converted)

    def _release_held(self) -> None:
        for tp, records in self._held.items():
            self.planner.add(tp, records, self._held_since)
        self._held.clear()

    def _poll_ms(self, wait_s: float) -> int:
        """Block in poll at most until the next flush is due, or, while one is being written, for
        10 ms at a time (its end is seen only between polls), so a flush is neither late by a poll that
        found nothing nor left waiting behind one that has landed. Before: up to 200 ms late each,
        against a 0.4 s produce-to-visible goal. Paused, nothing is due before the retry: polling
        every millisecond for a due flush it may not start only burned a core through an outage."""
        if self._inflight is not None:
            return 10
        now = self.clock()
        if self._paused:
            return max(10, min(200, math.ceil((self._retry_at - now) * 1000)))
        lefts = [
            left
            for left in (self.planner.wait_left(now, wait_s), self._rollups_wait_left(now))
            if left is not None
        ]
        if not lefts:
            return max(10, min(200, self.cfg.batch_wait_ms))
        return max(1, min(200, math.ceil(min(lefts) * 1000)))

    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run one flush step; on failure pause and retry later, having committed nothing unwritten."""
        from kafka.errors import CommitFailedError, KafkaError

        try:
            step()
        except BackendUnavailable as exc:
            self.metrics.insert_failures.inc()
            self.metrics.storage_ready = False
            self._pause(f"ClickHouse unavailable, nothing committed: {exc}")
            return False
        except CommitFailedError as exc:
            # The group rebalanced under us; whoever owns the partitions now re-reads from the last
            # commit and re-cuts the same ranges from the intent log, so dropping is safe.
            self.metrics.commit_failures.inc()
            self._note_error(f"commit rejected after a rebalance, dropping uncommitted batches: {exc}")
            self._drop_all()
            return False
        except KafkaError as exc:
            self.metrics.commit_failures.inc()
            self.metrics.kafka_ready = False
            self._pause(f"Kafka unavailable while committing or writing dead letters: {exc}")
            return False
        if self._paused and self._inflight is None:
            log.info("storage and Kafka answer again; resuming")
            self._kafka.resume(*self._kafka.assignment())
            self._paused = self.metrics.paused = False
        self._backoff.reset()
        self.metrics.storage_ready = True
        self.metrics.kafka_ready = True
        return True

    def _pause(self, reason: str) -> None:
        if not self.metrics.kafka_ready and "Kafka" not in reason:
            # both are down: the storage retry must not hide that Kafka is gone as well
            reason += f"; Kafka at {self.cfg.kafka_bootstrap} is unavailable too"
        self._note_error(reason)
        if self._kafka is not None:
            self._kafka.pause(*self._kafka.assignment())
        self._paused = self.metrics.paused = True
        self._retry_at = self.clock() + self._backoff.next()

    def _drop_all(self) -> None:
        from kafka.structs import TopicPartition

        now = self.clock()
        for key in set(self.planner.partitions()) | self._backlog.partitions():
            tp = TopicPartition(key.topic, key.partition)  # seek() takes kafka-python's type alone
            first = self._first_uncommitted_offset(tp)
            self.planner.drop(tp, now)
            self._backlog.drop(tp)
            if first is not None and tp in self._kafka.assignment():
                self._kafka.seek(tp, first)

    def _first_uncommitted_offset(self, tp: Any) -> int | None:
        """Where reading `tp` again must start to write everything this consumer has not committed:
        the backlog, the flush in flight (between its batches leaving the planner and joining the
        backlog) and what is buffered."""
        firsts = [
            o for o in (self._backlog.first_offset(tp), self._first_buffered_offset(tp)) if o is not None
        ]
        if (inflight := self._inflight) is not None:
            firsts += [
                b.range.first_offset
                for b in inflight.batches
                if (b.range.topic, b.range.partition) == tuple(tp)
            ]
        return min(firsts) if firsts else None

    def _first_buffered_offset(self, tp: Any) -> int | None:
        first = self.planner.first_offset(tp)
        if first is None and self._held.get(tp):
            return int(self._held[tp][0].offset)
        return first

    # -- one flush ------------------------------------------------------------------------------------

    def flush(self, final: bool = False) -> None:
        """Insert every buffered partition's next batch (and, when due or `final`, feed the rollups),
        then commit what both hold. Raises on failure, having committed nothing that was not written."""
        self._start_flush(final)
        if self._inflight is not None:
            self._finish_flush()
        else:
            self._commit_settled()

    def _rollups_wait_left(self, now: float) -> float | None:
        """Seconds until the rollups' insert is due (0 when it is), None when they lack nothing: when the
        backlog's oldest row has waited --rollup-wait-ms, or nothing has arrived for twice the batch wait
        (the topic is drained: waiting longer would only hold the last rows back)."""
        left = self._backlog.wait_left(now, self.cfg.rollup_wait_ms / 1000)
        if left is None:
            return None
        return max(0.0, min(left, self._last_arrival + 2 * self.cfg.batch_wait_ms / 1000 - now))

    def _rollups_due(self, now: float) -> bool:
        return self._rollups_wait_left(now) == 0.0 or len(self._backlog.rows) >= self.cfg.batch_size

    def _start_flush(self, final: bool = False) -> None:
        """Cut each partition's next batch, record the ranges, and hand the inserts to the writer
        thread: the engine releases the GIL while it parses and writes, so polling goes on meanwhile.
        The rollups are fed in the same write when they are due (or `final`)."""
        revocations = self._revocations
        batches: list[Batch] = []
        for tp in self.planner.partitions():
            if not self.planner.knows_intents(tp):
                self.planner.load_intents(tp, self._load_intents(tp))
            batch = self.planner.cut(tp)
            if batch is None and self.planner.buffered(tp):
                batch = self.planner.cut(tp, position=self._kafka.position(tp))
            if batch is not None:
                batches.append(batch)
        backlog = self._backlog
        rollup = final or self.cfg.rollup_wait_ms == 0 or self._rollups_due(self.clock())
        if not batches and not (rollup and backlog.rows):
            return

        unrecorded = [b.range for b in batches if not self.planner.is_recorded(b.range)]
        for rng in unrecorded:
            self.planner.remember(rng)  # a retry must cut this range again, written or not
        if unrecorded:
            self.backend.insert_json_rows(
                "consumer_batches", b"".join(orjson.dumps(r.as_row()) + b"\n" for r in unrecorded)
            )
            for rng in unrecorded:
                self.planner.mark_recorded(rng)

        rejected = []
        storable: list[Converted] = []
        for batch in batches:
            for polled in batch.records:
                if isinstance(polled.row, Rejected):
                    rejected.append((polled.record, polled.row.reason))
                else:
                    storable.append(polled)
        token = dedup.flush_token([b.range.dedup_token for b in batches])
        # A large flush (a backlog being read) or no rollup wait: the raw table and the rollups in one
        # insert, so the rows are parsed once.
        together = self.cfg.rollup_wait_ms == 0 or len(storable) >= min(self.cfg.batch_size, TOGETHER_ROWS)
        feed = None
        if rollup:
            # Named by every range whose rows it feeds: a retry after a failure feeds the same rows.
            feed_token = "rollup:" + dedup.flush_token(
                [b.range.dedup_token for b in backlog.batches + batches]
            )
            feed = (feed_token, list(backlog.rows))
        if self._revocations != revocations:
            # A rebalance (on kafka-python's IO thread) took partitions while this flush was being cut:
            # it may hold rows their next owner reads again. Cut again from what is left.
            return
        written = self._writer.submit(self._write, token, storable, together, feed)
        self._inflight = Inflight(batches, rejected, written, rollup)

    def _write(
        self,
        token: str,
        polled: list[Converted],
        together: bool,
        feed: tuple[str, list[Converted]] | None,
    ) -> Written:
        """On the writer thread, after the previous flush was written: the raw insert (`together`: raw
        table and rollups in one), then, when `feed` is given (its token and the backlog's rows), the
        rollups' insert of the backlog's rows and this flush's the raw insert did not feed. Each looks
        the ids up in its own id table and leaves out the rows it holds (and repeats within the flush),
        so no materialized view counts an event twice (consumers/dedup.py). Every partition's rows go in
        one insert: each insert writes a part per materialized view whatever its size, so one per
        partition made a flush's cost grow with the partitions it touched."""
        records = {p.row.event_id: p.record for p in polled}  # type: ignore[union-attr]
        table, record = ("events", self.metrics.record_insert)
        if together:
            table, record = ("events_with_rollups", self._record_insert_with_rollups)
        inserted, refused = self._insert_new("event_ids", table, token, polled, record)
        dead = [(records[i], f"ClickHouse refused the event: {why}") for i, why in refused.items()]
        # Rows found stored were written by an earlier attempt, maybe without their rollups.
        pending = [p for p in polled if p.row.event_id not in refused]  # type: ignore[union-attr]
        if together:
            pending = [p for p in pending if p.row.event_id not in inserted]  # type: ignore[union-attr]
        if feed is None:
            return Written(dead, pending)
        feed_token, backlog = feed
        records |= {p.row.event_id: p.record for p in backlog}  # type: ignore[union-attr]
        _, refused = self._insert_new(
            "rollup_ids", "rollup_feed", feed_token, backlog + pending, self.metrics.record_rollup
        )
        dead += [
            (records[i], f"ClickHouse refused the event's rollups (its raw row is stored): {why}")
            for i, why in refused.items()
        ]
        return Written(dead, [])

    def _record_insert_with_rollups(self, rows: int, seconds: float) -> None:
        self.metrics.record_insert(rows, seconds)
        self.metrics.record_rollup(rows, seconds)

    def _insert_new(
        self,
        ids_table: str,
        table: str,
        token: str,
        polled: list[Converted],
        record: Callable[[int, float], None],
    ) -> tuple[set[str], dict[str, str]]:
        """Insert into `table` the rows whose id `ids_table` does not hold yet, each id once. Returns the
        ids inserted, and those ClickHouse refused as data with its message."""
        rows: list[Row] = [p.row for p in polled]  # type: ignore[misc]
        seen = dedup.stored_ids(self.backend, [row.event_id for row in rows], ids_table)
        kept, dropped = dedup.keep_first(rows, seen)
        if ids_table == "event_ids":
            self.metrics.duplicates.inc(dropped)
        if not kept:
            return set(), {}
        refused = self._insert(table, token, kept, len(rows), record)
        return {row.event_id for row in kept} - refused.keys(), refused

    def _insert(
        self, table: str, token: str, rows: list[Row], total: int, record: Callable[[int, float], None]
    ) -> dict[str, str]:
        """Insert `rows`; when ClickHouse refuses the data itself, insert each half on its own, down to
        the single rows it refuses, returned with its message (dead letters): a bad row (or a replay
        spanning more partitions than one insert may touch) never stalls its partition. Outages raise."""
        days = sorted({row.start_time.astimezone(UTC).date() for row in rows})
        if len(days) > MAX_PARTITIONS_PER_INSERT:
            # Split by day before ClickHouse sees it: chdb's streaming insert drops such an insert
            # without an error (chdb 4.4: max_partitions_per_insert_block), so it must never be sent.
            self.metrics.insert_splits.inc()
            refused: dict[str, str] = {}
            for first in range(0, len(days), MAX_PARTITIONS_PER_INSERT):
                chunk_days = set(days[first : first + MAX_PARTITIONS_PER_INSERT])
                chunk = [row for row in rows if row.start_time.astimezone(UTC).date() in chunk_days]
                refused |= self._insert(table, token, chunk, total, record)
            return refused
        started = time.perf_counter()
        try:
            self.backend.insert_json_rows(
                table, b"".join(row.line for row in rows), dedup.token_for(token, rows, total), EVENT_COLUMNS
            )
        except BackendRejected as exc:
            if len(rows) == 1:
                log.warning("ClickHouse refused event %s (%s): %s", rows[0].event_id, table, exc)
                return {rows[0].event_id: str(exc)[:1900]}
            self.metrics.insert_splits.inc()
            half = len(rows) // 2
            # Each half is named by its ids (token_for with total > len), so a retry re-inserts the same.
            return self._insert(table, token, rows[:half], total, record) | self._insert(
                table, token, rows[half:], total, record
            )
        record(len(rows), time.perf_counter() - started)
        return {}

    def _finish_flush(self) -> None:
        """Wait for the flush in flight, then commit what the raw table and the rollups both hold.
        Records held meanwhile join the planner either way: after a failure the batches are cut again
        from the planner, in front of them."""
        inflight = self._inflight
        assert inflight is not None
        try:
            written = inflight.written.result()
            self._inserts += 1
            if self._crash_after is not None and self._inserts >= self._crash_after:
                log.warning("test hook %s: killing myself between insert and commit", CRASH_AFTER_INSERTS_ENV)
                os.kill(os.getpid(), signal.SIGKILL)

            now = self.clock()
            for batch in inflight.batches:
                self.planner.done(batch, now)
            revoked = inflight.revoked
            self._backlog.add(
                [b for b in inflight.batches if (b.range.topic, b.range.partition) not in revoked],
                [p for p in written.pending if (p.topic, p.partition) not in revoked],
                now,
            )
            # Dead letters go out with the commit of their batch, after every insert succeeded: a flush
            # that fails on storage is retried, and sending them before would send them once per attempt.
            self._backlog.dead += [
                (record, reason)
                for record, reason in inflight.rejected + written.refused
                if (record.topic, record.partition) not in revoked
            ]
            if inflight.rollup:
                self._backlog.rolled_up()
            self._commit_settled()
        finally:
            self._inflight = None
            self._release_held()

    def _commit_settled(self) -> None:
        """Commit the batches the rollups hold as well as the raw table (none while any row waits)."""
        from kafka.structs import OffsetAndMetadata, TopicPartition

        if self._backlog.rows or not self._backlog.batches:
            return
        owned = set(self._kafka.assignment())
        for tp in self._backlog.partitions() - owned:
            # Not ours since it was written (a rebalance while a commit was retried): committing its
            # offset could move its new owner's back or past what that owner has not written.
            log.info("not committing %s[%d]: no longer assigned to this consumer", tp.topic, tp.partition)
            self._backlog.drop(tp)
        if not self._backlog.batches:
            return
        if self._backlog.dead:
            sent = [self._send_dead_letter(record, reason) for record, reason in self._backlog.dead]
            self._dlq_producer().flush(timeout=30)
            for future in sent:
                future.get(timeout=0)  # raises the send's KafkaError: then we must not commit
            self.metrics.dead_letters.inc(len(sent))
            self._backlog.dead = []
        self._kafka.commit(
            {
                TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(offset, "", -1)
                for tp, offset in self._backlog.offsets().items()
            },
            # Bounded, so a commit while Kafka is down fails over to pause-and-retry instead of
            # blocking the loop (and SIGTERM) for kafka-python's default 30 s.
            timeout_ms=COMMIT_TIMEOUT_MS,
        )
        self.metrics.commits.inc()
        self._backlog.batches = []

    def _send_dead_letter(self, record: Any, reason: str) -> Any:
        log.warning("dead letter %s[%d]@%d: %s", record.topic, record.partition, record.offset, reason[:300])
        value, headers = dead_letter(record, reason)
        return self._dlq_producer().send(dlq_topic(self.cfg), value=value, key=record.key, headers=headers)

    def _load_intents(self, tp: Any) -> list[Range]:
        from_offset = self._first_buffered_offset(tp) or 0
        rows = self.backend.query(
            write_sql("load_intents"),
            {"topic": tp.topic, "partition": tp.partition, "from_offset": from_offset},
        )
        return [
            Range(
                r["topic"],
                int(r["partition"]),
                int(r["first_offset"]),
                int(r["last_offset"]),
                int(r["first_timestamp_ms"]),
            )
            for r in rows
        ]

    # -- rebalance ------------------------------------------------------------------------------------

    def on_revoked(self, revoked: list[Any]) -> None:
        """Forget what we hold for partitions we are losing, buffered or waiting for the rollups: it is
        uncommitted, so the next owner reads it again (and its id lookups find what we wrote). No flush
        here: kafka-python 3 runs this listener on its IO thread, where a commit (or any blocking
        consumer call) raises "Cannot block on net.run() from the IO thread", and an insert without its
        commit would put the batch in this consumer's store and, in embedded mode, the next owner's
        too."""
        self._revocations += 1
        self._await_inflight_write(revoked)
        inflight = self._inflight
        if inflight is not None:
            inflight.revoked |= {(tp.topic, tp.partition) for tp in revoked}
        now = self.clock()
        for tp in revoked:
            first = self._first_uncommitted_offset(tp)
            if first is not None:
                self._rewind[tp] = first
            self.planner.drop(tp, now)
            self._backlog.drop(tp)
            self._held.pop(tp, None)
        self.metrics.partitions = []

    def _await_inflight_write(self, revoked: list[Any]) -> None:
        """Hold the rebalance until a flush being written for a revoked partition is in storage: the
        next owner cuts the same range again, and only a write that has landed is found by its duplicate
        lookup (the flush's token names its other partitions too, so the next owner's insert of this one
        range carries another). Waiting here delays this member's rejoin, hence the next owner's first
        fetch. Bounded below the session timeout: longer, and the group would evict this member anyway."""
        inflight = self._inflight
        writing = {(b.range.topic, b.range.partition) for b in inflight.batches} if inflight else set()
        if inflight is not None and inflight.rollup:
            writing |= self._backlog.partitions()
        if not writing & {(tp.topic, tp.partition) for tp in revoked}:
            return
        assert inflight is not None
        _, pending = futures_wait([inflight.written], timeout=REVOKE_WAIT_S)
        if pending:
            log.warning(
                "a flush for revoked partitions was still being written after %.0f s; the next owner "
                "may insert its events again before this write lands",
                REVOKE_WAIT_S,
            )

    def on_assigned(self, assigned: list[Any]) -> None:
        # Positions of partitions we keep survive a rebalance; rewind those whose records we dropped.
        for tp in assigned:
            if tp in self._rewind:
                self._kafka.seek(tp, self._rewind.pop(tp))
            if self._paused:
                self._kafka.pause(tp)
        self._rewind.clear()
        self.metrics.partitions = sorted(tp.partition for tp in self._kafka.assignment())
        log.info("assigned partitions %s", sorted(tp.partition for tp in assigned))

    # -- housekeeping ---------------------------------------------------------------------------------

    def _update_lag(self) -> None:
        lag = {}
        for tp in self._kafka.assignment():
            high = self._kafka.highwater(tp)
            if high is None:
                continue
            try:
                position = self._kafka.position(tp, timeout_ms=100)
            except Exception:
                continue
            if position is not None:
                held = len(self._held.get(tp, ()))
                lag[(tp.topic, tp.partition)] = max(0, high - position) + self.planner.buffered(tp) + held
        self.metrics.lag = lag

    def _check_kafka(self) -> None:
        """kafka-python's poll() does not raise while the broker is gone: it reconnects in the background
        and returns nothing. Readiness follows the group coordinator's connection instead, which the
        client drops as soon as the broker stops answering."""
        coordinator = getattr(self._kafka, "_coordinator", None)
        up = coordinator is None or not coordinator.coordinator_unknown()
        if up != self.metrics.kafka_ready:
            if up:
                log.info("Kafka at %s answers again", self.cfg.kafka_bootstrap)
            else:
                self._note_error(
                    f"Kafka at {self.cfg.kafka_bootstrap} unavailable (lost the group coordinator); "
                    "waiting for it to return"
                )
        self.metrics.kafka_ready = up

    def _note_error(self, message: str) -> None:
        log.warning("%s", message)
        self.metrics.last_error = message

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        self._writer.shutdown(wait=True)
        if self._producer is not None:
            self._producer.close(timeout=5)
        if self._kafka is not None:
            self._kafka.close(autocommit=False)


def _rebalance_listener(consumer: Consumer) -> Any:
    from kafka import ConsumerRebalanceListener

    class Rebalance(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            consumer.on_revoked(list(revoked))

        def on_partitions_assigned(self, assigned: Any) -> None:
            consumer.on_assigned(list(assigned))

    return Rebalance()
