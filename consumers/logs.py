"""The logs API (docs/api.md): list events with filters and a cursor, get one, give feedback on one,
delete what a filter matches (with an exact dry run), export a filtered list. SQL in
consumers/query_sql/logs_*.sql and feedback_*.sql; this module validates and shapes. It knows nothing
of HTTP."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.queries import (
    MAX_DURATION,
    NotFound,
    QueryError,
    event,
    format_time,
    newest,
    parse_duration,
    sql,
)

# filter parameter -> type; every one optional (empty matches all)
FILTERS: dict[str, type] = {
    "since": str,
    "until": str,
    "account_id": str,
    "gateway_id": str,
    "model": str,
    "endpoint": str,
    "outcome": str,
    "status_code": int,
    "api_key_fingerprint": str,
    "metadata_key": str,
    "metadata_value": str,
    "cached": str,
    "feedback": int,
}
MAX_PAGE = 1000
EXPORT_PAGE = 5000  # rows held at once while exporting: memory stays bounded whatever the filter matches
MAX_METADATA = 32
MAX_METADATA_TEXT = 256


def _time(text: str, now: datetime, name: str) -> datetime:
    """An ISO 8601 time, or a duration back from now ('24h')."""
    try:
        return now - parse_duration(text)
    except QueryError:
        pass
    try:
        ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"{name} {text[:40]!r} is neither a duration (30m, 24h, 7d) nor an ISO 8601 time "
            "(2026-12-01T10:00:00Z)"
        ) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def filter_params(args: dict[str, str], now: datetime | None = None) -> dict[str, Any]:
    """The filter's SQL parameters from string arguments; `until` defaults to now, `since` to 24h before."""
    now = now or datetime.now(UTC)
    for key in args:
        if key not in FILTERS:
            raise QueryError(f"unknown filter {key!r}; filters: {', '.join(FILTERS)}")
    until = _time(args["until"], now, "until") if args.get("until") else now
    since = _time(args["since"], now, "since") if args.get("since") else until - parse_duration("24h")
    if since > until or until - since > MAX_DURATION:
        raise QueryError("since must be before until, and at most 3660 days before it")
    params: dict[str, Any] = {"since": format_time(since), "until": format_time(until)}
    for key, kind in FILTERS.items():
        if key in ("since", "until"):
            continue
        value = args.get(key, "")
        if kind is int:
            try:
                params[key] = int(value or 0)
            except ValueError:
                raise QueryError(f"filter {key!r} must be a whole number, got {value[:40]!r}") from None
        else:
            params[key] = value
    if params["cached"] not in ("", "true", "false"):
        raise QueryError("filter 'cached' is true or false")
    if params["feedback"] not in (0, 1, -1):
        raise QueryError("filter 'feedback' is 1 (thumbs up) or -1 (thumbs down)")
    if not 0 <= params["status_code"] <= 999:
        raise QueryError("filter 'status_code' is an HTTP status (100..599)")
    if params["metadata_value"] and not params["metadata_key"]:
        raise QueryError("filter metadata_value needs metadata_key")
    return params


def _sql(name: str) -> str:
    return sql(name).replace("{filter}", "(" + _strip_comments(sql("logs_filter")) + ")")


def _strip_comments(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))


def _cursor(until: str, row: dict[str, Any]) -> str:
    raw = orjson.dumps({"until": until, "t": row["start_time"], "id": row["event_id"]})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _uncursor(text: str) -> dict[str, str]:
    try:
        value = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        if not all(isinstance(value.get(k), str) for k in ("until", "t", "id")):
            raise ValueError
        return value
    except ValueError:
        raise QueryError(
            "cursor not understood: pass next_cursor from the previous page as it came"
        ) from None


