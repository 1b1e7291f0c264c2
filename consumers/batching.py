"""Which buffered messages go into the next insert, and when. Pure: no Kafka, no ClickHouse.

A batch is one partition's contiguous offset range; a flush inserts every partition's batch at once, under
a deduplication token derived from those ranges (consumers/dedup.py), so a retry of the same flush is a
no-op. For that the ranges must be cut the same way again: before inserting, the consumer records them
(the intent log, table `consumer_batches`); whoever consumes a partition next loads its intents and cuts
exactly the recorded ranges.

The hour and day rollups are fed by a second insert that serves several flushes (migration 0016): the
Backlog holds what the raw table has and the rollups lack, and the batches whose offsets wait for it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class TopicPartition(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True)
class Range:
    """An offset range of one partition; `first_timestamp_ms` (the first record's Kafka timestamp) tells
    a recorded range from the same offsets of a topic that was deleted and created again."""

    topic: str
    partition: int
    first_offset: int
    last_offset: int
    first_timestamp_ms: int

    @property
    def dedup_token(self) -> str:
        return (
            f"{self.topic}:{self.partition}:{self.first_offset}-{self.last_offset}:{self.first_timestamp_ms}"
        )

    def as_row(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "partition": self.partition,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
            "first_timestamp_ms": self.first_timestamp_ms,
        }


@dataclass(frozen=True)
class Batch:
    range: Range
    records: list[Any]
    replay: bool  # cut along a recorded intent (a previous attempt may have inserted it already)


class Planner:
    def __init__(self) -> None:
        self._buffers: dict[TopicPartition, list[Any]] = defaultdict(list)
        self._intents: dict[TopicPartition, dict[int, Range]] = {}
        self._recorded: set[tuple[str, int, int]] = set()  # intents known to be in the intent log
        self._oldest: float | None = None  # monotonic time the oldest buffered record arrived

    def add(self, tp: TopicPartition, records: list[Any], arrived: float) -> None:
        """Buffer `records`, polled at `arrived` (records held while a flush was in flight keep the time
        they were polled, so they do not wait a second batch wait)."""
        if not records:
            return
        self._buffers[tp].extend(records)
        if self._oldest is None or arrived < self._oldest:
            self._oldest = arrived

    def buffered(self, tp: TopicPartition | None = None) -> int:
        if tp is not None:
            return len(self._buffers.get(tp, ()))
        return sum(len(b) for b in self._buffers.values())

    def partitions(self) -> list[TopicPartition]:
        return [tp for tp, buf in self._buffers.items() if buf]

    def due(self, now: float, batch_size: int, wait_s: float) -> bool:
        """`batch_size` records are buffered (a flush is one insert of every partition's batch), or the
        oldest buffered record has waited `wait_s`."""
        return self.wait_left(now, wait_s) == 0.0 or self.buffered() >= batch_size

    def wait_left(self, now: float, wait_s: float) -> float | None:
        """Seconds until the oldest buffered record has waited `wait_s` (0 when it has), None when
        nothing is buffered: how long a poll may block before a flush is due."""
        if self._oldest is None:
            return None
        return max(0.0, self._oldest + wait_s - now)

    def knows_intents(self, tp: TopicPartition) -> bool:
        return tp in self._intents

    def load_intents(self, tp: TopicPartition, ranges: list[Range]) -> None:
        self._intents[tp] = {r.first_offset: r for r in ranges}
        for rng in ranges:
            self.mark_recorded(rng)

    def is_recorded(self, rng: Range) -> bool:
        return (rng.topic, rng.partition, rng.first_offset) in self._recorded

    def mark_recorded(self, rng: Range) -> None:
        self._recorded.add((rng.topic, rng.partition, rng.first_offset))

    def first_offset(self, tp: TopicPartition) -> int | None:
        buf = self._buffers.get(tp)
        return buf[0].offset if buf else None

    def remember(self, rng: Range) -> None:
        self._intents.setdefault(TopicPartition(rng.topic, rng.partition), {})[rng.first_offset] = rng

    def cut(self, tp: TopicPartition, position: int | None = None) -> Batch | None:
        """The next batch of `tp`: a recorded intent starting at the first buffered offset if there is
        one (None while its records are still arriving), else everything buffered."""
        buf = self._buffers.get(tp)
        if not buf:
            return None
        first = buf[0]
        intent = self._intents.get(tp, {}).get(first.offset)
        if intent is not None and intent.first_timestamp_ms == first.timestamp:
            complete = buf[-1].offset >= intent.last_offset or (
                position is not None and position > intent.last_offset
            )
            if not complete:
                return None
            records = [r for r in buf if r.offset <= intent.last_offset]
            return Batch(intent, records, replay=True)
        rng = Range(tp.topic, tp.partition, first.offset, buf[-1].offset, first.timestamp)
        return Batch(rng, list(buf), replay=False)

    def done(self, batch: Batch, now: float) -> None:
        """The batch is inserted and committed: forget its records and the intents it settled."""
        tp = TopicPartition(batch.range.topic, batch.range.partition)
        last = batch.range.last_offset
        self._buffers[tp] = [r for r in self._buffers[tp] if r.offset > last]
        intents = self._intents.get(tp, {})
        for first in [f for f in intents if f <= last]:
            del intents[first]
        self._recorded -= {
            k for k in self._recorded if k[0] == tp.topic and k[1] == tp.partition and k[2] <= last
        }
        self._reset_clock(now)

    def drop(self, tp: TopicPartition, now: float) -> int:
        """Forget a partition this consumer no longer owns (its records stay uncommitted in Kafka)."""
        dropped = len(self._buffers.pop(tp, []))
        self._intents.pop(tp, None)
        self._recorded -= {k for k in self._recorded if k[0] == tp.topic and k[1] == tp.partition}
        self._reset_clock(now)
        return dropped

    def _reset_clock(self, now: float) -> None:
        if not self.buffered():
            self._oldest = None
        elif self._oldest is None:
            self._oldest = now


@dataclass
class Backlog:
    """Rows written to the raw table and not yet to the rollups, and the batches (written raw) whose
    offsets may be committed only once they are: a restart then reads them again, and the rollups'
    own id lookup feeds them what they lack."""

    rows: list[Any] = field(default_factory=list)  # as converted, each with its topic and partition
    batches: list[Batch] = field(default_factory=list)
    dead: list[tuple[Any, str]] = field(default_factory=list)  # (record, reason): sent with the commit
    since: float | None = None  # when the first of `rows` was written raw

    def add(self, batches: list[Batch], rows: list[Any], now: float) -> None:
        self.batches.extend(batches)
        self.rows.extend(rows)
        if rows and self.since is None:
            self.since = now

    def wait_left(self, now: float, wait_s: float) -> float | None:
        """Seconds until the rollups are due (0 when they are), None when they lack nothing."""
        if self.since is None:
            return None
        return max(0.0, self.since + wait_s - now)

    def rolled_up(self) -> None:
        """The rollups hold every row: the batches wait only for their commit now."""
        self.rows = []
        self.since = None

    def offsets(self) -> dict[TopicPartition, int]:
        """The offset to commit per partition: the one after its last batch."""
        out: dict[TopicPartition, int] = {}
        for batch in self.batches:
            tp = TopicPartition(batch.range.topic, batch.range.partition)
            out[tp] = max(out.get(tp, 0), batch.range.last_offset + 1)
        return out

    def partitions(self) -> set[TopicPartition]:
        return {TopicPartition(b.range.topic, b.range.partition) for b in self.batches}

    def first_offset(self, tp: TopicPartition) -> int | None:
        """The first uncommitted offset of `tp` this backlog holds."""
        firsts = [b.range.first_offset for b in self.batches if (b.range.topic, b.range.partition) == tp]
        return min(firsts) if firsts else None

    def drop(self, tp: TopicPartition) -> None:
        """Forget a partition (revoked, or a commit refused): it is read again from its last commit."""
        self.batches = [b for b in self.batches if (b.range.topic, b.range.partition) != tp]
        self.rows = [r for r in self.rows if (r.topic, r.partition) != tp]
        self.dead = [d for d in self.dead if (d[0].topic, d[0].partition) != tp]
        if not self.rows:
            self.since = None
