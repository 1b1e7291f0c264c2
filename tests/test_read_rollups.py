"""The read side's rollups (migrations 0009, 0011, 0014) against the per-minute and raw-table queries they
replace, on a real ClickHouse (chdb and the server): the same counts for every window, scope and grouping,
including windows whose ends fall mid-hour and mid-day, and after the migrations' backfill of events
stored before them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from cohere_gateway.consumers import queries, schema
from cohere_gateway.consumers.backends import Backend
from cohere_gateway.events import Event
from tests.fixtures.clickhouse import make_event
from tests.test_storage import insert_events

COUNTS = ("requests", "errors", "input_tokens", "output_tokens", "unpriced_requests", "search_units")
WINDOWS = ("30m", "90m", "26h", "3d")  # no whole hour; hours only; hours and a day; days
SCOPES = ({}, {"account_id": "acct-b", "gateway_id": "gw-dev"})


CACHE = (None, "HIT", "MISS", "EXPIRED", "BYPASS")


def spread_events() -> list[Event]:
    """400 events over 4 days, 14 minutes 23 s apart: every level (minute, hour, day) holds some; cache
    lookups of every kind, hits with a known and an unknown saved cost."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=4)
    events = []
    for i in range(400):
        event = make_event(i, start + timedelta(seconds=863 * i - 7 * i))
        status = CACHE[i % len(CACHE)]
        saved = {"saved_input_tokens": 10 + i, "saved_cost_usd": None if i % 4 else 0.001 * i}
        events.append(
            msgspec.structs.replace(event, cache_status=status, **(saved if status == "HIT" else {}))
        )
    return events


def same(new: list[dict[str, Any]], old: list[dict[str, Any]], key: str, counts: tuple[str, ...]) -> None:
    pick = lambda rows: [(r[key], *(int(r[c]) for c in counts)) for r in rows]  # noqa: E731
    assert pick(new) == pick(old)
    for a, b in zip(new, old, strict=True):
        assert (a["cost_usd"] is None) == (b["cost_usd"] is None)
        assert abs((a["cost_usd"] or 0) - (b["cost_usd"] or 0)) < 1e-9


def check_every_query(backend: Backend) -> None:
    now = datetime.now(UTC)
    seen_errors = seen_hits = 0
    for since in WINDOWS:
        for scope in SCOPES:
            window = queries.Window.last(since, now=now, **scope)
            params = window.params()
            for by in ("none", "model", "account_id", "gateway_id", "endpoint", "outcome"):
                old = backend.query(queries.sql("totals"), params | {"by": by})
                same(queries.totals(backend, window, by), old, "key", (*COUNTS, "implied_model_requests"))
            for step in (3600, 21600):
                for by in ("none", "model"):
                    old = backend.query(queries.sql("timeseries"), params | {"by": by, "step_s": step})
                    new = queries.timeseries(backend, window, by, step)
                    assert [r["bucket"] for r in new] == [r["bucket"] for r in old]
                    same(new, old, "key", ("requests", "errors", "input_tokens"))
            old = backend.query(queries.sql("top_api_keys"), params | {"limit": 100})
            same(queries.top_api_keys(backend, window, 100), old, "api_key_fingerprint", COUNTS)
            old = backend.query(queries.sql("top_metadata"), params | {"key": "user", "limit": 100})
            same(queries.top_metadata(backend, window, "user", 100), old, "value", COUNTS)
            old = backend.query(queries.sql("errors"), params)
            seen_errors += len(old)
            new = queries.errors(backend, window)
            assert [(r["error_type"], r["status_code"], r["outcome"], int(r["errors"])) for r in new] == [
                (r["error_type"], r["status_code"], r["outcome"], int(r["errors"])) for r in old
            ]
            rates = [int(o["errors"]) / int(o["requests"]) for o in old]
            assert [r["rate"] for r in new] == pytest.approx(rates)
            for by in queries.CACHE_GROUP_FIELDS:
                old = backend.query(queries.sql("cache"), params | {"by": by})
                seen_hits += sum(int(r["hits"]) for r in old)
                new = queries.cache(backend, window, by)
                fields = ("key", "lookups", "hits", "saved_input_tokens", "saved_cost_unknown")
                assert [tuple(r[f] for f in fields) for r in new] == [
                    tuple(int(r[f]) if f != "key" else r[f] for f in fields) for r in old
                ]
                assert [r["saved_cost_usd"] for r in new] == pytest.approx([r["saved_cost_usd"] for r in old])
    assert seen_errors and seen_hits  # the comparisons above compared something


def test_rollups_count_exactly_what_the_minute_and_raw_queries_count(clickhouse_backend: Backend) -> None:
    insert_events(clickhouse_backend, spread_events(), "rollups-1")
    assert queries.Levels.of(queries.Window.last("7d")).whole_hours  # the rollups answer these windows
    assert queries.Levels.of(queries.Window.last("3d")).d0 < queries.Levels.of(queries.Window.last("3d")).d1
    check_every_query(clickhouse_backend)


UNSCOPED = (
    "all_models_by_hour",
    "all_models_by_day",
    "all_gateways_by_hour",
    "all_gateways_by_day",
    "all_by_hour",
)
ROLLUPS = (
    "events_by_hour",
    "events_by_day",
    "gateways_by_hour",
    "keys_by_hour",
    "metadata_by_hour",
    "errors_by_hour",
    "cache_by_hour",
    *UNSCOPED,
)
UNSCOPED_VIEWS = tuple(f"{t}_mv" for t in UNSCOPED)


def test_the_migrations_fill_the_rollups_from_what_was_stored(clickhouse_backend: Backend) -> None:
    insert_events(clickhouse_backend, spread_events(), "rollups-2")
    # As if the events had been stored before migrations 0009, 0011, 0014 and 0015: empty their tables,
    # run their inserts again in order, 0015's views absent while the earlier ones fill (as they were).
    migrations = {m.version: m for m in schema.load_migrations()}
    filled = [
        s
        for version in (9, 11, 14)
        for s in migrations[version].statements()
        if s.lstrip().upper().startswith("INSERT INTO") and "table_retention" not in s
    ]
    assert len(filled) == 8
    for table in ROLLUPS:
        clickhouse_backend.command(f"TRUNCATE TABLE {table}")
    for view in UNSCOPED_VIEWS:
        clickhouse_backend.command(f"DROP VIEW {view}")
    for statement in filled:
        clickhouse_backend.command(statement)
    for statement in migrations[15].statements():
        clickhouse_backend.command(statement)
    check_every_query(clickhouse_backend)
    # The digests came from the raw events: the quantiles of a long window are there.
    total = queries.totals(clickhouse_backend, queries.Window.last("3d"), "none")[0]
    assert total["latency_ms_p50"] is not None