def _with_feedback(backend: Backend, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        return rows
    given = {
        r["event_id"]: r
        for r in backend.query(sql("feedback_get"), {"ids": _hex_ids(r["event_id"] for r in rows)})
    }
    for row in rows:
        f = given.get(row["event_id"])
        row["feedback"] = None if f is None else _feedback(f)
    return rows


def _hex_ids(ids: Any) -> str:
    return ",".join(i.encode().hex() for i in ids)


def _feedback(f: dict[str, Any]) -> dict[str, Any]:
    return {
        "feedback": f["feedback"] or None,
        "score": f["score"],
        "metadata": f["metadata"],
        "updated_at": f["updated_at"],
    }


def _page(
    backend: Backend, params: dict[str, Any], after: dict[str, str] | None, limit: int
) -> list[dict[str, Any]]:
    page = params | {"limit": limit, "after_time": "", "after_id": ""}
    if after:
        page |= {"until": after["until"], "after_time": after["t"], "after_id": after["id"]}
    # Newest first without reading the whole window (queries.newest): probes end where the page starts.
    since, upper = _stored_time(page["since"]), _stored_time(after["t"] if after else page["until"])
    if since is None or upper is None:
        return backend.query(_sql("logs_list"), page)
    return newest(lambda p: backend.query(_sql("logs_list"), page | p), since, upper, limit)


def _stored_time(text: str) -> datetime | None:
    """A time as the queries format it and ClickHouse returns it ('2026-12-07 09:00:00.123', UTC)."""
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def list_events(backend: Backend, args: dict[str, str]) -> dict[str, Any]:
    """One page: {"events": [...], "next_cursor": str | None}. The cursor pins the first page's `until`,
    so the pages that follow list exactly what the first saw, newest first, while events arrive."""
    args = dict(args)
    cursor = args.pop("cursor", "")
    try:
        limit = int(args.pop("limit", "100"))
    except ValueError:
        raise QueryError("limit must be a whole number") from None
    if not 1 <= limit <= MAX_PAGE:
        raise QueryError(f"limit must be 1..{MAX_PAGE}")
    params = filter_params(args)
    after = _uncursor(cursor) if cursor else None
    rows = _page(backend, params, after, limit)
    until = after["until"] if after else params["until"]
    return {
        "events": _with_feedback(backend, rows),
        "next_cursor": _cursor(until, rows[-1]) if len(rows) == limit else None,
    }


def get_event(backend: Backend, event_id: str) -> dict[str, Any]:
    row = event(backend, None, event_id)  # type: ignore[arg-type]  # the window is not used
    return _with_feedback(backend, [row])[0]


def patch(backend: Backend, event_id: str, body: bytes) -> dict[str, Any]:
    """Set feedback (1 / -1, or 0 to clear), score (0..100, or null to clear) and/or metadata (merged into
    what was given before; a null value removes a key). Fields not in the body keep their last value."""
    try:
        change = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise QueryError('the body must be JSON, e.g. {"feedback": 1, "score": 90}') from None
    if not isinstance(change, dict) or not change or set(change) - {"feedback", "score", "metadata"}:
        raise QueryError("the body is an object with feedback (1 or -1), score (0..100) and/or metadata")
    row = event(backend, None, event_id)  # type: ignore[arg-type]  # NotFound when absent
    old = backend.query(sql("feedback_get"), {"ids": _hex_ids([event_id])})
    current = old[0] if old else {"feedback": 0, "score": None, "metadata": {}}
    feedback, score, metadata = current["feedback"], current["score"], dict(current["metadata"])
    if "feedback" in change:
        if change["feedback"] not in (1, -1, 0, None) or isinstance(change["feedback"], bool):
            raise QueryError("feedback is 1 (thumbs up), -1 (thumbs down), or 0/null to clear it")
        feedback = change["feedback"] or 0
    if "score" in change:
        s = change["score"]
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 100):
            raise QueryError("score is a whole number 0..100, or null to clear it")
        score = s
    if "metadata" in change:
        extra = change["metadata"]
        if not isinstance(extra, dict):
            raise QueryError("metadata is an object of string values (null removes a key)")
        for key, value in extra.items():
            if len(key) > MAX_METADATA_TEXT or (value is not None and not isinstance(value, str)):
                raise QueryError(
                    f"metadata {key[:40]!r}: keys and values are strings of at most 256 characters"
                )
            if value is None:
                metadata.pop(key, None)
            elif len(value) > MAX_METADATA_TEXT:
                raise QueryError(f"metadata {key[:40]!r}: values are at most 256 characters")
            else:
                metadata[key] = value
        if len(metadata) > MAX_METADATA:
            raise QueryError(f"at most {MAX_METADATA} feedback metadata keys per event")
    backend.command(
        sql("feedback_put"),
        {
            "event_id": event_id,
            "start_time": row["start_time"],
            "account_id": row["account_id"],
            "gateway_id": row["gateway_id"],
            "model": row.get("model") or "",
            "feedback": feedback,
            "score": -1 if score is None else score,
            "metadata": orjson.dumps(metadata).decode(),
        },
    )
    return get_event(backend, event_id)["feedback"]


