"""The retry policy's arithmetic and parsing, and the configuration keys of retries, timeouts and
gateway-held keys (pure functions: nothing to run)."""

from __future__ import annotations

import email.utils
from pathlib import Path

import pytest

from cohere_gateway.addons import gateway_config as gc
from cohere_gateway.addons.retries import (
    RetryPolicy,
    backoff_delay_s,
    next_delay_s,
    parse_retry_headers,
    retry_after_s,
    retryable,
)
from cohere_gateway.addons.routing import RouteError


def test_backoffs() -> None:
    for backoff, delays in (
        ("constant", [0.2, 0.2, 0.2, 0.2]),
        ("linear", [0.2, 0.4, 0.6, 0.8]),
        ("exponential", [0.2, 0.4, 0.8, 1.6]),
    ):
        policy = RetryPolicy(max_attempts=5, delay_ms=200, backoff=backoff)
        assert [round(backoff_delay_s(policy, n), 6) for n in range(1, 5)] == delays


def test_retry_after_is_honoured_up_to_the_longest_wait() -> None:
    policy = RetryPolicy(max_attempts=3, delay_ms=100)
    assert next_delay_s(policy, 1, None) == 0.1
    assert next_delay_s(policy, 1, 2.0) == 2.0
    assert next_delay_s(policy, 1, 0.01) == 0.1
    assert next_delay_s(policy, 1, 60.0) is None  # longer than the gateway waits: the client gets the 429
    assert retry_after_s("3", 0) == 3.0
    assert retry_after_s(email.utils.formatdate(1000.0 + 4, usegmt=True), 1000.0) == 4.0
    for bad in (None, "", "soon", "-1", "nan", "inf"):
        assert retry_after_s(bad, 0) is None


def test_what_is_retried() -> None:
    assert [s for s in (200, 400, 401, 404, 408, 422, 429, 500, 502, 503, 504) if retryable(s)] == [
        429, 500, 502, 503, 504
    ]  # fmt: skip


def test_headers_override_the_gateway_default_within_cloudflares_bounds() -> None:
    base = RetryPolicy(max_attempts=2, delay_ms=100, backoff="linear", timeout_ms=5000)
    assert parse_retry_headers({}, base) == base
    assert not RetryPolicy().active and base.active
    got = parse_retry_headers(
        {"cf-aig-max-attempts": "5", "cf-aig-retry-delay": "5000", "cf-aig-backoff": "Exponential",
         "cf-aig-request-timeout": " 250 "}, base)  # fmt: skip
    assert got == RetryPolicy(max_attempts=5, delay_ms=5000, backoff="exponential", timeout_ms=250)
    for name, value in (("cf-aig-max-attempts", "6"), ("cf-aig-retry-delay", "-1"),
                        ("cf-aig-retry-delay", "1e3"), ("cf-aig-request-timeout", "١٢"),
                        ("cf-aig-backoff", "random")):  # fmt: skip
        with pytest.raises(RouteError) as err:
            parse_retry_headers({name: value}, base)
        assert err.value.status == 400 and name in err.value.message


def test_configuration_keys(tmp_path: Path) -> None:
    keyfile = tmp_path / "cohere.key"
    keyfile.write_text("file-key-0123456789abcdef\n")
    text = (
        '[gateways."*/*"]\nrequest_timeout = 30000\nretries = { max_attempts = 2 }\n'
        '[gateways."acme/*"]\nretries = { delay = 250, backoff = "exponential" }\n'
        f'provider_key = {{ file = "{keyfile}" }}\n'
        '[gateways."acme/env"]\nprovider_key = { env = "ACME_KEY" }\n'
    )
    cfg = gc.parse(text, "g.toml", gc.GatewayPolicy(), env={"ACME_KEY": "env-key-0123456789abcdef"})
    policy = cfg.resolve("acme", "prod")
    assert policy.retry == RetryPolicy(max_attempts=2, delay_ms=250, backoff="exponential", timeout_ms=30000)
    assert policy.provider_key is not None and policy.provider_key.key == "file-key-0123456789abcdef"
    assert cfg.resolve("acme", "env").provider_key.key == "env-key-0123456789abcdef"  # type: ignore[union-attr]
    assert cfg.resolve("other", "x").provider_key is None
    # a held key never shows in what the configuration prints
    assert "0123456789abcdef" not in repr(policy) + str(policy.provider_key) + repr(cfg.entries)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [("retries = { max_attempts = 6 }", "an integer 1..5"),
     ("retries = { delay = 9000 }", "0..5000"),
     ("retries = { backoff = \"fast\" }", "one of constant, linear, exponential"),
     ("retries = { tries = 2 }", "unknown key; allowed: max_attempts, delay, backoff"),
     ("request_timeout = 0", "milliseconds 1.."),
     ("provider_key = \"abc\"", '{ env = "VARIABLE" } or { file = "PATH" }'),
     ("provider_key = { env = \"UNSET_VARIABLE_X\" }", "env UNSET_VARIABLE_X is not set or empty"),
     ("provider_key = { file = \"/nonexistent/key\" }", "cannot read /nonexistent/key"),
     ("provider_key = { env = \"SHORT\" }", "does not hold an API key")],
)  # fmt: skip
def test_configuration_errors_name_the_key(snippet: str, message: str) -> None:
    with pytest.raises(gc.ConfigError) as err:
        gc.parse(f'[gateways."a/b"]\n{snippet}\n', "g.toml", gc.GatewayPolicy(), env={"SHORT": "abc"})
    assert message in str(err.value) and "g.toml:2" in str(err.value)
    if "SHORT" in snippet:  # what the variable holds is never quoted
        assert "abc" not in str(err.value)


