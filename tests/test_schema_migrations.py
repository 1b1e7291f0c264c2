"""Retention as a migration-managed setting (migration 0012) and the read queries' skip indexes (0013),
on both backends (the `storage` fixture: embedded chdb, and a real server through clickhouse-connect)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cohere_gateway.consumers import logs, queries, schema
from cohere_gateway.consumers.backends import Backend
from tests.fixtures.clickhouse import live_ttl_days, make_event
from tests.test_storage import insert_events

RAW = {"events", "event_ids", "event_feedback", "rollup_ids"}
# Tables whose TTL is fixed by their migration, not by a retention setting.
FIXED_TTL = {"consumer_batches"}
NEW_INDEXES = {
    "events": {"idx_model", "idx_endpoint", "idx_outcome", "idx_status_code", "idx_cache_status"},
    "event_feedback": {"idx_feedback"},
}


def recorded(backend: Backend) -> dict[str, tuple[str, int, str]]:
    rows = backend.query("SELECT table_name, setting, days, set_at FROM table_retention FINAL")
    return {r["table_name"]: (r["setting"], int(r["days"]), r["set_at"]) for r in rows}


def test_every_table_with_a_ttl_has_its_retention_recorded(clickhouse_backend: Backend) -> None:
    # A migration adding a table with a TTL must add its row too, or --retention-days would miss it.
    with_ttl = {
        r["name"]
        for r in clickhouse_backend.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND engine_full LIKE '% TTL %'"
        )
    }
    rows = recorded(clickhouse_backend)
    assert set(rows) == with_ttl - FIXED_TTL
    for table, (setting, days, _) in rows.items():
        assert (setting, days) == (("raw", 90) if table in RAW else ("aggregate", 400)), table
        assert live_ttl_days(clickhouse_backend, table) == days


def test_a_retention_change_is_applied_once_and_recorded(clickhouse_backend: Backend) -> None:
    backend = clickhouse_backend
    assert schema.apply_retention(backend, raw_days=90, aggregate_days=400) == []  # the defaults: nothing
    changed = schema.apply_retention(backend, raw_days=7, aggregate_days=30)
    assert set(changed) == set(recorded(backend))
    after = recorded(backend)
    for table, (setting, days, _) in after.items():
        assert days == (7 if setting == "raw" else 30)
        assert live_ttl_days(backend, table) == days  # the live schema says what the record says
    # The next start with the same settings changes nothing and records nothing new.
    assert schema.apply_retention(backend, raw_days=7, aggregate_days=30) == []
    assert recorded(backend) == after
    # Only the setting that changed is applied.
    assert set(schema.apply_retention(backend, raw_days=14, aggregate_days=30)) == RAW
    assert live_ttl_days(backend, "events") == 14 and live_ttl_days(backend, "events_by_hour") == 30
    with pytest.raises(ValueError, match="aggregate retention must be at least 1 day"):
        schema.apply_retention(backend, raw_days=14, aggregate_days=0)


def test_the_retention_migration_adopts_a_ttl_rewritten_before_it(storage: Any) -> None:
    """An install from before 0012 had its TTL rewritten at start; the migration records that, not 90."""
    backend = storage.open()
    schema.migrate(backend)
    backend.command("DROP TABLE table_retention SYNC")
    backend.command("ALTER TABLE events MODIFY TTL toDateTime(start_time) + toIntervalDay(7)")
    (retention,) = [m for m in schema.load_migrations() if m.name == "retention"]
    for _ in range(2):  # a start that died half-way runs the migration again
        for statement in retention.statements():
            backend.command(statement)
    rows = recorded(backend)
    assert rows["events"][:2] == ("raw", 7) and rows["event_ids"][:2] == ("raw", 90)
    assert schema.apply_retention(backend, raw_days=7, aggregate_days=400) == ["event_feedback", "event_ids"]


def _indexes(backend: Backend) -> dict[str, set[str]]:
    rows = backend.query(
        "SELECT table, name FROM system.data_skipping_indices WHERE database = currentDatabase()"
    )
    out: dict[str, set[str]] = {}
    for r in rows:
        out.setdefault(r["table"], set()).add(r["name"])
    return out


def _reads(backend: Backend) -> list[Any]:
    """The raw-table reads whose filters the new indexes serve, each with a filter set."""
    window = queries.Window.last("1h")
    return [
        queries.recent(backend, window, limit=500, model="command-r"),
        queries.recent(backend, window, limit=500, outcome="upstream_error", status_code=429),
        queries.recent(backend, window, limit=500, endpoint="rerank"),
        logs.list_events(backend, {"since": "1h", "model": "command-r", "outcome": "ok"})["events"],
        logs.list_events(backend, {"since": "1h", "status_code": "429", "cached": "false"})["events"],
        queries.top_metadata(backend, window, key="user", limit=10),
        queries.totals(backend, window, "model"),
    ]


def test_the_index_migration_applies_is_idempotent_and_changes_no_answer(clickhouse_backend: Backend) -> None:
    backend = clickhouse_backend
    found = _indexes(backend)
    for table, names in NEW_INDEXES.items():
        assert names <= found[table], (table, found.get(table))
    (indexes,) = [m for m in schema.load_migrations() if m.name == "read_indexes"]
    for statement in indexes.statements():  # applied again: no error, nothing added
        backend.command(statement)
    assert _indexes(backend) == found
    assert schema.migrate(backend) == []

    # 300 events 7 s apart, all well inside the last hour (the reads run twice, seconds apart).
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=50)
    insert_events(backend, [make_event(i, now) for i in range(300)], "idx-1")
    with_indexes = _reads(backend)
    assert all(with_indexes), with_indexes  # every filter matches something
    # The model filter as the read queries write it can use its index.
    explained = backend.query(
        "EXPLAIN indexes = 1 SELECT count() FROM events WHERE start_time > now() - INTERVAL 1 DAY "
        "AND ({model:String} = '' OR model = {model:String})",
        {"model": "command-r"},
    )
    assert "idx_model" in "\n".join(r["explain"] for r in explained)
    for table, names in NEW_INDEXES.items():
        for name in names:
            backend.command(f"ALTER TABLE {table} DROP INDEX {name}")
    assert _reads(backend) == with_indexes


def test_the_rollup_ids_of_migration_0016_keep_the_raw_retention_in_force(storage: Any) -> None:
    """An install running --retention-days 200 before 0016: the ids it copies from `event_ids` must live
    as long as their raw rows, or a replay of an old event would reach the rollups again."""
    backend = storage.open()
    schema.migrate(backend, until=15)
    schema.apply_retention(backend, raw_days=200, aggregate_days=400)
    assert schema.migrate(backend) == [16]
    assert live_ttl_days(backend, "rollup_ids") == 200
    assert recorded(backend)["rollup_ids"][:2] == ("raw", 200)
    assert schema.apply_retention(backend, raw_days=200, aggregate_days=400) == []
