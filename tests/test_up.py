"""The main job end to end: `cohere-gateway up --demo` brings up Kafka, the emulator, the consumer with
its dashboard and the gateway, drives SDK traffic through them, and the dashboard in a real headless
Chromium shows what `report --json` says. One SIGINT stops everything and loses nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cohere_gateway.settings import DEFAULT_PARTITIONS, DEFAULT_TOPIC
from tests.fixtures.browser import Browser
from tests.fixtures.kafka import free_port_pair, topic_partitions
from tests.fixtures.processes import stop

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
DEMO_CALLS = 40


@dataclass
class Up:
    proc: subprocess.Popen[str]
    data_dir: Path
    dashboard: str
    gateway: str
    kafka_bootstrap: str

    def api(self, name: str, **params: str) -> dict:
        query = "&".join(f"{k}={v}" for k, v in {"since": "1h", **params}.items())
        with urllib.request.urlopen(f"{self.dashboard}/api/{name}?{query}", timeout=10) as resp:
            return json.load(resp)

    def report(self) -> dict:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "cohere_gateway.cli",
                "report",
                "--json",
                "--by",
                "none",
                "--data-dir",
                str(self.data_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    gateway_port, dashboard_port, kafka_port = free_port_pair(), free_port_pair(), free_port_pair()
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cohere_gateway.cli",
            "up",
            "--demo",
            "--demo-requests",
            str(DEMO_CALLS),
            "--demo-rate",
            "20",
            "--port",
            str(gateway_port),
            "--dashboard-port",
            str(dashboard_port),
            "--kafka-port",
            str(kafka_port),
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stack = Up(
        proc,
        data_dir,
        f"http://127.0.0.1:{dashboard_port}",
        f"http://127.0.0.1:{gateway_port}",
        f"127.0.0.1:{kafka_port}",
    )
    try:
        yield stack
    finally:
        stop(proc, signal.SIGINT, 90)


def wait_for_requests(stack: Up, n: int, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    total: dict = {}
    while time.monotonic() < deadline:
        if stack.proc.poll() is not None:
            pytest.fail(f"`up` exited with {stack.proc.returncode}:\n{stack.proc.stdout.read()}")
        try:
            total = stack.api("summary", by="none")["total"] or {}
        except OSError:
            total = {}
        if total.get("requests") == n:
            return total
        time.sleep(0.5)
    pytest.fail(f"the dashboard never showed {n} requests (last: {total})")


def test_up_demo_dashboard_matches_report(up: Up, browser: Browser) -> None:
    total = wait_for_requests(up, DEMO_CALLS)
    # `up` created the topic before the gateway's first event: --partitions, not the broker's default 3.
    assert topic_partitions(up.kafka_bootstrap, DEFAULT_TOPIC) == DEFAULT_PARTITIONS
    assert total["input_tokens"] > 0 and total["output_tokens"] > 0 and total["latency_ms_p50"] > 0

    # `report` finds the running consumer (it owns the embedded ClickHouse) and asks it.
    reported = up.report()["total"]
    assert reported["requests"] == DEMO_CALLS
    assert (reported["input_tokens"], reported["output_tokens"]) == (
        total["input_tokens"],
        total["output_tokens"],
    )

    browser.goto(up.dashboard + "/")
    browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
    assert browser.js("document.querySelector('#c-requests').textContent") == str(DEMO_CALLS)
    assert browser.js("document.querySelector('#c-tokens').textContent") == (
        f"{reported['input_tokens']:,} / {reported['output_tokens']:,}"
    )
    for chart in ("chart-requests", "chart-tokens", "chart-cost", "chart-latency"):
        drawn = browser.js(
            f"(() => {{ const c = Chart.getChart(document.getElementById('{chart}'));"
            " return !!c && c.data.datasets[0].data.some(v => v > 0) && c.width > 0; })()"
        )
        assert drawn, f"{chart} has no data drawn"

    # Filtering the recent-requests table by a model shows only that model's requests.
    rows_before = browser.js("document.querySelectorAll('#recent tbody tr').length")
    assert rows_before == DEMO_CALLS
    model = browser.wait_for(
        "[...document.querySelectorAll('#filters [name=model] option')].map(o => o.value).find(v => v)",
        what="model filter options",
    )
    browser.js(
        "(() => { const s = document.querySelector('#filters [name=model]');"
        f" s.value = {json.dumps(model)}; s.dispatchEvent(new Event('change', {{bubbles: true}})); }})()"
    )
    models_shown = browser.wait_for(
        "(() => { const cells = [...document.querySelectorAll('#recent tbody tr')].map(r => r.children[3]"
        f"?.textContent); return cells.length < {rows_before} && cells; }})()",
        what="the filtered table",
    )
    assert set(models_shown) == {model}

    # One event's detail opens with the stored event.
    event_id = browser.js(
        "(() => { const row = document.querySelector('#recent tbody tr'); row.click(); return true; })()"
    )
    assert event_id
    detail = browser.wait_for(
        "(() => { const t = document.querySelector('#detail-body').textContent;"
        " return document.querySelector('#detail').open && t.startsWith('{') && t; })()",
        what="the event detail",
    )
    event = json.loads(detail)
    assert event["model"] == model and event["event_id"]
    assert "authorization" not in detail.lower() and "demo-key-" not in detail  # fingerprints only

    shot = browser.screenshot(ARTIFACTS / "dashboard.png")
    assert shot.stat().st_size > 10_000

    # One Ctrl-C stops every part; afterwards the embedded store still holds exactly the demo's calls.
    up.proc.send_signal(signal.SIGINT)
    output, _ = up.proc.communicate(timeout=120)
    assert up.proc.returncode == 0, output
    assert "Stopped." in output
    assert up.report()["total"]["requests"] == DEMO_CALLS
