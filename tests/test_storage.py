"""Schema, inserts, deduplication and queries on real ClickHouse, each test against both backends (the
`storage` fixture: embedded chdb, and clickhouse-connect against a real server). No Kafka: rows are
built as the consumer builds them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cohere_gateway.consumers import queries, schema
from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.rows import EVENT_COLUMNS
from cohere_gateway.events import Event, Latency, Usage, encode
from tests.fixtures.clickhouse import convert, live_ttl_days, make_event

# Recent, so the TTL (90 days) does not drop the rows on insert.
BASE = (datetime.now(UTC) - timedelta(days=2)).replace(second=0, microsecond=0)


def insert_events(backend: Backend, events: list[Event], token: str | None, partition: int = 0) -> None:
    lines = []
    for offset, ev in enumerate(events):
        row = convert(encode(ev), partition, offset)
        assert isinstance(row, bytes), row
        lines.append(row)
    # As the consumer writes them: the raw table, then the hour and day rollups' feed (migration 0016).
    backend.insert_json_rows("events", b"".join(lines), token, EVENT_COLUMNS)
    backend.insert_json_rows("rollup_feed", b"".join(lines), token and f"rollup:{token}", EVENT_COLUMNS)


def event_from_row(row: dict[str, Any]) -> Event:
    """The stored row back as an event, to prove nothing was lost on the way in."""
    row = dict(row)

    def when(text: str) -> datetime:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)

    def num(value: Any) -> Any:
        return int(value) if isinstance(value, str) else value

    usage = Usage(**{n: num(row.pop("usage_" + n)) for n in Usage.__struct_fields__})
    latency = Latency(**{n: row.pop("latency_" + n) for n in Latency.__struct_fields__})
    for name in ("kafka_partition", "kafka_offset"):
        row.pop(name)
    row["request_bytes"], row["response_bytes"] = num(row["request_bytes"]), num(row["response_bytes"])
    return Event(
        **row | {"start_time": when(row["start_time"]), "end_time": when(row["end_time"])},
        usage=usage,
        latency=latency,
    )


def test_migrations_apply_once_and_are_recorded(storage: Any) -> None:
    backend = storage.open()
    first = schema.migrate(backend)
    assert first == [m.version for m in schema.load_migrations()]
    assert schema.migrate(backend) == []
    recorded = backend.query("SELECT version, name FROM schema_migrations FINAL ORDER BY version")
    assert [(int(r["version"]), r["name"]) for r in recorded] == [
        (m.version, m.name) for m in schema.load_migrations()
    ]
    tables = {
        r["name"] for r in backend.query("SELECT name FROM system.tables WHERE database = currentDatabase()")
    }
    assert {"events", "events_by_minute", "errors_by_minute", "consumer_batches"} <= tables


def test_raw_table_column_types(clickhouse_backend: Backend) -> None:
    cols = {
        r["name"]: r["type"]
        for r in clickhouse_backend.query(
            "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'events'"
        )
    }
    assert cols["start_time"] == "DateTime64(3, 'UTC')"
    assert cols["account_id"] == "LowCardinality(String)"
    assert cols["metadata"] == "Map(String, String)"
    engine = clickhouse_backend.query(
        "SELECT engine, partition_key, sorting_key FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'events'"
    )[0]
    assert engine["engine"] == "ReplacingMergeTree"
    assert engine["partition_key"] == "toDate(start_time)"
    assert engine["sorting_key"].endswith("event_id")


def test_every_field_round_trips(clickhouse_backend: Backend) -> None:
    events = [make_event(i, BASE) for i in range(60)]
    insert_events(clickhouse_backend, events, "rt-1")
    rows = clickhouse_backend.query("SELECT * FROM events FINAL ORDER BY start_time")
    assert [event_from_row(r) for r in rows] == events


def test_same_token_twice_is_a_noop_for_raw_and_aggregates(clickhouse_backend: Backend) -> None:
    events = [make_event(i, BASE) for i in range(50)]
    insert_events(clickhouse_backend, events, "topic:0:0-49:1")
    insert_events(clickhouse_backend, events, "topic:0:0-49:1")
    raw = clickhouse_backend.query("SELECT count() AS n FROM events")[0]["n"]
    agg = clickhouse_backend.query("SELECT sum(requests) AS n FROM events_by_minute")[0]["n"]
    errs = clickhouse_backend.query("SELECT sum(errors) AS n FROM errors_by_minute")[0]["n"]
    assert (int(raw), int(agg), int(errs)) == (50, 50, sum(e.outcome != "ok" for e in events))
    # A different token is a different batch: the same rows count twice in the aggregates, which is
    # why the consumer must re-cut a crashed batch with its original range (and so its token).
    insert_events(clickhouse_backend, events, "topic:0:0-48:1")
    agg = clickhouse_backend.query("SELECT sum(requests) AS n FROM events_by_minute")[0]["n"]
    assert int(agg) == 100
    final = clickhouse_backend.query("SELECT count() AS n FROM events FINAL")[0]["n"]
    assert int(final) == 50


AGG_FROM_AGGREGATES = """
SELECT minute, account_id, gateway_id, model, endpoint, outcome, sum(requests) AS requests,
       sum(errors) AS errors, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       round(sum(cost_usd), 9) AS cost_usd, quantilesMerge(0.5, 0.95, 0.99)(latency_ms) AS latency
