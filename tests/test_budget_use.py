"""The read side shows each budget's use: the budgets of the gateway configuration file (read by the
shared cohere_gateway.gateway_file, never through addons/), resolved per gateway as the gateway resolves
them, their use recomputed from the raw events in each budget's window. Real ClickHouse (chdb and the
server), the read API over HTTP, the dashboard in a real headless Chromium. The recomputation here is
written out independently of consumers/queries.py: periods by hand, rolling windows as the sliding
window counter the gateway enforces (the previous window weighted by its share still inside)."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import pytest

from cohere_gateway import gateway_file
from cohere_gateway.consumers import queries
from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.http_api import ReadApi
from cohere_gateway.consumers.metrics import Metrics
from cohere_gateway.events import Event
from tests.fixtures.browser import Browser
from tests.fixtures.clickhouse import make_event
from tests.fixtures.gateway import EventReader, start_gateway
from tests.test_storage import insert_events

CONFIG = """
[gateways."acme/*"]
budgets = [{ usd = 1, period = "day" }, { usd = 0.5, rolling = 3600, key = "metadata.user" }]
[gateways."acme/prod"]
budgets = [{ usd = 2, period = "month", key = "account" }]
[gateways."acme/dev"]
log_payloads = true                  # no budgets of its own: acme/*'s apply
[gateways."beta/*"]
budgets = [{ usd = 3, period = "month", key = "account" }]
tokens_env = ["NOT_SET_ANYWHERE"]    # the gateway's secrets: the read side never resolves them
provider_key = { env = "NOT_SET_EITHER" }
"""

NOW = datetime.now(UTC).replace(microsecond=0)

# (account, gateway, seconds before NOW, cost or None for unknown, metadata user or None)
SPEC = [
    ("acme", "dev", 10, 0.1, "alice"),
    ("acme", "dev", 2 * 3600, 0.2, "alice"),
    ("acme", "dev", 26 * 3600, 0.3, "alice"),
    ("acme", "dev", 300, 0.01, None),
    ("acme", "staging", 1800, 0.05, "bob"),
    ("acme", "staging", 2400, None, "bob"),  # unknown cost: never $0
    ("acme", "prod", 3600, 0.4, "carol"),
    ("acme", "prod", 20 * 86400, 0.6, None),
    ("beta", "x", 3600, 0.7, None),
    ("beta", "y", 7200, 0.8, None),
    ("beta", "y", 40 * 86400, 5.0, None),
    ("other", "z", 60, 1.0, None),  # no budget
]


def events() -> list[Event]:
    out = []
    for i, (account, gateway, ago, cost, user) in enumerate(SPEC):
        start = NOW - timedelta(seconds=ago)
        out.append(
            msgspec.structs.replace(
                make_event(i, start),
                start_time=start,
                end_time=start + timedelta(milliseconds=5),
                account_id=account,
                gateway_id=gateway,
                cost_usd=cost,
                cost_source="pricing" if cost is not None else "unknown_model",
                metadata={"user": user} if user else {},
            )
        )
    return out


def spent(evs: list[Event], since: datetime, until: datetime) -> tuple[float, int]:
    inside = [e for e in evs if since <= e.start_time <= until]
    return sum(e.cost_usd or 0.0 for e in inside), sum(e.cost_usd is None for e in inside)


def expected(now: datetime) -> dict[tuple[str, str | None, str, str | None], tuple[float, int]]:
    """(account, gateway or None for the account's, window, value) -> (used USD, unknown-cost requests)."""
    evs = events()
    day = now.replace(hour=0, minute=0, second=0)
    month = day.replace(day=1)
    hour = now.replace(minute=0, second=0)  # rolling windows of 3600 s are the hours
    weight = 1 - (now - hour) / timedelta(hours=1)
    out: dict[tuple[str, str | None, str, str | None], tuple[float, int]] = {}

    def put(key: tuple[str, str | None, str, str | None], use: tuple[float, int], n: int) -> None:
        if n:  # a counter with no request in its window has no row
            out[key] = use

    for gateway in ("dev", "staging"):
        mine = [e for e in evs if (e.account_id, e.gateway_id) == ("acme", gateway)]
        put(
            ("acme", gateway, "day", None),
            spent(mine, day, now),
            len([e for e in mine if e.start_time >= day]),
        )
        for user in ("alice", "bob"):
            theirs = [e for e in mine if e.metadata.get("user") == user]
            cur, cur_unknown = spent(theirs, hour, now)
            before, before_unknown = spent(
                theirs, hour - timedelta(hours=1), hour - timedelta(milliseconds=1)
            )
            n = len([e for e in theirs if e.start_time >= hour - timedelta(hours=1)])
            put(
                ("acme", gateway, "last 3600 s", user),
                (before * weight + cur, cur_unknown + before_unknown),
                n,
            )
    prod = [e for e in evs if (e.account_id, e.gateway_id) == ("acme", "prod")]
    put(
        ("acme", None, "month", None),
        spent(prod, month, now),
        len([e for e in prod if e.start_time >= month]),
    )
    beta = [e for e in evs if e.account_id == "beta"]
    put(
        ("beta", None, "month", None),
        spent(beta, month, now),
        len([e for e in beta if e.start_time >= month]),
    )
    return out


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateways.toml"
    path.write_text(CONFIG)
    return path


def test_each_budgets_use_equals_a_recomputation_from_the_events(
    clickhouse_backend: Backend, config: Path
) -> None:
    insert_events(clickhouse_backend, events(), "budgets")
    budget_file = gateway_file.read_budgets(config)
    for now in (NOW, NOW + timedelta(minutes=17)):  # another point of the rolling windows
        rows = queries.budgets(clickhouse_backend, budget_file, now=now)
        got = {
            (r["account_id"], r["gateway_id"], r["window"], r["value"]): (
                r["used_usd"],
                r["unpriced_requests"],
            )
            for r in rows
        }
        want = expected(now)
        assert got.keys() == want.keys()
        for key, (used, unknown) in want.items():
            assert math.isclose(got[key][0], used, abs_tol=1e-9), (key, got[key], used)
            assert got[key][1] == unknown, key
    rows = queries.budgets(clickhouse_backend, budget_file, now=NOW)
    bob = next(r for r in rows if r["value"] == "bob")
    # the unknown cost is counted apart and makes the figure a lower bound, never a $0 request
    assert bob["unpriced_requests"] == 1 and bob["cost_complete"] is False
    beta = next(r for r in rows if r["account_id"] == "beta")
    assert beta["gateways"] == ["x", "y"] and beta["limit_usd"] == 3.0 and beta["key"] == "account"
    assert all(r["account_id"] != "other" for r in rows)
    # scoped like the other queries
    only = queries.budgets(clickhouse_backend, budget_file, now=NOW, gateway_id="staging")
    assert {r["gateway_id"] for r in only} == {"staging"}


def test_the_read_api_and_dashboard_show_budgets(
    clickhouse_backend: Backend, config: Path, browser: Browser
) -> None:
    insert_events(clickhouse_backend, events(), "budgets")
    ready = Metrics(storage_ready=True, kafka_ready=True)
    plain = ReadApi(clickhouse_backend, ready, "127.0.0.1", 0)
    api = ReadApi(clickhouse_backend, ready, "127.0.0.1", 0, gateway_config=config)
    plain.start()
    api.start()
    try:
        assert httpx.get(plain.url + "/api/budgets", timeout=10).json() == {"source": None, "budgets": []}
        body = httpx.get(api.url + "/api/budgets", params={"account_id": "acme"}, timeout=10).json()
        assert body["source"] == str(config)
        assert body["budgets"] and {r["account_id"] for r in body["budgets"]} == {"acme"}
        browser.goto(api.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
        assert browser.js("document.querySelector('#budgets-section').hidden") is False
        cells = "[...tr.cells].map(td => td.textContent)"
        rows = browser.js(f"[...document.querySelectorAll('#budgets tbody tr')].map(tr => {cells})")
        bob = next(r for r in rows if r[1] == "metadata.user = bob")
        assert bob[0] == "acme / staging" and bob[2] == "last 3600 s"
        assert bob[3].startswith("≥ $") and bob[6] == "1 requests"  # unknown cost said, not $0
        beta = next(r for r in rows if r[0] == "beta (account)")
        assert beta[4] == "$3.00"
        # a bad edit of the file: the read side says so, it does not show stale or no budgets silently
        config.write_text('[gateways."acme/*"]\nbudgets = [{ usd = -1, period = "day" }]\n')
        resp = httpx.get(api.url + "/api/budgets", timeout=10)
        assert resp.status_code == 503 and "budgets[0].usd" in resp.json()["error"]
        # without a file the dashboard hides the panel
        browser.goto(plain.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard without budgets")
        assert browser.js("document.querySelector('#budgets-section').hidden") is True
    finally:
        api.stop()
        plain.stop()


E2E = """
[gateways."acct/*"]
budgets = [{ usd = 0.0003, period = "day", key = "model" },
           { usd = 0.0002, rolling = 3600, key = "metadata.user" }]
"""


@pytest.mark.parametrize("storage", ["chdb"], indirect=True)
def test_the_use_shown_is_what_the_gateway_counted(
    clickhouse_backend: Backend,
    tmp_path: Path,
    emulator_url: str,
    kafka_bootstrap: str,
    gateway_topic: str,
    gateway_events: EventReader,
) -> None:
    """A real gateway spends its budgets until it refuses; its events (from Kafka) stored; the read side,
    given the same file, shows per counter the spend of those events, next to the limit that refused."""
    config = tmp_path / "gateways.toml"
    config.write_text(E2E)
    gw = start_gateway(emulator_url, kafka_bootstrap, gateway_topic, transparent=False, config=str(config))
    run = uuid.uuid4().hex
    refusals: dict[str, str] = {}
    count = 0
    try:
        for user in ("alice", "bob"):
            for i in range(40):
                body = {"model": "command-r", "messages": [{"role": "user", "content": f"{run} {i}"}],
                        "max_tokens": 60}  # fmt: skip
                headers = {"Authorization": "Bearer key-e2e", "cf-aig-event-id": f"{run}-{user}-{i}",
                           "cf-aig-metadata": f'{{"user": "{user}-{run}"}}'}  # fmt: skip
                resp = httpx.post(gw.base("acct", "e2e") + "/cohere/v2/chat", json=body, timeout=30,
                                  headers=headers)  # fmt: skip
                count += 1
                if resp.status_code == 429:
                    refusals[user] = resp.json()["message"]
                    break
                assert resp.status_code == 200, resp.text
    finally:
        gw.stop()
    assert "in the last 3600 s" in refusals["alice"]  # her own rolling budget: $0.0002
    assert "this day" in refusals["bob"]  # the model's day: $0.0003 for both
    sent = gateway_events.wait_until(lambda e: (e.client_event_id or "").startswith(run), count)
    insert_events(clickhouse_backend, sent, "e2e-" + run)
    rows = queries.budgets(clickhouse_backend, gateway_file.read_budgets(config), gateway_id="e2e")
    mine = {r["value"]: r for r in rows if r["value"] in ("command-r", f"alice-{run}", f"bob-{run}")}
    ok = [e for e in sent if e.status_code == 200]
    assert all(e.cost_usd is not None for e in ok)
    model = mine["command-r"]
    assert math.isclose(model["used_usd"], sum(e.cost_usd or 0 for e in sent), abs_tol=1e-12)
    # the gateway refused only once reservations reached the budget: the spend shown is near it, within it
    assert 0.5 < model["used_share"] <= 1.0 and model["unpriced_requests"] == 0
    alice = mine[f"alice-{run}"]
    assert alice["used_usd"] <= 0.0002 + 1e-12 and alice["used_share"] > 0.5
