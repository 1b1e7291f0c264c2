"""`report`: the summary from the running consumer's API, or straight from storage when it is free."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlencode

from cohere_gateway.consumers import queries
from cohere_gateway.consumers.backends import chdb_path, open_backend
from cohere_gateway.consumers.http_api import read_discovery
from cohere_gateway.settings import ReportSettings


def fetch_summary(cfg: ReportSettings) -> dict[str, Any]:
    queries.parse_duration(cfg.since)  # fail before any I/O on a bad window
    if not cfg.clickhouse and (info := read_discovery(chdb_path(cfg.data_dir))):
        url = f"{info['url']}/api/summary?{urlencode({'since': cfg.since, 'by': cfg.by})}"
        headers = {"Authorization": f"Bearer {cfg.api_token}"} if cfg.api_token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = json.loads(exc.read() or b"{}").get("error", exc.reason)
            raise ValueError(f"the consumer's API at {info['url']} answered {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise ValueError(
                f"the consumer (pid {info['pid']}) owns {cfg.data_dir} but its API at {info['url']} "
                f"does not answer: {exc.reason}"
            ) from None
    backend = open_backend(cfg.clickhouse, cfg.data_dir)
    try:
        return queries.summary(backend, queries.Window.last(cfg.since), cfg.by)
    finally:
        backend.close()


def run_report(cfg: ReportSettings) -> None:
    data = fetch_summary(cfg)
    if cfg.json:
        print(json.dumps(data, indent=2))
        return
    render(data)


def _fmt_cost(row: dict[str, Any]) -> str:
    """A cost with unpriced requests in it is a lower bound (≥), or unknown when none was priced."""
    if row.get("cost_usd") is None:
        return "unknown"
    return ("≥ " if row.get("unpriced_requests") else "") + f"{row['cost_usd']:.4f}"


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    title = f"cohere-gateway: {data['since'][:19]} .. {data['until'][:19]} UTC"
    table = Table(title=title)
    table.add_column(data["by"] if data["by"] != "none" else "")
    for name in (
        "requests",
        "errors",
        "error %",
        "tokens in",
        "tokens out",
        "cost $",
        "unpriced",
        "p50 ms",
        "p95 ms",
        "p99 ms",
    ):
        table.add_column(name, justify="right")
    rows = list(data["groups"])
    if data["total"]:
        rows.append({**data["total"], "key": "TOTAL"})
    for row in rows:
        table.add_row(
            escape(row["key"]) if row["key"] else "(none)",  # names are client-chosen: no markup
            f"{row['requests']:,}",
            f"{row['errors']:,}",
            f"{100 * row['error_rate']:.1f}",
            f"{row['input_tokens']:,}",
            f"{row['output_tokens']:,}",
            _fmt_cost(row),
            f"{row.get('unpriced_requests', 0):,}",
            _fmt_ms(row.get("latency_ms_p50")),
            _fmt_ms(row.get("latency_ms_p95")),
            _fmt_ms(row.get("latency_ms_p99")),
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: rich would squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table if rows else f"{title}: no requests in this window.")
    total = data["total"] or {}
    if total.get("unpriced_requests"):
        unpriced_tokens = total.get("unpriced_input_tokens", 0) + total.get("unpriced_output_tokens", 0)
        console.print(
            f"cost incomplete: {total['unpriced_requests']:,} of {total['requests']:,} requests have no "
            f"known cost ({unpriced_tokens:,} tokens); the cost shown is what the priced requests cost."
        )
    if data.get("cache"):
        console.print(cache_line(data["cache"]))
        for group in data.get("cache_groups", []):
            console.print(
                f"  {data['by']} {escape(group['key']) if group['key'] else '(none)'}: "
                + cache_line(group).removeprefix("cache: ")
            )


def cache_line(c: dict[str, Any]) -> str:
    unknown = c["saved_cost_unknown"]
    cost = f"${c['saved_cost_usd']:.4f}" + (f" (+{unknown:,} hits of unknown cost)" if unknown else "")
    return (
        f"cache: {c['hits']:,} hits of {c['lookups']:,} lookups ({100 * c['hit_rate']:.1f} %), saved "
        f"{c['saved_input_tokens']:,} tokens in, {c['saved_output_tokens']:,} out, {cost}"
    )
