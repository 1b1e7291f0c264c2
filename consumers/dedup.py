"""Counting every event once: the rows of a flush whose event_id is already stored (or appears earlier in
the same flush) are left out of the insert, before the materialized views see them.

Insert deduplication (consumers/batching.py) covers a re-insert of the same offset range; this covers the
same event at another offset: a spool replay after a lost acknowledgement, possibly hours later, lands
the event at a new offset of the same partition (the Kafka key is the gateway). docs/storage.md,
"Duplicates", says why this design and what it costs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Sequence

from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.rows import Row
from cohere_gateway.consumers.write_sql import sql

_PLAIN = re.compile(r"[A-Za-z0-9_.:\-]*")


# A ClickHouse server refuses an HTTP parameter longer than its http_max_field_value_size (128 KiB by
# default) with "Field value too long", which no retry mends: a flush's ids are looked up in chunks whose
# parameters stay well below that (a 5,000-event batch of UUIDv7 ids is about 185 KB in one).
LOOKUP_PARAM_BYTES = 64 * 1024


def lookup_params(ids: Iterable[str]) -> Iterator[dict[str, str]]:
    """The lookup's parameters for `ids`, in chunks of at most LOOKUP_PARAM_BYTES a parameter (an id
    longer than that alone makes a chunk of its own)."""
    plain: list[str] = []
    hexed: list[str] = []
    size = 0
    for event_id in ids:
        is_plain = _PLAIN.fullmatch(event_id) is not None
        encoded = event_id if is_plain else event_id.encode().hex()
        if size + len(encoded) + 1 > LOOKUP_PARAM_BYTES and (plain or hexed):
            yield {"plain": ",".join(plain), "hex": ",".join(hexed)}
            plain, hexed, size = [], [], 0
        (plain if is_plain else hexed).append(encoded)
        size += len(encoded) + 1
    if plain or hexed:
        yield {"plain": ",".join(plain), "hex": ",".join(hexed)}


# The id table of each insert target: what `events` holds (migration 0005), what the rollups hold (0016).
ID_TABLES = ("event_ids", "rollup_ids")


def stored_ids(backend: Backend, ids: Sequence[str], table: str = "event_ids") -> set[str]:
    """The ids among `ids` that id table `table` (one of ID_TABLES) already holds."""
    if table not in ID_TABLES:
        raise ValueError(f"not an id table: {table!r}")
    found: set[str] = set()
    for params in lookup_params(ids):
        found.update(r["event_id"] for r in backend.query(sql("stored_ids"), params | {"table": table}))
    return found


def keep_first(rows: Iterable[Row], seen: set[str]) -> tuple[list[Row], int]:
    """The rows whose id is not in `seen`, each id once (the first copy wins); `seen` grows by them.
    Returns the rows kept and how many were left out."""
    kept, dropped = [], 0
    for row in rows:
        if row.event_id in seen:
            dropped += 1
            continue
        seen.add(row.event_id)
        kept.append(row)
    return kept, dropped


def flush_token(range_tokens: Sequence[str]) -> str:
    """The token of a flush's one insert, named by the offset ranges it holds: a retry of the same
    flush (the same ranges, cut again from the intent log) carries the same token whatever order the
    partitions come in. A flush of one range keeps that range's own token."""
    if len(range_tokens) == 1:
        return range_tokens[0]
    joined = "\n".join(sorted(range_tokens)).encode()
    return f"flush:{len(range_tokens)}:{hashlib.blake2b(joined, digest_size=16).hexdigest()}"


def token_for(flush: str, kept: Sequence[Row], total: int) -> str:
    """The insert's deduplication token. The flush's own token while the insert holds all its rows.
    When duplicates were left out, the rows depend on what was stored when this attempt looked, so the
    token names them: an attempt after a partial write (some parts of a multi-day insert stored) then
    inserts the rest under a new token, instead of being dropped as a repeat of the first attempt."""
    if len(kept) == total:
        return flush
    digest = hashlib.blake2b(b"\n".join(r.event_id.encode() for r in kept), digest_size=8).hexdigest()
    return f"{flush}:{digest}"