def delete(backend: Backend, args: dict[str, str]) -> dict[str, Any]:
    """Erase the events a filter matches; dry_run=true only counts them. A filter is required: at least
    one besides the time (or all=true), so a forgotten parameter cannot erase everything."""
    args = dict(args)
    dry_run = args.pop("dry_run", "false").lower() in ("1", "true", "yes")
    everything = args.pop("all", "false").lower() in ("1", "true", "yes")
    params = filter_params(args)
    if not everything and not any(args.get(k) for k in FILTERS if k not in ("since", "until")):
        raise QueryError("name at least one filter besides since/until (or all=true) to delete events")
    matched = int(backend.query(_sql("logs_count"), params)[0]["events"])
    if dry_run or not matched:
        return {
            "matched": matched,
            "deleted": 0,
            "dry_run": dry_run,
            "since": params["since"],
            "until": params["until"],
        }
    backend.command(_sql("logs_delete"), params)
    left = int(backend.query(_sql("logs_count"), params)[0]["events"])
    return {
        "matched": matched,
        "deleted": matched - left,
        "dry_run": False,
        "since": params["since"],
        "until": params["until"],
    }


EXPORT_COLUMNS = (
    "event_id",
    "start_time",
    "account_id",
    "gateway_id",
    "api_version",
    "endpoint",
    "model",
    "stream",
    "status_code",
    "outcome",
    "usage_input_tokens",
    "usage_output_tokens",
    "usage_cached_tokens",
    "usage_search_units",
    "usage_images",
    "usage_image_tokens",
    "cost_usd",
    "cost_source",
    "cache_status",
    "latency_total_ms",
    "api_key_fingerprint",
    "metadata",
)


def export(backend: Backend, args: dict[str, str]) -> tuple[str, Iterator[bytes]]:
    """(content type, chunks) of every event the filter matches, newest first, page by page (EXPORT_PAGE
    rows at a time: memory stays bounded). format=csv (default) or json (one object a line)."""
    args = dict(args)
    fmt = args.pop("format", "csv")
    if fmt not in ("csv", "json"):
        raise QueryError("format is csv or json (one JSON object a line)")
    params = filter_params(args)

    def pages() -> Iterator[list[dict[str, Any]]]:
        after = None
        while True:
            rows = _page(backend, params, after, EXPORT_PAGE)
            if rows:
                yield rows
            if len(rows) < EXPORT_PAGE:
                return
            after = {"until": params["until"], "t": rows[-1]["start_time"], "id": rows[-1]["event_id"]}

    def csv_chunks() -> Iterator[bytes]:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(EXPORT_COLUMNS)
        for rows in pages():
            for r in rows:
                writer.writerow([_csv_cell(r.get(c)) for c in EXPORT_COLUMNS])
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
        if out.getvalue():
            yield out.getvalue().encode()

    def json_chunks() -> Iterator[bytes]:
        for rows in pages():
            yield b"".join(orjson.dumps({c: r.get(c) for c in EXPORT_COLUMNS}) + b"\n" for r in rows)

    if fmt == "csv":
        return "text/csv; charset=utf-8", csv_chunks()
    return "application/x-ndjson", json_chunks()


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    text = str(value)
    # A cell a spreadsheet would run as a formula (metadata and models are client text) gets a quote.
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") and not _number(text) else text


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["NotFound", "QueryError", "delete", "export", "get_event", "list_events", "patch"]
