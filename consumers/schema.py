"""Versioned migrations: consumers/migrations/NNNN_name.sql, applied in order at consumer start and
recorded in `schema_migrations`. Every statement is idempotent (IF NOT EXISTS), so a start that dies
half-way through a migration simply runs it again."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from consumers.backends import Backend

log = logging.getLogger(__name__)

MIGRATIONS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
ORDER BY version
"""

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_TTL_DAYS = re.compile(r"toIntervalDay\((\d+)\)")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        return split_statements(self.sql)


def split_statements(sql: str) -> list[str]:
    """Split a migration on `;` at line ends. Comment-only chunks are dropped."""
    out = []
    for chunk in re.split(r";\s*(?:\n|$)", sql):
        code = "\n".join(line for line in chunk.splitlines() if not line.strip().startswith("--")).strip()
        if code:
            out.append(code)
    return out


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("consumers.migrations").iterdir():
        if m := _NAME.match(entry.name):
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def applied_versions(backend: Backend) -> dict[int, str]:
    rows = backend.query("SELECT version, checksum FROM schema_migrations FINAL")
    return {int(r["version"]): r["checksum"] for r in rows}


def migrate(backend: Backend) -> list[int]:
    """Apply the migrations not yet recorded; return their versions."""
    backend.command(MIGRATIONS_TABLE_SQL)
    done = applied_versions(backend)
    applied = []
    for mig in load_migrations():
        if mig.version in done:
            if done[mig.version] != mig.checksum:
                log.warning(
                    "migration %04d_%s changed after it was applied; edits to applied migrations are not "
                    "re-run - add a new migration instead",
                    mig.version,
                    mig.name,
                )
            continue
        for statement in mig.statements():
            backend.command(statement)
        backend.command(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES "
            "({version:UInt32}, {name:String}, {checksum:String})",
            {"version": mig.version, "name": mig.name, "checksum": mig.checksum},
        )
        log.info("applied migration %04d_%s", mig.version, mig.name)
        applied.append(mig.version)
    return applied


def current_ttl_days(backend: Backend, table: str) -> int | None:
    rows = backend.query(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        {"t": table},
    )
    if not rows:
        return None
    m = _TTL_DAYS.search(rows[0]["engine_full"])
    return int(m.group(1)) if m else None


def apply_retention(backend: Backend, raw_days: int, aggregate_days: int) -> None:
    """Rewrite the tables' TTL when --retention-days differs from what the table has."""
    wanted = {
        "events": ("toDateTime(start_time)", raw_days),
        "event_ids": ("toDateTime(start_time)", raw_days),
        "event_feedback": ("toDateTime(start_time)", raw_days),
        "events_by_minute": ("minute", aggregate_days),
        "errors_by_minute": ("minute", aggregate_days),
        "cache_by_minute": ("minute", aggregate_days),
        "events_by_hour": ("hour", aggregate_days),
        "events_by_day": ("hour", aggregate_days),
        "gateways_by_hour": ("hour", aggregate_days),
        "keys_by_hour": ("hour", aggregate_days),
        "metadata_by_hour": ("hour", aggregate_days),
    }
    for table, (column, days) in wanted.items():
        if days < 1:
            raise ValueError(f"retention for {table} must be at least 1 day, got {days}")
        if current_ttl_days(backend, table) != days:
            backend.command(f"ALTER TABLE {table} MODIFY TTL {column} + toIntervalDay({int(days)})")
            log.info("retention of %s set to %d days", table, days)
