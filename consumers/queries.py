"""The read side, shared by `report`, the read API and the dashboards. SQL lives in consumers/query_sql/;
this module validates parameters, fills in defaults and shapes results. It knows nothing of HTTP."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

from cohere_gateway.consumers.backends import Backend
from cohere_gateway.gateway_file import Budget, BudgetFile


def format_time(ts: datetime) -> str:
    """ClickHouse's DateTime64(3) text form, in UTC."""
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.") + f"{ts.microsecond // 1000:03d}"


GROUP_FIELDS = ("account_id", "gateway_id", "model", "endpoint", "outcome", "none")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
QUANTILES = ("p50", "p95", "p99")


class QueryError(ValueError):
    """A bad query parameter; the message says which and what is accepted."""


class NotFound(LookupError):
    """The query is well-formed but names nothing stored."""


# Longest window a query may ask for: beyond any retention, and far from datetime's overflow.
MAX_DURATION = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """'30m', '1h', '7d', '90s', '2w'; at most MAX_DURATION."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise QueryError(
            f"duration {text[:40]!r} not understood: use a number and a unit s/m/h/d/w, e.g. 30m, 1h, 7d"
        )
    seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
    if seconds > MAX_DURATION.total_seconds():
        raise QueryError(
            f"duration {text[:40]!r} is longer than the {MAX_DURATION.days} days a query may span"
        )
    return timedelta(seconds=seconds)


@cache
def sql(name: str) -> str:
    return resources.files("cohere_gateway.consumers.query_sql").joinpath(f"{name}.sql").read_text()


@dataclass(frozen=True)
class Window:
    since: datetime
    until: datetime
    account_id: str = ""
    gateway_id: str = ""

    @classmethod
    def last(cls, duration: str, now: datetime | None = None, **scope: str) -> Window:
        until = now or datetime.now(UTC)
        return cls(since=until - parse_duration(duration), until=until, **scope)

    @property
    def scoped(self) -> bool:
        return bool(self.account_id or self.gateway_id)

    def params(self) -> dict[str, Any]:
        return {
            "since": format_time(self.since),
            # Aggregates are per minute; `until` is exclusive, so round it up to include the current minute.
            "until": format_time(self.until + timedelta(minutes=1)),
            "account_id": self.account_id,
            "gateway_id": self.gateway_id,
        }


def _floor(ts: datetime, unit: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + (ts - epoch) // unit * unit


def _ceil(ts: datetime, unit: timedelta) -> datetime:
    floored = _floor(ts, unit)
    return floored if floored == ts else floored + unit


def _seconds(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


HOUR, DAY, MINUTE = timedelta(hours=1), timedelta(days=1), timedelta(minutes=1)


@dataclass(frozen=True)
class Levels:
    """How a window splits over the rollups: minutes in [since, h0) and [h1, until), hours in [h0, d0)
    and [d1, h1), days in [d0, d1). `whole_hours` is false when the window holds no whole hour: then the
    per-minute table answers alone (the queries of totals.sql/timeseries.sql)."""

    since: datetime
    until: datetime
    h0: datetime
    h1: datetime
    d0: datetime
    d1: datetime

    @classmethod
    def of(cls, window: Window) -> Levels:
        since = _floor(window.since, MINUTE)
        until = _floor(window.until, MINUTE) + MINUTE  # the current minute included, as in Window.params
        h0, h1 = _ceil(since, HOUR), _floor(until, HOUR)
        d0, d1 = _ceil(h0, DAY), _floor(h1, DAY)
        if d0 >= d1:
            d0 = d1 = h1
        return cls(since, until, h0, h1, d0, d1)

    @property
    def whole_hours(self) -> bool:
        return self.h0 < self.h1

    def params(self, by: str, scoped: bool = True) -> dict[str, str]:
        """The boundaries, and the hour and day tables: the smallest that holds the grouping and the
        scope (a t-digest merge costs microseconds, so fewer rows is faster). Unscoped: the time-first
        rollups of migration 0015 (per hour alone, per model, per gateway); scoped: the account-first
        ones, whose sort key prunes to the scope."""
        values = {name: _seconds(getattr(self, name)) for name in ("since", "until", "h0", "h1", "d0", "d1")}
        narrow = by in NARROW_GROUPS
        if not scoped:
            hours, days = {
                "none": ("all_by_hour", "all_models_by_day"),
                "account_id": ("all_gateways_by_hour", "all_gateways_by_day"),
                "gateway_id": ("all_gateways_by_hour", "all_gateways_by_day"),
            }.get(by, ("all_models_by_hour", "all_models_by_day"))
        elif narrow:
            hours, days = "gateways_by_hour", "all_gateways_by_day"
        else:
            hours, days = "events_by_hour", "events_by_day"
        return values | {"hours": hours, "days": days}


NARROW_GROUPS = ("none", "account_id", "gateway_id")


def _check_by(by: str) -> str:
    if by not in GROUP_FIELDS:
        raise QueryError(f"cannot group by {by!r}: use one of {', '.join(GROUP_FIELDS)}")
    return by


def _spread_quantiles(row: dict[str, Any], column: str) -> dict[str, Any]:
    values = row.pop(column, None) or []
    for name, value in zip(QUANTILES, values, strict=False):
        row[f"{column}_{name}"] = None if value != value else value  # NaN (no data) -> None
    return row


def _ints(row: dict[str, Any], *names: str) -> dict[str, Any]:
    # JSONEachRow quotes 64-bit integers; make them numbers again.
    for name in names:
        if name in row and row[name] is not None:
            row[name] = int(row[name])
    return row


# Counts a row may carry; JSONEachRow quotes them (64-bit).
COUNTS = (
    "requests",
    "errors",
    "streams",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "search_units",
    "classifications",
    "embeddings",
    "images",
    "image_tokens",
    "unpriced_requests",
    "unpriced_input_tokens",
    "unpriced_output_tokens",
    "implied_model_requests",
)


def _costed(row: dict[str, Any]) -> dict[str, Any]:
    """Counts as numbers, and `cost_complete`: false when any request of the row has no known cost, so
    `cost_usd` (the priced requests' cost, or null when none was priced) is a lower bound."""
    _ints(row, *COUNTS)
    row["cost_complete"] = row.get("unpriced_requests", 0) == 0
    return row


def totals(backend: Backend, window: Window, by: str = "model") -> list[dict[str, Any]]:
    levels = Levels.of(window)
    params = window.params() | {"by": _check_by(by)}
    if levels.whole_hours:
        rows = backend.query(sql("totals_rollup"), params | levels.params(by, window.scoped))
    else:
        rows = backend.query(sql("totals"), params)
    for row in rows:
        _costed(row)
        row["error_rate"] = row["errors"] / row["requests"] if row["requests"] else 0.0
        _spread_quantiles(row, "latency_ms")
        _spread_quantiles(row, "ttft_ms")
    return rows


def timeseries(backend: Backend, window: Window, by: str = "none", step_s: int = 60) -> list[dict[str, Any]]:
    if step_s < 60 or step_s % 60:
        raise QueryError(f"step must be a whole number of minutes (60, 300, ...), got {step_s} s")
    levels = Levels.of(window)
    params = window.params() | {"by": _check_by(by), "step_s": step_s}
    if step_s % 3600 == 0 and levels.whole_hours:
        rows = backend.query(sql("timeseries_rollup"), params | levels.params(by, window.scoped))
    else:
        rows = backend.query(sql("timeseries"), params)
    for row in rows:
        _costed(row)
        _spread_quantiles(row, "latency_ms")
    return rows


def _per_minute_or_rollup(name: str, window: Window, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A per-minute query, or with a whole hour in the window its rollup (whole hours from the hourly
    table, the ragged minutes at both ends per minute; `Levels`). Unlike `_top`, whose ragged ends come
    from `events` at the window's millisecond bounds, `since`/`until` become whole minutes here."""
    levels = Levels.of(window)
    if not levels.whole_hours:
        return sql(name), window.params() | params
    return sql(f"{name}_rollup"), window.params() | params | levels.params("none")


def errors(backend: Backend, window: Window) -> list[dict[str, Any]]:
    rows = [
        _ints(row, "errors", "requests")
        for row in backend.query(*_per_minute_or_rollup("errors", window, {}))
    ]
    for row in rows:
        row["rate"] = row["errors"] / row.pop("requests") if row["requests"] else 0.0
    return rows


def _top(name: str, window: Window, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The raw-table query, or with a whole hour in the window its rollup (whole hours from the hourly
    table, the ragged ends from `events`, at the window's own millisecond bounds)."""
    levels = Levels.of(window)
    if not levels.whole_hours:
        return sql(name), window.params() | params
    bounds = {"h0": _seconds(levels.h0), "h1": _seconds(levels.h1)}
    return sql(f"{name}_rollup"), window.params() | params | bounds


def top_api_keys(backend: Backend, window: Window, limit: int = 10) -> list[dict[str, Any]]:
    rows = backend.query(*_top("top_api_keys", window, {"limit": limit}))
    return [_costed(r) for r in rows]


def top_metadata(backend: Backend, window: Window, key: str, limit: int = 10) -> list[dict[str, Any]]:
    if not key:
        raise QueryError("top_metadata needs a metadata key, e.g. key=user")
    rows = backend.query(*_top("top_metadata", window, {"key": key, "limit": limit}))
    return [_costed(r) for r in rows]


CACHE_GROUP_FIELDS = ("account_id", "gateway_id", "model", "none")


def cache(backend: Backend, window: Window, by: str = "model") -> list[dict[str, Any]]:
    """Response cache lookups, hits, hit rate and what the hits saved (tokens, USD; hits whose cost was
    unknown are counted apart, never as $0)."""
    if by not in CACHE_GROUP_FIELDS:
        raise QueryError(f"cache savings group by one of {', '.join(CACHE_GROUP_FIELDS)}, not {by!r}")
    rows = backend.query(*_per_minute_or_rollup("cache", window, {"by": by}))
    for row in rows:
        _ints(row, "lookups", "hits", "saved_input_tokens", "saved_output_tokens", "saved_cost_unknown")
        row["hit_rate"] = row["hits"] / row["lookups"] if row["lookups"] else 0.0
    return rows


def recent(
    backend: Backend,
    window: Window,
    limit: int = 50,
    model: str = "",
    endpoint: str = "",
    outcome: str = "",
    status_code: int = 0,
    metadata_key: str = "",
    metadata_value: str = "",
) -> list[dict[str, Any]]:
    params = window.params() | {
        "limit": limit,
        "model": model,
        "endpoint": endpoint,
        "outcome": outcome,
        "status_code": status_code,
        "metadata_key": metadata_key,
        "metadata_value": metadata_value,
    }
    rows = latest(backend, "recent", window, params)
    return [_ints(r, *(k for k in r if k.startswith("usage_"))) for r in rows]


# The latest rows of a window without reading all of it: the sort key is (account, gateway, start_time,
# ...), so a narrow time range reads few granules per (account, gateway). Ask the last 5 minutes first,
# then a span sized from what the last one found (what it held, scaled to `limit` with a margin; at
# least GROWTH times wider), and the whole window only when the spans held fewer than `limit` rows. An
# unfiltered page stops at the first span; a filter matching one event in thousands takes two or three
# (bench/read.py), where fixed steps of 5 minutes, an hour, a day and a week took up to five.
FIRST_PROBE = timedelta(minutes=5)
GROWTH = 4
MARGIN = 1.5


def latest(backend: Backend, name: str, window: Window, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Query `name` (ordered by start_time DESC, LIMIT {limit}) over ever wider tails of the window."""
    limit = int(params["limit"])
    return newest(lambda p: backend.query(sql(name), params | p), window.since, window.until, limit)


def next_span(span: timedelta, found: int, limit: int) -> timedelta:
    """The span to ask next after `span` held `found` (< limit) rows: wide enough, at the rate seen, to
    hold `limit` with a margin; nothing found says little about the rate, so much wider."""
    factor = MARGIN * limit / found if found else 100.0
    return span * max(GROWTH, factor)


def newest(
    query: Callable[[dict[str, str]], list[dict[str, Any]]], since: datetime, upper: datetime, limit: int
) -> list[dict[str, Any]]:
    """The newest `limit` rows at or before `upper`: `query` asked with a later `since` first (the last 5
    minutes before `upper`, then wider: `next_span`), the whole window ({}) only when those held fewer
    than `limit`. Exact: every row a probe leaves out is older than every row it holds."""
    span = FIRST_PROBE
    while upper - span > since:
        rows = query({"since": format_time(upper - span)})
        if len(rows) >= limit:
            return rows
        span = min(next_span(span, len(rows), limit), upper - since)  # the whole window at the most
    return query({})


def event(backend: Backend, window: Window, event_id: str = "") -> dict[str, Any]:
    """One event by id, whatever its time (the window is not applied: ids are unique)."""
    if not event_id:
        raise QueryError("event needs event_id, e.g. event_id=01a2178f-036e-73e0-a1d5-e572d7c6537a")
    lo, hi = id_time_bounds(event_id)
    rows = backend.query(sql("event"), {"event_id": event_id, "lo": format_time(lo), "hi": format_time(hi)})
    if not rows:
        raise NotFound(f"no event {event_id!r}: it may not be consumed yet, or is past retention")
    return _ints(rows[0], *(k for k in rows[0] if k.startswith("usage_")), "request_bytes", "response_bytes")


# How far an event's start_time may be from the time inside its UUIDv7 id: both are the gateway's clock,
# read when the request arrived (addons/gateway.py), so seconds apart; a day leaves room for anything.
ID_TIME_SLACK = timedelta(days=1)
_EARLIEST, _LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2299, 12, 31, tzinfo=UTC)


def id_time_bounds(event_id: str) -> tuple[datetime, datetime]:
    """[lo, hi) of start_time for an id: around its UUIDv7 time (cohere_gateway.events.new_event_id), or
    every storable time for an id of another shape."""
    try:
        value = uuid.UUID(event_id)
    except ValueError:
        return _EARLIEST, _LATEST
    if value.version != 7:
        return _EARLIEST, _LATEST
    at = _EARLIEST + timedelta(milliseconds=value.int >> 80)
    return max(_EARLIEST, at - ID_TIME_SLACK), min(_LATEST, at + ID_TIME_SLACK)


def summary(backend: Backend, window: Window, by: str = "model") -> dict[str, Any]:
    """What `report` prints: the overall total and the totals per group."""
    overall = totals(backend, window, "none")
    cached = cache(backend, window, "none")
    return {
        "since": window.since.isoformat(),
        "until": window.until.isoformat(),
        "by": by,
        "total": overall[0] if overall else None,
        "groups": totals(backend, window, by) if by != "none" else [],
        "cache": cached[0] if cached and cached[0]["lookups"] else None,
        "cache_groups": cache(backend, window, by) if by in CACHE_GROUP_FIELDS and by != "none" else [],
    }


def feedback_by(backend: Backend, window: Window, by: str = "model") -> list[dict[str, Any]]:
    """Feedback per model, gateway or account over a window (GET /api/feedback)."""
    if by not in ("model", "gateway_id", "account_id"):
        raise QueryError("feedback groups by model, gateway_id or account_id")
    rows = backend.query(sql("feedback_by"), window.params() | {"by": by})
    for row in rows:
        for k in ("positive", "negative", "scored"):
            row[k] = int(row[k])
    return rows


def budgets(
    backend: Backend, budget_file: BudgetFile, now: datetime | None = None, account_id: str = "",
    gateway_id: str = "",
) -> list[dict[str, Any]]:  # fmt: skip
    """Each budget counter's use now, recomputed from the raw events as the gateway counts it: the
    budgets of the gateway configuration file (the same file, read by cohere_gateway.gateway_file),
    resolved per gateway seen in the window as the gateway resolves them, one row per counter (a budget
    keyed by model, API key or metadata value has one per value). Requests whose cost is unknown are
    counted apart (`unpriced_requests`), never as $0: `used_usd` is then a lower bound."""
    at = (now or datetime.now(UTC)).timestamp()
    every = {b for _, _, found in budget_file.entries for b in (found or ())}
    if not every:
        return []
    earliest = min(b.windows(at)[0] for b in every)
    until = format_time(datetime.fromtimestamp(at, UTC) + timedelta(milliseconds=1))
    seen = backend.query(sql("budget_gateways"), {"since": _stamp(earliest), "until": until})
    # counter -> the gateways counting into it: a budget keyed by account is one counter for all the
    # account's gateways under the same budget, any other key one counter (or one per value) per gateway
    counters: dict[tuple[Budget, str, str], list[str]] = {}
    for row in seen:
        account, gateway = row["account_id"], row["gateway_id"]
        if (account_id and account != account_id) or (gateway_id and gateway != gateway_id):
            continue
        for budget in budget_file.budgets_for(account, gateway):
            scope = "" if budget.key == "account" else gateway
            counters.setdefault((budget.counter, account, scope), []).append(gateway)
    out = []
    for (budget, account, _), gateways in counters.items():
        since, split, end, weight = budget.windows(at)
        params = {
            "account_id": account,
            "gateways": ",".join(gateways),
            "key": budget.key if not budget.key.startswith("metadata.") else "metadata",
            "meta": budget.key.removeprefix("metadata.") if budget.key.startswith("metadata.") else "",
            "since": _stamp(since),
            "split": _stamp(split),
            "until": until,
        }
        for row in backend.query(sql("budget_use"), params):
            used = float(row["before_usd"]) * weight + float(row["current_usd"])
            unpriced = int(row["current_unpriced"]) + (int(row["before_unpriced"]) if weight else 0)
            out.append({
                "account_id": account,
                "gateway_id": row["gateway"] or None,  # None: the account's gateways together
                "gateways": sorted(gateways) if budget.key == "account" else [row["gateway"]],
                "key": budget.key,
                "value": row["value"] if budget.key not in ("account", "gateway") else None,
                "window": budget.describe(),
                "rolling": budget.rolling,
                "since": datetime.fromtimestamp(since if weight else split, UTC).isoformat(),
                "until": datetime.fromtimestamp(end, UTC).isoformat(),  # a rolling window: it slides
                "limit_usd": budget.usd,
                "used_usd": used,
                "remaining_usd": max(0.0, budget.usd - used),
                "used_share": used / budget.usd,
                "unpriced_requests": unpriced,
                "cost_complete": unpriced == 0,
                "requests": int(row["requests"]),
            })  # fmt: skip
    out.sort(key=lambda r: (-r["used_share"], r["account_id"], r["gateway_id"] or "", r["value"] or ""))
    return out


def _stamp(epoch: float) -> str:
    return format_time(datetime.fromtimestamp(epoch, UTC))


# name -> (function, the typed parameters it takes beyond the window)
API: dict[str, tuple[Any, dict[str, type]]] = {
    "summary": (summary, {"by": str}),
    "totals": (totals, {"by": str}),
    "timeseries": (timeseries, {"by": str, "step_s": int}),
    "errors": (errors, {}),
    "cache": (cache, {"by": str}),
    "top_api_keys": (top_api_keys, {"limit": int}),
    "top_metadata": (top_metadata, {"key": str, "limit": int}),
    "recent": (
        recent,
        {
            "limit": int,
            "model": str,
            "endpoint": str,
            "outcome": str,
            "status_code": int,
            "metadata_key": str,
            "metadata_value": str,
        },
    ),
    "event": (event, {"event_id": str}),
    "feedback": (feedback_by, {"by": str}),
}


def run(backend: Backend, name: str, args: dict[str, str]) -> Any:
    """Run query `name` with string arguments (from a URL or the CLI): since (duration, default 1h),
    account_id, gateway_id, and the query's own parameters. Raises QueryError for anything unknown."""
    if name not in API:
        raise QueryError(f"unknown query {name!r}: use one of {', '.join(sorted(API))}")
    fn, accepted = API[name]
    window = Window.last(
        args.get("since", "1h"), account_id=args.get("account_id", ""), gateway_id=args.get("gateway_id", "")
    )
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key in ("since", "account_id", "gateway_id"):
            continue
        if key not in accepted:
            raise QueryError(
                f"query {name!r} takes no parameter {key!r}; it takes {sorted(accepted) or 'none'}"
            )
        try:
            kwargs[key] = accepted[key](value)
        except ValueError:
            raise QueryError(f"parameter {key!r} must be {accepted[key].__name__}, got {value!r}") from None
        if accepted[key] is int and kwargs[key] < 0:
            raise QueryError(f"parameter {key!r} must not be negative")
    return fn(backend, window, **kwargs)