FROM events_by_minute
GROUP BY minute, account_id, gateway_id, model, endpoint, outcome
ORDER BY minute, account_id, gateway_id, model, endpoint, outcome
"""
AGG_FROM_RAW = """
SELECT toStartOfMinute(start_time) AS minute, account_id, gateway_id, ifNull(model, '') AS model, endpoint,
       outcome, count() AS requests, countIf(outcome != 'ok') AS errors,
       sum(ifNull(usage_input_tokens, 0)) AS input_tokens,
       sum(ifNull(usage_output_tokens, 0)) AS output_tokens,
       round(sum(ifNull(cost_usd, 0)), 9) AS cost_usd, quantiles(0.5, 0.95, 0.99)(latency_total_ms) AS latency
FROM events FINAL
GROUP BY minute, account_id, gateway_id, model, endpoint, outcome
ORDER BY minute, account_id, gateway_id, model, endpoint, outcome
"""


def assert_aggregates_match_raw(backend: Backend) -> int:
    """Every per-minute aggregate row equals its recomputation from the raw events; the row count."""
    from_aggregates = backend.query(AGG_FROM_AGGREGATES)
    from_raw = backend.query(AGG_FROM_RAW)
    for a, r in zip(from_aggregates, from_raw, strict=True):
        assert {k: v for k, v in a.items() if k not in ("cost_usd", "latency")} == {
            k: v for k, v in r.items() if k not in ("cost_usd", "latency")
        }
        assert a["cost_usd"] == pytest.approx(r["cost_usd"], abs=1e-6)
        assert a["latency"] == pytest.approx(r["latency"])
    return len(from_raw)


def test_aggregates_equal_a_recomputation_from_raw(clickhouse_backend: Backend) -> None:
    events = [make_event(i, BASE) for i in range(400)]
    for part in range(4):  # several blocks, as several batches would insert them
        insert_events(clickhouse_backend, events[part::4], f"t:{part}:0-99:1", partition=part)
    assert assert_aggregates_match_raw(clickhouse_backend) > 20
    total = clickhouse_backend.query("SELECT sum(requests) AS n FROM events_by_minute")[0]["n"]
    assert int(total) == 400


def test_retention_is_rewritten_when_configured(clickhouse_backend: Backend) -> None:
    assert live_ttl_days(clickhouse_backend, "events") == 90
    schema.apply_retention(clickhouse_backend, raw_days=7, aggregate_days=30)
    assert live_ttl_days(clickhouse_backend, "events") == 7
    assert live_ttl_days(clickhouse_backend, "events_by_minute") == 30
    with pytest.raises(ValueError, match="at least 1 day"):
        schema.apply_retention(clickhouse_backend, raw_days=0, aggregate_days=30)


@pytest.fixture
def loaded(clickhouse_backend: Backend) -> tuple[Backend, list[Event]]:
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    events = [make_event(i, now) for i in range(200)]  # 7 s apart: spans ~23 minutes
    insert_events(clickhouse_backend, events, "q-1")
    return clickhouse_backend, events


def test_totals_by_model_match_the_events(loaded: tuple[Backend, list[Event]]) -> None:
    backend, events = loaded
    window = queries.Window.last("1h")
    rows = {r["key"]: r for r in queries.totals(backend, window, "model")}
    for model in {e.model or "" for e in events}:
        mine = [e for e in events if (e.model or "") == model]
        assert rows[model]["requests"] == len(mine)
        assert rows[model]["errors"] == sum(e.outcome != "ok" for e in mine)
        assert rows[model]["input_tokens"] == sum(e.usage.input_tokens or 0 for e in mine)
        assert rows[model]["output_tokens"] == sum(e.usage.output_tokens or 0 for e in mine)
        assert rows[model]["cost_usd"] == pytest.approx(sum(e.cost_usd or 0 for e in mine))
        lat = sorted(e.latency.total_ms for e in mine)
        assert lat[0] <= rows[model]["latency_ms_p50"] <= rows[model]["latency_ms_p99"] <= lat[-1]
    only_a = queries.totals(backend, queries.Window.last("1h", account_id="acct-a"), "none")
    assert only_a[0]["requests"] == sum(e.account_id == "acct-a" for e in events)
    assert queries.totals(backend, queries.Window.last("1h"), "none")[0]["requests"] == len(events)


def test_timeseries_errors_top_and_recent(loaded: tuple[Backend, list[Event]]) -> None:
    backend, events = loaded
    window = queries.Window.last("1h")
    series = queries.timeseries(backend, window, by="none", step_s=300)
    assert sum(r["requests"] for r in series) == len(events)
    assert all(datetime.fromisoformat(r["bucket"]).minute % 5 == 0 for r in series)

    errs = queries.errors(backend, window)
    assert errs == [
        {
            "error_type": "rate_limited",
            "status_code": 429,
            "outcome": "upstream_error",
            "errors": sum(e.outcome != "ok" for e in events),
            "rate": pytest.approx(sum(e.outcome != "ok" for e in events) / len(events)),
        }
    ]

    keys = queries.top_api_keys(backend, window, limit=2)
    assert len(keys) == 2 and keys[0]["cost_usd"] >= keys[1]["cost_usd"]
    by_key = {
        k: sum(1 for e in events if e.api_key_fingerprint == k)
        for k in {e.api_key_fingerprint for e in events}
    }
    assert all(k["requests"] == by_key[k["api_key_fingerprint"]] for k in keys)

    users = queries.top_metadata(backend, window, key="user", limit=10)
    assert {u["value"] for u in users} == {"user-0", "user-1", "user-2", "user-3"}
    assert sum(u["requests"] for u in users) == sum(1 for e in events if "user" in e.metadata)

    recent = queries.recent(backend, window, limit=5, outcome="upstream_error")
    assert len(recent) == 5 and all(r["status_code"] == 429 for r in recent)
    newest = max(e.start_time for e in events if e.outcome != "ok")
    assert datetime.fromisoformat(recent[0]["start_time"]).replace(tzinfo=UTC) == newest


def test_run_rejects_bad_parameters_clearly(loaded: tuple[Backend, list[Event]]) -> None:
    backend, _ = loaded
    with pytest.raises(queries.QueryError, match="unknown query"):
        queries.run(backend, "drop_tables", {})
    with pytest.raises(queries.QueryError, match="cannot group by"):
        queries.run(backend, "totals", {"by": "api_key"})
    with pytest.raises(queries.QueryError, match="duration"):
        queries.run(backend, "totals", {"since": "yesterday"})
    with pytest.raises(queries.QueryError, match="takes no parameter"):
        queries.run(backend, "errors", {"limit": "3"})
    with pytest.raises(queries.QueryError, match="must be int"):
        queries.run(backend, "recent", {"limit": "many"})
    assert queries.run(backend, "summary", {"since": "2h", "by": "endpoint"})["total"]["requests"] == 200


def test_cache_hits_and_savings_per_gateway_and_model(clickhouse_backend: Backend) -> None:
    """Event 1.2 (migration 0007): a HIT's saved usage and cost land in cache_by_minute; its usage and
    cost (nothing billed) keep events_by_minute's token and cost sums what upstream billed."""
    same = {"account_id": "acme", "gateway_id": "prod", "model": "command-r", "outcome": "ok"}
    same |= {"status_code": 200, "error_type": None, "error_message": None}
    hit = {"cache_status": "HIT", "cost_usd": 0.0, "cost_source": "cache", "usage": Usage()}
    hit |= {"saved_input_tokens": 10, "saved_output_tokens": 20, "saved_cost_usd": 0.5}
    events = [
        make_event(0, BASE, **same, cache_status="MISS", cost_usd=0.5, usage=Usage(input_tokens=10)),
        make_event(1, BASE, **same, **hit),
        make_event(2, BASE, **same, **(hit | {"saved_cost_usd": None})),
        make_event(3, BASE, **same, cache_status=None),
    ]
    insert_events(clickhouse_backend, events, "cache-1")
    row = clickhouse_backend.query(
        "SELECT sum(lookups) AS l, sum(hits) AS h, sum(saved_input_tokens) AS i,"
        " sum(saved_output_tokens) AS o,"
        " sum(saved_cost_usd) AS c, sum(saved_cost_unknown) AS u FROM cache_by_minute"
        " WHERE account_id = 'acme' AND gateway_id = 'prod' AND model = 'command-r'"
    )[0]
    assert {k: float(v) for k, v in row.items()} == {"l": 3, "h": 2, "i": 20, "o": 40, "c": 0.5, "u": 1}
    stored = clickhouse_backend.query("SELECT * FROM events FINAL ORDER BY start_time")
    assert [event_from_row(r) for r in stored] == events
