"""Versioned migrations: consumers/migrations/NNNN_name.sql, applied in order at consumer start and
recorded in `schema_migrations`. Every statement is idempotent (IF NOT EXISTS), so a start that dies
half-way through a migration simply runs it again."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.write_sql import sql

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


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
    for entry in resources.files("cohere_gateway.consumers.migrations").iterdir():
        if m := _NAME.match(entry.name):
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def applied_versions(backend: Backend) -> dict[int, str]:
    rows = backend.query(sql("migrations_applied"))
    return {int(r["version"]): r["checksum"] for r in rows}


def migrate(backend: Backend, until: int | None = None) -> list[int]:
    """Apply the migrations not yet recorded (up to version `until` when given); return their versions."""
    backend.command(sql("migrations_table"))
    done = applied_versions(backend)
    applied = []
    for mig in load_migrations():
        if until is not None and mig.version > until:
            break
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
            sql("migration_record"), {"version": mig.version, "name": mig.name, "checksum": mig.checksum}
        )
        log.info("applied migration %04d_%s", mig.version, mig.name)
        applied.append(mig.version)
    return applied


# Which configured value governs each `setting` of table_retention (migration 0012).
RETENTION_SETTINGS = ("raw", "aggregate")


def apply_retention(backend: Backend, raw_days: int, aggregate_days: int) -> list[str]:
    """Set the TTL of each table whose recorded retention differs from --retention-days (raw tables) or
    --aggregate-retention-days (rollups), and record the change in `table_retention`; the tables already
    at the configured days are left alone. Returns the tables changed."""
    wanted = dict(zip(RETENTION_SETTINGS, (raw_days, aggregate_days), strict=True))
    for setting, days in wanted.items():
        if days < 1:
            raise ValueError(f"{setting} retention must be at least 1 day, got {days}")
    changed = []
    for row in backend.query(sql("retention_get")):
        days = wanted[row["setting"]]
        if int(row["days"]) == days:
            continue
        table, expression = row["table_name"], row["ttl_expression"]
        backend.command(sql("retention_alter").format(table=table, ttl_expression=expression, days=int(days)))
        backend.command(
            sql("retention_record"),
            {"table_name": table, "setting": row["setting"], "ttl_expression": expression, "days": days},
        )
        log.info("retention of %s set to %d days (was %d)", table, days, int(row["days"]))
        changed.append(table)
    return changed