def test_rate_limit_and_budget_rules() -> None:
    from cohere_gateway.addons import ratelimits as rl

    text = (
        '[gateways."a/b"]\nrate_limits = [{ limit = 10, window = 60 }, '
        '{ limit = 0.5, window = 3600, unit = "cost", key = "model" }]\n'
        'budgets = [{ usd = 20, period = "day", key = "metadata.user" }, { usd = 1, window = 3600 }]\n'
    )
    policy = gc.parse(text, "g.toml", gc.GatewayPolicy()).resolve("a", "b")
    assert policy.rate_limits == (rl.RateRule(10, 60), rl.RateRule(500_000, 3600, "cost", key="model"))
    day, hourly = policy.budgets
    assert (day.limit, day.window_s, day.period, day.aligned, day.key) == (
        20_000_000, 86400, "day", True, "metadata.user"
    )  # fmt: skip
    # a budget's counter is its period's: 2026-03-31 23:59:59 UTC and one second later differ
    assert rl.period_of(day, 1775001599.0) == ("2026-03-31", 1775001600.0)
    assert rl.period_of(day, 1775001600.0)[0] == "2026-04-01"
    month = rl.RateRule(1, 31 * 86400, "cost", period="month", aligned=True)
    assert rl.period_of(month, 1775001600.0 - 1) == ("2026-03-01", 1775001600.0)
    week = rl.RateRule(1, 7 * 86400, "cost", period="week", aligned=True)
    assert rl.period_of(week, 1775001600.0)[0] == "2026-03-30"  # the Monday of that week
    assert rl.period_of(hourly, 7200.5) == ("2", 10800)


@pytest.mark.parametrize(
    ("snippet", "message"),
    [("rate_limits = [{ limit = 10 }]", "at least limit and window"),
     ("rate_limits = [{ limit = 1.5, window = 60 }]", "requests limits are whole numbers"),
     ("rate_limits = [{ limit = 5, window = 60, key = \"ip\" }]", "metadata.NAME"),
     ("rate_limits = [{ limit = 5, window = 60, per = 1 }]", "unknown key"),
     ("budgets = [{ usd = 5 }]", "one of period, window or rolling"),
     ("budgets = [{ usd = 5, period = \"year\" }]", "one of day, week, month"),
     ("budgets = [{ usd = -1, period = \"day\" }]", "a number of US dollars > 0")],
)  # fmt: skip
def test_rule_errors_name_the_key(snippet: str, message: str) -> None:
    with pytest.raises(gc.ConfigError) as err:
        gc.parse(f'[gateways."a/b"]\n{snippet}\n', "g.toml", gc.GatewayPolicy())
    assert message in str(err.value) and "g.toml:2" in str(err.value)


def test_attempts_are_stored_and_read_back(clickhouse_backend) -> None:  # type: ignore[no-untyped-def]
    """Migration 0008: the 1.3 fields survive the raw table on both backends (the consumer inserts every
    contract field, so without the columns every insert would fail)."""
    from datetime import UTC, datetime, timedelta

    from tests.fixtures.clickhouse import make_event
    from tests.test_storage import event_from_row, insert_events

    base = (datetime.now(UTC) - timedelta(days=1)).replace(second=0, microsecond=0)
    events = [
        make_event(0, base, attempts=3, attempt_statuses=[500, 0, 200]),
        make_event(1, base, attempts=None, attempt_statuses=[]),
    ]
    insert_events(clickhouse_backend, events, "attempts-1")
    rows = clickhouse_backend.query("SELECT * FROM events FINAL ORDER BY start_time")
    assert [event_from_row(r) for r in rows] == events
