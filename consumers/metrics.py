"""Counters and gauges the consumer exposes at /metrics (Prometheus text format 0.0.4)."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Metrics:
    events_inserted: int = 0
    batches_inserted: int = 0
    dead_letters: int = 0
    insert_splits: int = 0  # inserts ClickHouse refused as data, split in two and retried
    duplicates: int = 0  # events left out of an insert: their event_id was stored already
    insert_failures: int = 0
    commit_failures: int = 0
    commits: int = 0
    assignment_repairs: int = 0  # stalled assignments repaired (consumers/assignment.py)
    lag: dict[tuple[str, int], int] = field(default_factory=dict)
    last_batch_size: int = 0
    buffered: int = 0  # consumed, not yet written
    partitions: list[int] = field(default_factory=list)  # assigned to this consumer
    # Recent insert latencies and batch sizes, for quantiles without a metrics library.
    insert_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=512))
    storage_ready: bool = False
    kafka_ready: bool = False
    paused: bool = False  # the consumer stopped consuming to retry a failed write, commit or dead letter
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_insert(self, rows: int, seconds: float) -> None:
        with self.lock:
            self.events_inserted += rows
            self.batches_inserted += 1
            self.last_batch_size = rows
            self.insert_seconds.append(seconds)
            self.batch_sizes.append(rows)

    @property
    def ready(self) -> bool:
        return self.storage_ready and self.kafka_ready and not self.paused

    def render(self) -> str:
        with self.lock:
            lines = [
                *_metric(
                    "cohere_gateway_consumer_events_inserted_total",
                    "counter",
                    "Events inserted into the raw table.",
                    self.events_inserted,
                ),
                *_metric(
                    "cohere_gateway_consumer_batches_total",
                    "counter",
                    "Batches inserted (one per partition range).",
                    self.batches_inserted,
                ),
                *_metric(
                    "cohere_gateway_consumer_dead_letters_total",
                    "counter",
                    "Messages sent to the dead-letter topic.",
                    self.dead_letters,
                ),
                *_metric(
                    "cohere_gateway_consumer_assignment_repairs_total",
                    "counter",
                    "Times the group's assignment left partitions unread and was repaired (refresh, rejoin).",
                    self.assignment_repairs,
                ),
                *_metric(
                    "cohere_gateway_consumer_duplicates_total",
                    "counter",
                    "Events not inserted because their event_id was stored already (counted once).",
                    self.duplicates,
                ),
                *_metric(
                    "cohere_gateway_consumer_insert_splits_total",
                    "counter",
                    "Inserts refused as data and split in two (a row refused alone is a dead letter).",
                    self.insert_splits,
                ),
                *_metric(
                    "cohere_gateway_consumer_insert_failures_total",
                    "counter",
                    "Failed attempts to write to ClickHouse.",
                    self.insert_failures,
                ),
                *_metric("cohere_gateway_consumer_commits_total", "counter", "Offset commits.", self.commits),
                *_metric(
                    "cohere_gateway_consumer_commit_failures_total",
                    "counter",
                    "Failed offset commits.",
                    self.commit_failures,
                ),
                *_metric(
                    "cohere_gateway_consumer_ready",
                    "gauge",
                    "1 when Kafka and ClickHouse both answer.",
                    int(self.ready),
                ),
                *_metric(
                    "cohere_gateway_consumer_buffered",
                    "gauge",
                    "Events consumed and not yet written.",
                    self.buffered,
                ),
                "# HELP cohere_gateway_consumer_lag Messages in the partition not yet consumed.",
                "# TYPE cohere_gateway_consumer_lag gauge",
            ]
            for (topic, partition), lag in sorted(self.lag.items()):
                lines.append(f'cohere_gateway_consumer_lag{{topic="{topic}",partition="{partition}"}} {lag}')
            lines += _summary(
                "cohere_gateway_consumer_insert_seconds", "Insert latency.", list(self.insert_seconds)
            )
            lines += _summary(
                "cohere_gateway_consumer_batch_size", "Events per batch.", list(self.batch_sizes)
            )
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]


def _summary(name: str, help_text: str, values: list[float]) -> list[str]:
    lines = [f"# HELP {name} {help_text} (recent window)", f"# TYPE {name} summary"]
    ordered = sorted(values)
    for q in (0.5, 0.95, 0.99):
        value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0
        lines.append(f'{name}{{quantile="{q}"}} {value}')
    lines += [f"{name}_sum {sum(ordered)}", f"{name}_count {len(ordered)}"]
    return lines
