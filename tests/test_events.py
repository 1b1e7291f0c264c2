"""The event contract: round trip, validation errors that name the field, versioning rules."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest

from cohere_gateway import events
from cohere_gateway.events import Event, EventError, Latency, Usage


def make_event(**overrides: object) -> Event:
    now = time.time()
    fields: dict[str, object] = {
        "schema_version": events.SCHEMA_VERSION,
        "event_id": events.new_event_id(),
        "start_time": events.utc_from_timestamp(now),
        "end_time": events.utc_from_timestamp(now + 0.25),
        "account_id": "acct-1",
        "gateway_id": "prod",
        "route_mode": "gateway",
        "api_version": "v2",
        "endpoint": "chat",
        "method": "POST",
        "path": "/v2/chat",
        "model": "command-r-plus",
        "stream": True,
        "status_code": 200,
        "outcome": "ok",
        "usage": Usage(input_tokens=12, output_tokens=34, raw_input_tokens=19, raw_output_tokens=34),
        "finish_reason": "COMPLETE",
        "latency": Latency(total_ms=250.0, upstream_ttfb_ms=20.5, ttft_ms=22.0, gateway_overhead_ms=0.4),
        "request_bytes": 120,
        "response_bytes": 2048,
        "user_agent": "cohere/7.3.1",
        "api_key_fingerprint": events.api_key_fingerprint("secret-key"),
        "response_id": "r-1",
        "metadata": {"team": "search", "user": "42"},
        "cost_usd": 0.000123,
        "cost_source": "pricing",
    }
    fields.update(overrides)
    return Event(**fields)  # type: ignore[arg-type]


def as_dict(event: Event) -> dict:
    return orjson.loads(events.encode(event))


def test_round_trip_keeps_every_field() -> None:
    event = make_event()
    assert events.decode(events.encode(event)) == event


def test_newer_minor_version_with_unknown_fields_is_accepted() -> None:
    raw = as_dict(make_event())
    raw["schema_version"] = f"{events.SCHEMA_MAJOR}.{events.SCHEMA_MINOR + 3}"
    raw["a_field_from_the_future"] = {"x": 1}
    raw["usage"]["future_units"] = 5
    decoded = events.decode(orjson.dumps(raw))
    assert decoded.schema_version.endswith(f".{events.SCHEMA_MINOR + 3}")
    assert decoded.usage.input_tokens == 12


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("event_id"), "missing required field `event_id`"),
        # a 200 KB id would be refused by a ClickHouse server's lookup for ever: dead-lettered instead
        (lambda d: d.update(event_id="x" * 200_000), "`$.event_id`"),
        (lambda d: d.update(outcome="fine"), "`$.outcome`"),
        (lambda d: d.update(status_code="200"), "`$.status_code`"),
        (lambda d: d.update(status_code=1200), "`$.status_code`"),
        (lambda d: d.update(account_id="bad id/with slash"), "`$.account_id`"),
        (lambda d: d.update(start_time="yesterday"), "`$.start_time`"),
        (lambda d: d["usage"].update(input_tokens=-1), "`$.usage.input_tokens`"),
        (lambda d: d["usage"].update(output_tokens=2**63), "`$.usage.output_tokens`"),
        (lambda d: d.update(response_bytes=2**63), "`$.response_bytes`"),
        (lambda d: d.update(start_time="2026-01-01T10:00:00"), "timezone component - at `$.start_time`"),
        (lambda d: d.update(schema_version="2.0"), "upgrade cohere-gateway"),
        (lambda d: d.update(schema_version="one"), "MAJOR.MINOR"),
        (lambda d: d.update(metadata={str(i): "v" for i in range(6)}), "at most 5"),
        (lambda d: d.update(end_time="2000-01-01T00:00:00Z"), "end_time is before start_time"),
    ],
)
def test_invalid_events_are_rejected_naming_the_field(mutate, message: str) -> None:
    raw = as_dict(make_event())
    mutate(raw)
    with pytest.raises(EventError, match="invalid event") as info:
        events.decode(orjson.dumps(raw))
    assert message in str(info.value)


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]", b'{"schema_version": "1.0"'])
def test_non_json_or_wrong_shape_is_rejected(data: bytes) -> None:
    with pytest.raises(EventError):
        events.decode(data)


def test_event_ids_are_uuid7_and_time_ordered() -> None:
    ids = [events.new_event_id(now_ns=1_700_000_000_000_000_000 + i * 1_000_000) for i in range(50)]
    assert ids == sorted(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert {u.version for u in parsed} == {7}
    assert {u.variant for u in parsed} == {uuid.RFC_4122}
    assert len(set(ids)) == 50
    assert all(str(u) == i for u, i in zip(parsed, ids, strict=True))  # the canonical text form


def test_fingerprint_hides_the_key_and_is_stable() -> None:
    key = "co-abcdefghijklmnopqrstuvwxyz0123456789"
    fp = events.api_key_fingerprint(key)
    assert fp == events.api_key_fingerprint(key)
    assert fp != events.api_key_fingerprint(key + "x")
    assert key not in fp and key[:8] not in fp
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16


def test_truncate_bounds_error_messages() -> None:
    assert events.truncate("short") == "short"
    long = events.truncate("x" * 5000)
    assert long is not None and len(long) == events.MAX_ERROR_MESSAGE and long.endswith("…")
    assert events.truncate(None) is None


DOC = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "events.md"


def test_documented_example_is_a_valid_event() -> None:
    text = DOC.read_text()
    example = text.split("```json", 1)[1].split("```", 1)[0]
    event = events.decode(example.encode())
    assert event.usage.raw_input_tokens == 19


def test_every_field_is_documented() -> None:
    import msgspec

    text = DOC.read_text()
    for name in msgspec.structs.fields(Event):
        if name.name not in ("usage", "latency", "request_body", "response_body"):
            assert f"`{name.name}`" in text, f"docs/events.md does not document {name.name}"
    for struct, prefix in ((Usage, "usage"), (Latency, "latency")):
        for f in msgspec.structs.fields(struct):
            assert f"`{prefix}.{f.name}`" in text, f"docs/events.md does not document {prefix}.{f.name}"
