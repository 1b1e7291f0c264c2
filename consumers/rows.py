"""Kafka message -> raw-table row (JSONEachRow), or the reason it cannot be one. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cohere_gateway.events import Event, EventError, decode, encode

# DateTime64(3) holds 1900-01-01 .. 2299-12-31; anything outside would fail the whole insert block.
_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(2299, 12, 31, tzinfo=UTC)

# How far ahead of the consumer's clock an event may start. Gateways keep their clocks with NTP; an event
# further ahead comes from a clock that is wrong, and would sit outside every window until that date.
MAX_FUTURE_SKEW = timedelta(days=1)

# The JSON keys of a raw-table row, in insert order: the contract's fields as `encode` writes them
# (`usage` and `latency` nested, filling the flat columns through migration 0004) and where the message
# was in Kafka. Inserts name these columns; see consumers/migrations/0004_nested_insert.sql.
EVENT_COLUMNS: tuple[str, ...] = (*Event.__struct_fields__, "kafka_partition", "kafka_offset")


@dataclass(frozen=True)
class Rejected:
    reason: str


def check_storable(event: Event) -> str | None:
    """Limits of the ClickHouse column types that the contract does not state (it does state that
    timestamps carry a timezone, end_time >= start_time and counts fit in UInt64)."""
    if event.start_time < _MIN_TIME:
        return f"start_time {event.start_time.isoformat()} is outside 1970..2299 - at `$.start_time`"
    if event.end_time > _MAX_TIME:
        return f"end_time {event.end_time.isoformat()} is outside 1970..2299 - at `$.end_time`"
    return None


class Row(NamedTuple):
    """A raw-table row, with what the consumer needs to know of it without parsing the line again."""

    event_id: str
    start_time: datetime
    line: bytes  # one JSONEachRow line


def to_row(value: bytes | None, partition: int, offset: int) -> Row | Rejected:
    """The raw-table row of one message, or why the message is a dead letter."""
    if value is None:
        return Rejected("empty message (tombstone) - expected a JSON event")
    try:
        event = decode(value)
    except EventError as exc:
        return Rejected(str(exc))
    if problem := check_storable(event):
        return Rejected(f"invalid event: {problem}")
    # Re-encoding the validated event (not the message as it came) drops unknown and duplicate keys,
    # which would fail the whole insert block; the Kafka position is spliced into the closing brace.
    line = encode(event)[:-1] + b',"kafka_partition":%d,"kafka_offset":%d}\n' % (partition, offset)
    return Row(event.event_id, event.start_time, line)


def outside_retention(start_time: datetime, now: datetime, retention_days: int) -> str | None:
    """Why storage would not keep an event starting at `start_time`, or None. The raw table's TTL drops
    an event older than the retention at once (it would be counted inserted and then be absent from every
    query, and the duplicate lookup needs the raw row), and an event from a clock far ahead is dated in a
    future no window shows: both are dead letters with this reason rather than silently lost."""
    oldest = now - timedelta(days=retention_days)
    if start_time < oldest:
        return (
            f"start_time {start_time.isoformat()} is older than the raw retention ({retention_days} days, "
            f"nothing before {oldest.isoformat(timespec='seconds')} is kept): a gateway clock far behind, "
            "or a replay of events storage no longer keeps - at `$.start_time`"
        )
    if start_time > now + MAX_FUTURE_SKEW:
        return (
            f"start_time {start_time.isoformat()} is more than {MAX_FUTURE_SKEW.days} day ahead of the "
            f"consumer's clock ({now.isoformat(timespec='seconds')}): the gateway's clock is wrong "
            "- at `$.start_time`"
        )
    return None
