"""The write side's SQL (migrations bookkeeping, retention, insert intents), as the read side keeps its
own in consumers/query_sql/. Migrations themselves are in consumers/migrations/."""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def sql(name: str) -> str:
    """The statement in `<name>.sql`, read once."""
    return resources.files(__name__).joinpath(f"{name}.sql").read_text()
