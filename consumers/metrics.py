"""Counters, gauges and histograms the consumer exposes at /metrics, kept by prometheus_client.

One consumer is one process, so a plain registry serves: events are counted as they happen (Counters,
Histograms), and what the consumer holds as state (readiness, buffered events, lag, assignment repairs)
is read at scrape time (`_State`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Seconds per insert: a healthy local ClickHouse answers in milliseconds, a struggling one in seconds.
INSERT_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Events per batch, up to well past the default --batch-size.
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)

# A `_created` sample per series doubles the text and no dashboard reads it.
prometheus_client.disable_created_metrics()


@dataclass
class Metrics:
    storage_ready: bool = False
    kafka_ready: bool = False
    paused: bool = False  # the consumer stopped consuming to retry a failed write, commit or dead letter
    last_error: str = ""
    buffered: int = 0  # consumed, not yet written
    rollup_pending: int = 0  # written to the raw table, not yet to the hour/day rollups
    partitions: list[int] = field(default_factory=list)  # assigned to this consumer
    assignment_repairs: int = 0  # stalled assignments repaired (consumers/assignment.py)
    # Messages not yet consumed, by (topic, partition); replaced whole, so a scrape sees one generation.
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry, repr=False)

    def __post_init__(self) -> None:
        def counter(name: str, help_text: str) -> Counter:
            return Counter(f"cohere_gateway_consumer_{name}", help_text, registry=self.registry)

        self.events_inserted = counter("events_inserted", "Events inserted into the raw table.")
        self.batches_inserted = counter(
            "batches",
            "Inserts into the raw table: one per flush, more when ClickHouse refused rows and it was split.",
        )
        self.dead_letters = counter("dead_letters", "Messages sent to the dead-letter topic.")
        self.duplicates = counter(
            "duplicates", "Events not inserted because their event_id was stored already (counted once)."
        )
        self.insert_splits = counter(
            "insert_splits",
            "Inserts refused as data and split in two (a row refused alone is a dead letter).",
        )
        self.insert_failures = counter("insert_failures", "Failed attempts to write to ClickHouse.")
        self.commits = counter("commits", "Offset commits.")
        self.commit_failures = counter("commit_failures", "Failed offset commits.")
        self.insert_seconds = Histogram(
            "cohere_gateway_consumer_insert_seconds",
            "Insert latency.",
            buckets=INSERT_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.rollup_inserts = counter(
            "rollup_inserts",
            "Inserts that fed the hour/day rollups: their own (table rollup_feed, one per --rollup-wait-ms "
            "at most), and large flushes' one insert into both (events_with_rollups).",
        )
        self.rollup_events = counter("rollup_events", "Events fed to the hour/day rollups.")
        self.rollup_seconds = counter("rollup_seconds", "Time spent in inserts into the hour/day rollups.")
        self.batch_sizes = Histogram(
            "cohere_gateway_consumer_batch_size",
            "Events per batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_State(self))

    def record_insert(self, rows: int, seconds: float) -> None:
        self.events_inserted.inc(rows)
        self.batches_inserted.inc()
        self.insert_seconds.observe(seconds)
        self.batch_sizes.observe(rows)

    def record_rollup(self, rows: int, seconds: float) -> None:
        self.rollup_inserts.inc()
        self.rollup_events.inc(rows)
        self.rollup_seconds.inc(seconds)

    @property
    def ready(self) -> bool:
        return self.storage_ready and self.kafka_ready and not self.paused

    def render(self) -> str:
        return generate_latest(self.registry).decode()


class _State:
    """What the consumer holds as state, read when scraped (a prometheus_client custom collector)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        yield CounterMetricFamily(
            "cohere_gateway_consumer_assignment_repairs",
            "Times the group's assignment left partitions unread and was repaired (refresh, rejoin).",
            value=metrics.assignment_repairs,
        )
        yield GaugeMetricFamily(
            "cohere_gateway_consumer_ready",
            "1 when Kafka and ClickHouse both answer.",
            value=int(metrics.ready),
        )
        yield GaugeMetricFamily(
            "cohere_gateway_consumer_buffered", "Events consumed and not yet written.", value=metrics.buffered
        )
        yield GaugeMetricFamily(
            "cohere_gateway_consumer_rollup_pending",
            "Events in the raw table not yet in the hour/day rollups (their offsets are not committed).",
            value=metrics.rollup_pending,
        )
        lag = GaugeMetricFamily(
            "cohere_gateway_consumer_lag",
            "Messages in the partition not yet consumed.",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in sorted(metrics.lag.items()):
            lag.add_metric([topic, str(partition)], value)
        yield lag
