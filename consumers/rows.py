"""Kafka message -> raw-table row (JSONEachRow), or the reason it cannot be one. Pure functions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from cohere_gateway.events import Event, EventError, decode

# DateTime64(3) holds 1900-01-01 .. 2299-12-31; anything outside would fail the whole insert block.
_MIN_TIME = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_TIME = datetime(2299, 12, 31, tzinfo=UTC)

USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "raw_input_tokens",
    "raw_output_tokens",
    "cached_tokens",
    "search_units",
    "classifications",
    "embeddings",
)
LATENCY_FIELDS = ("total_ms", "upstream_ttfb_ms", "ttft_ms", "gateway_overhead_ms")
_PLAIN_FIELDS = (
    "event_id",
    "schema_version",
    "account_id",
    "gateway_id",
    "route_mode",
    "api_version",
    "endpoint",
    "method",
    "path",
    "model",
    "stream",
    "status_code",
    "outcome",
    "error_type",
    "error_message",
    "finish_reason",
    "request_bytes",
    "response_bytes",
    "user_agent",
    "api_key_fingerprint",
    "response_id",
    "generation_id",
    "client_event_id",
    "metadata",
    "cost_usd",
    "cost_source",
    "request_body",
    "response_body",
)
UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class Rejected:
    reason: str


def format_time(ts: datetime) -> str:
    """ClickHouse's DateTime64(3) text form, in UTC."""
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.") + f"{ts.microsecond // 1000:03d}"


def event_row(event: Event, partition: int, offset: int) -> dict:
    row = {name: getattr(event, name) for name in _PLAIN_FIELDS}
    row["start_time"] = format_time(event.start_time)
    row["end_time"] = format_time(event.end_time)
    for name in USAGE_FIELDS:
        row["usage_" + name] = getattr(event.usage, name)
    for name in LATENCY_FIELDS:
        row["latency_" + name] = getattr(event.latency, name)
    row["kafka_partition"] = partition
    row["kafka_offset"] = offset
    return row


def check_storable(event: Event) -> str | None:
    """Limits of the ClickHouse column types that the contract does not state."""
    for name in ("start_time", "end_time"):
        ts = getattr(event, name)
        if ts.tzinfo is None:
            return f"{name} has no timezone - at `$.{name}`"
        if not _MIN_TIME <= ts <= _MAX_TIME:
            return f"{name} {ts.isoformat()} is outside 1970..2299 - at `$.{name}`"
    for name in USAGE_FIELDS:
        value = getattr(event.usage, name)
        if value is not None and value > UINT64_MAX:
            return f"usage.{name} does not fit in 64 bits - at `$.usage.{name}`"
    for name in ("request_bytes", "response_bytes"):
        if getattr(event, name) > UINT64_MAX:
            return f"{name} does not fit in 64 bits - at `$.{name}`"
    return None


def convert(value: bytes | None, partition: int, offset: int) -> bytes | Rejected:
    """One JSONEachRow line for the raw table, or why the message is a dead letter."""
    if value is None:
        return Rejected("empty message (tombstone) - expected a JSON event")
    try:
        event = decode(value)
    except EventError as exc:
        return Rejected(str(exc))
    if problem := check_storable(event):
        return Rejected(f"invalid event: {problem}")
    return orjson.dumps(event_row(event, partition, offset)) + b"\n"
