"""`cohere-gateway report` as a real subprocess, opening the embedded data directory itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from cohere_gateway.consumers import schema
from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.http_api import ReadApi
from cohere_gateway.consumers.metrics import Metrics
from tests.fixtures.browser import Browser
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_storage import insert_events


def test_report_json_and_table_from_the_data_directory(storage: Storage) -> None:
    backend = storage.open()
    schema.migrate(backend)
    events = [make_event(i, datetime.now(UTC) - timedelta(minutes=20)) for i in range(90)]
    insert_events(backend, events, "r-1")
    storage.close()  # the report process opens the directory itself
    base = [sys.executable, "-m", "cohere_gateway.cli", "report", *storage.cli_args, "--since", "1h"]
    out = subprocess.run([*base, "--by", "endpoint", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["total"]["requests"] == 90
    assert {g["key"]: g["requests"] for g in data["groups"]} == {"chat": 30, "embed": 30, "rerank": 30}
    wide = os.environ | {"COLUMNS": "200"}
    table = subprocess.run([*base, "--by", "model"], capture_output=True, text=True, timeout=120, env=wide)
    assert table.returncode == 0 and "TOTAL" in table.stdout and "command-r" in table.stdout
    bad = subprocess.run([*base[:-1], "soon"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "duration 'soon' not understood" in bad.stderr


def cache_events() -> list:
    """One miss and three hits of one gateway and model, ten minutes ago."""
    base_time = datetime.now(UTC) - timedelta(minutes=10)
    same = {"account_id": "acme", "gateway_id": "prod", "model": "command-r", "outcome": "ok"}
    same |= {"status_code": 200, "error_type": None, "error_message": None}
    hit = {"cache_status": "HIT", "cost_usd": 0.0, "cost_source": "cache"}
    hit |= {"saved_input_tokens": 100, "saved_output_tokens": 50, "saved_cost_usd": 0.25}
    return [make_event(0, base_time, **same, cache_status="MISS")] + [
        make_event(i, base_time, **same, **hit) for i in (1, 2, 3)
    ]


def test_report_shows_cache_hit_rate_and_savings(storage: Storage) -> None:
    backend = storage.open()
    schema.migrate(backend)
    insert_events(backend, cache_events(), "r-cache")
    storage.close()
    base = [sys.executable, "-m", "cohere_gateway.cli", "report", *storage.cli_args, "--since", "1h"]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cache = json.loads(out.stdout)["cache"]
    assert (cache["lookups"], cache["hits"], cache["hit_rate"]) == (4, 3, 0.75)
    saved = (cache["saved_input_tokens"], cache["saved_output_tokens"], cache["saved_cost_usd"])
    assert saved == (300, 150, 0.75)
    table = subprocess.run([*base, "--by", "gateway_id"], capture_output=True, text=True, timeout=120)
    assert "cache: 3 hits of 4 lookups (75.0 %), saved 300 tokens in, 150 out, $0.7500" in table.stdout
    assert "gateway_id prod: 3 hits of 4 lookups" in table.stdout


def test_dashboard_shows_cache_hit_rate_and_savings(clickhouse_backend: Backend, browser: Browser) -> None:
    insert_events(clickhouse_backend, cache_events(), "d-cache")
    api = ReadApi(clickhouse_backend, Metrics(), "127.0.0.1", 0)
    api.start()
    try:
        browser.goto(api.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
        assert browser.js("document.querySelector('#c-cache').textContent") == "75.0% / $0.750000"
        browser.js("document.querySelector('#breakdown-tabs [data-by=cache]').click()")
        cells = (
            "[...document.querySelectorAll('#breakdown tbody tr:first-child td')].map(td => td.textContent)"
        )
        shown = "document.querySelector('#breakdown thead').textContent.includes('saved USD')"
        row = browser.wait_for(f"{shown} ? {cells} : null", what="the cache breakdown")
        assert row == ["command-r", "4", "3", "75.0%", "300", "150", "$0.750000", "0"]
    finally:
        api.stop()


def test_one_dashboard_refresh_asks_each_question_once(clickhouse_backend: Backend, browser: Browser) -> None:
    """The breakdown by model and the model filter's options are the same totals: one request, shared.
    At 50M events a totals query over 30 days is among the page's costliest (bench/read.py)."""
    insert_events(clickhouse_backend, cache_events(), "d-once")
    api = ReadApi(clickhouse_backend, Metrics(), "127.0.0.1", 0)
    api.start()
    try:
        browser.goto(api.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
        asked = browser.js(
            "performance.getEntriesByType('resource').map(e => new URL(e.name))"
            ".filter(u => u.pathname.startsWith('/api/')).map(u => u.pathname + u.search)"
        )
        assert asked.count("/api/totals?since=1h&by=model") == 1, asked
        assert len(asked) == len(set(asked)), asked
    finally:
        api.stop()
