"""What every read query must answer, recomputed in Python from a list of distinct events: the reference
the duplicate-injection and corpus tests compare the real queries with."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from cohere_gateway.events import Event


def distinct(events: Iterable[Event]) -> list[Event]:
    """One event per event_id, the first copy."""
    seen: dict[str, Event] = {}
    for ev in events:
        seen.setdefault(ev.event_id, ev)
    return list(seen.values())


def _key(ev: Event, by: str) -> str:
    if by == "none":
        return ""
    value = getattr(ev, by)
    return value if value is not None else ""


def _sums(events: list[Event]) -> dict[str, Any]:
    costs = [ev.cost_usd for ev in events if ev.cost_usd is not None]
    unpriced = [ev for ev in events if ev.cost_usd is None]
    return {
        "requests": len(events),
        "errors": sum(ev.outcome != "ok" for ev in events),
        "input_tokens": sum(ev.usage.input_tokens or 0 for ev in events),
        "output_tokens": sum(ev.usage.output_tokens or 0 for ev in events),
        "cost_usd": sum(costs) if costs else None,
        "unpriced_requests": len(unpriced),
        "unpriced_input_tokens": sum(ev.usage.input_tokens or 0 for ev in unpriced),
        "unpriced_output_tokens": sum(ev.usage.output_tokens or 0 for ev in unpriced),
        "cost_complete": not unpriced,
        "cached_tokens": sum(ev.usage.cached_tokens or 0 for ev in events),
        "search_units": sum(ev.usage.search_units or 0 for ev in events),
        "images": sum(ev.usage.images or 0 for ev in events),
        "image_tokens": sum(ev.usage.image_tokens or 0 for ev in events),
        "implied_model_requests": sum(ev.model_implied for ev in events),
    }


def group(events: list[Event], key: Callable[[Event], Any]) -> dict[Any, list[Event]]:
    out: dict[Any, list[Event]] = defaultdict(list)
    for ev in events:
        out[key(ev)].append(ev)
    return out


def totals(events: list[Event], by: str) -> dict[str, dict[str, Any]]:
    return {
        k: _sums(evs) | {"streams": sum(ev.stream for ev in evs)}
        for k, evs in group(events, lambda ev: _key(ev, by)).items()
    }


def minute(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:00")


def timeseries(events: list[Event], by: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        k: _sums(evs) for k, evs in group(events, lambda ev: (minute(ev.start_time), _key(ev, by))).items()
    }


def errors(events: list[Event]) -> dict[tuple[str, int, str], dict[str, Any]]:
    failed = [ev for ev in events if ev.outcome != "ok"]
    keyed = group(failed, lambda ev: (ev.error_type or "", ev.status_code, ev.outcome))
    return {k: {"errors": len(evs), "rate": len(evs) / len(events)} for k, evs in keyed.items()}


def top_api_keys(events: list[Event]) -> dict[str, dict[str, Any]]:
    return {k: _sums(evs) for k, evs in group(events, lambda ev: ev.api_key_fingerprint or "").items()}


def top_metadata(events: list[Event], key: str) -> dict[str, dict[str, Any]]:
    having = [ev for ev in events if key in ev.metadata]
    return {k: _sums(evs) for k, evs in group(having, lambda ev: ev.metadata[key]).items()}


def close(actual: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(actual, int | float):
        return abs(actual - expected) <= 1e-9 * max(1.0, abs(expected))
    return actual == expected


# The fields of totals, time series and breakdowns the tests compare (latency quantiles are estimates).
FIELDS = (
    "requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "unpriced_requests",
    "cost_complete",
    "search_units",
    "images",
    "image_tokens",
)
# Totals (and the summary) carry more than the time series and breakdowns.
TOTAL_FIELDS = (
    *FIELDS,
    "streams",
    "unpriced_input_tokens",
    "unpriced_output_tokens",
    "cached_tokens",
    "implied_model_requests",
)


def mismatches(
    actual: dict[Any, dict[str, Any]], expected: dict[Any, dict[str, Any]], fields: Iterable[str] = ()
) -> list[str]:
    """The `fields` of `expected` (all when empty) compared; empty when the query matches."""
    fields = tuple(fields)
    out = []
    if set(actual) != set(expected):
        out.append(
            f"groups differ: only in query {set(actual) - set(expected)}, "
            f"only in recomputation {set(expected) - set(actual)}"
        )
    for k in set(actual) & set(expected):
        for name, want in expected[k].items():
            if fields and name not in fields:
                continue
            if not close(actual[k].get(name), want):
                out.append(f"{k!r}.{name}: query {actual[k].get(name)!r}, recomputed {want!r}")
    return out
