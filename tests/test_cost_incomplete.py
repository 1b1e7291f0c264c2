"""Unknown cost is never shown as $0: `report` and the dashboard say "cost incomplete" with the unpriced
share, and show the units beside tokens (search units, images, cached tokens). Real ClickHouse (chdb or
the server), `report` as a subprocess, the dashboard in a real headless Chromium."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import msgspec

from cohere_gateway.consumers import schema
from cohere_gateway.consumers.http_api import ReadApi
from cohere_gateway.consumers.metrics import Metrics
from cohere_gateway.events import Event, Usage
from tests.fixtures.browser import Browser
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_storage import insert_events


def events() -> list[Event]:
    base = datetime.now(UTC) - timedelta(minutes=20)
    priced = [
        msgspec.structs.replace(
            make_event(i, base), outcome="ok", status_code=200, cost_usd=0.01, cost_source="pricing"
        )
        for i in range(6)
    ]
    unknown = msgspec.structs.replace(
        make_event(6, base),
        outcome="ok",
        status_code=200,
        model="command-z-unknown",
        usage=Usage(input_tokens=100, output_tokens=20),
        cost_usd=None,
        cost_source="unknown_model",
    )
    images = msgspec.structs.replace(
        make_event(7, base),
        endpoint="embed",
        outcome="ok",
        status_code=200,
        usage=Usage(input_tokens=5, images=2, image_tokens=3000, embeddings=2),
        cost_usd=0.002,
        cost_source="pricing",
    )
    return [*priced, unknown, images]


def test_report_says_cost_incomplete(storage: Storage) -> None:
    backend = storage.open()
    schema.migrate(backend)
    insert_events(backend, events(), "incomplete")
    storage.close()
    base = [sys.executable, "-m", "cohere_gateway.cli", "report", *storage.cli_args, "--since", "1h"]
    wide = os.environ | {"COLUMNS": "220"}
    table = subprocess.run([*base, "--by", "model"], capture_output=True, text=True, timeout=120, env=wide)
    assert table.returncode == 0, table.stderr
    assert "cost incomplete: 1 of 8 requests have no known cost (120 tokens)" in table.stdout
    assert "unknown" in table.stdout  # the unknown model's own row: no cost, not 0.0000
    assert "≥ 0.0620" in table.stdout  # the total is a lower bound


def test_dashboard_says_cost_incomplete_and_shows_units(storage: Storage, browser: Browser) -> None:
    backend = storage.open()
    schema.migrate(backend)
    insert_events(backend, events(), "incomplete")
    api = ReadApi(backend, Metrics(storage_ready=True, kafka_ready=True), "127.0.0.1", 0)
    api.start()
    try:
        browser.goto(api.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
        note = browser.js("document.querySelector('#c-cost-note').textContent")
        assert note.startswith("cost incomplete: 1 of 8 requests (12.5%) unpriced, 120 tokens"), note
        assert browser.js("document.querySelector('#c-cost').textContent") == "≥ $0.062000"
        units = browser.js("document.querySelector('#c-units').textContent")
        assert "2 images" in units and "3,000 image tokens" in units, units
        cells = browser.js("[...document.querySelectorAll('#breakdown td')].map(td => td.textContent)")
        assert "unknown" in cells  # the unknown model's row
    finally:
        api.stop()
