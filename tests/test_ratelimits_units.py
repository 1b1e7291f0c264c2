"""Sliding windows of tokens and cost and rolling budgets, counted by the real `limits` library storage
(in memory here; Redis in tests/test_ratelimits.py). The request's time is the limiter's parameter
(`admit(..., now)`: the gateway passes the request's start time), so these tests move the clock
themselves instead of sleeping; every window is far longer than a test takes, so the storage's own
expiries (real time) never interfere."""

from __future__ import annotations

import asyncio

import pytest

from cohere_gateway.addons import gateway_config as gc
from cohere_gateway.addons import ratelimits as rl

W = 60
T0 = 1_000_000 * W  # the start of window 1000000


def admit(
    limiter: rl.RateLimiter, rule: rl.RateRule, cost: int, now: float, who: str = "gw"
) -> rl.Reservation | rl.Refusal:
    key = rl.identity(rule, "acct", who, None, {}, None, now)
    return asyncio.run(limiter.admit((rule,), [key], [cost], now))


def test_a_rolling_budget_frees_as_spend_slides_out() -> None:
    limiter = rl.RateLimiter()
    rule = rl.RateRule(10, W, "cost", technique="sliding", rolling=True)
    assert isinstance(admit(limiter, rule, 4, T0), rl.Reservation)
    assert isinstance(admit(limiter, rule, 4, T0 + 1), rl.Reservation)
    refused = admit(limiter, rule, 4, T0 + 2)
    assert isinstance(refused, rl.Refusal) and refused.remaining == 2
    assert "in the last 60 s (rolling" in refused.message()
    # the next window: the 8 spent weigh 8 x (the share of the old window still in the last 60 s)
    assert isinstance(admit(limiter, rule, 4, T0 + W + 1), rl.Refusal)  # 7 + 4 > 10
    # the refusal said when it fits: a quarter into the next window 8 x 0.75 + 4 = 10
    assert refused.reset_at == T0 + W + W / 4
    assert isinstance(admit(limiter, rule, 4, refused.reset_at), rl.Reservation)
    # two windows on, nothing of the first is left
    for i in range(2):
        assert isinstance(admit(limiter, rule, 5, T0 + 3 * W + i), rl.Reservation)
    assert isinstance(admit(limiter, rule, 1, T0 + 3 * W + 2), rl.Refusal)


def test_a_sliding_token_limit_settles_into_the_window_it_was_taken_in() -> None:
    limiter = rl.RateLimiter()
    rule = rl.RateRule(100, W, "tokens", technique="sliding")
    first = admit(limiter, rule, 60, T0 + W - 1)  # reserved at the end of one window...
    assert isinstance(first, rl.Reservation)
    assert isinstance(admit(limiter, rule, 60, T0 + W - 0.5), rl.Refusal)
    # ...settled to 20 billed tokens in the next: the 40 given back are the old window's
    asyncio.run(limiter.settle(first, 20, None))
    now = T0 + W + W / 2  # the old window weighs half: 10
    assert isinstance(admit(limiter, rule, 90, now), rl.Reservation)  # 10 + 90 = 100
    assert isinstance(admit(limiter, rule, 1, now), rl.Refusal)
    # a reservation billed more than reserved counts the excess, even past the limit
    limiter = rl.RateLimiter()
    held = admit(limiter, rule, 50, T0)
    assert isinstance(held, rl.Reservation)
    asyncio.run(limiter.settle(held, 120, None))
    assert isinstance(admit(limiter, rule, 1, T0 + 1), rl.Refusal)


def test_a_refused_sliding_rule_gives_back_what_the_rules_before_it_took() -> None:
    limiter = rl.RateLimiter()
    tokens = rl.RateRule(100, W, "tokens")
    cost = rl.RateRule(5, W, "cost", technique="sliding")
    ids = [rl.identity(r, "acct", "gw", None, {}, None, T0) for r in (tokens, cost)]
    assert isinstance(asyncio.run(limiter.admit((tokens, cost), ids, [40, 5], T0)), rl.Reservation)
    assert isinstance(asyncio.run(limiter.admit((tokens, cost), ids, [40, 5], T0)), rl.Refusal)
    # the token rule kept only the admitted request's 40: 60 more fit
    assert isinstance(asyncio.run(limiter.admit((tokens,), ids[:1], [60], T0)), rl.Reservation)


def test_rolling_budgets_and_sliding_token_and_cost_rules_in_the_configuration() -> None:
    text = (
        '[gateways."a/b"]\n'
        'rate_limits = [{ limit = 500, window = 60, unit = "tokens", technique = "sliding" },'
        ' { limit = 0.5, window = 3600, unit = "cost", technique = "sliding" }]\n'
        'budgets = [{ usd = 20, rolling = 86400, key = "metadata.user" }]\n'
    )
    policy = gc.parse(text, "g.toml", gc.GatewayPolicy()).resolve("a", "b")
    assert [(r.unit, r.technique, r.counter) for r in policy.rate_limits] == [
        ("tokens", "sliding", True), ("cost", "sliding", True)
    ]  # fmt: skip
    (budget,) = policy.budgets
    assert (budget.limit, budget.window_s, budget.technique, budget.rolling, budget.aligned) == (
        20_000_000, 86400, "sliding", True, False
    )  # fmt: skip
    # a rolling budget and an equal sliding cost limit are two counters
    twin = rl.RateRule(budget.limit, 86400, "cost", technique="sliding", key="metadata.user")
    meta = {"user": "u"}
    assert rl.identity(budget, "a", "b", None, meta) != rl.identity(twin, "a", "b", None, meta)


@pytest.mark.parametrize(
    "snippet",
    ['budgets = [{ usd = 5, rolling = 60, period = "day" }]', "budgets = [{ usd = 5, rolling = 0 }]"],
)
def test_a_rolling_budget_names_one_window(snippet: str) -> None:
    with pytest.raises(gc.ConfigError) as err:
        gc.parse(f'[gateways."a/b"]\n{snippet}\n', "g.toml", gc.GatewayPolicy())
    assert "g.toml:2" in str(err.value) and ("rolling" in str(err.value))


def test_each_key_names_its_counter() -> None:
    """account: one counter for all the account's gateways; gateway, model, api_key, metadata: one per
    gateway (and value); a request without the key's value is not under the rule."""
    limiter = rl.RateLimiter()
    ids = {}
    for key in ("account", "gateway", "model", "api_key", "metadata.team"):
        rule = rl.RateRule(1, W, key=key)
        ids[key] = [rl.identity(rule, "acct", g, fp, meta, model, T0)
                    for g, fp, meta, model in (("gw1", "fp1", {"team": "a"}, "m1"),
                                               ("gw2", "fp1", {"team": "a"}, "m1"),
                                               ("gw1", "fp2", {"team": "b"}, "m2"),
                                               ("gw1", None, {}, "m1"))]  # fmt: skip
        first, other_gateway, other_value, missing = ids[key]
        assert isinstance(asyncio.run(limiter.admit((rule,), [first], [1], T0)), rl.Reservation)
        assert isinstance(asyncio.run(limiter.admit((rule,), [first], [1], T0)), rl.Refusal)
        shared = key == "account"
        assert isinstance(asyncio.run(limiter.admit((rule,), [other_gateway], [1], T0)),
                          rl.Refusal if shared else rl.Reservation)  # fmt: skip
        if key not in ("account", "gateway"):
            assert isinstance(asyncio.run(limiter.admit((rule,), [other_value], [1], T0)), rl.Reservation)
        if key in ("api_key", "metadata.team"):
            assert missing is None


def test_a_client_chosen_model_or_metadata_value_keys_a_counter_at_a_bounded_size() -> None:
    """The request body's model and the client's metadata become part of a counter's key (in memory or in
    Redis): a megabyte-long one must not become a megabyte-long key, yet two values stay two counters."""
    by_model = rl.RateRule(100, 60, "tokens", key="model")
    by_user = rl.RateRule(100, 60, "requests", key="metadata.user")
    for rule, model, meta in ((by_model, "m" * 1_000_000, {}), (by_user, None, {"user": "u" * 1_000_000})):
        key = rl.identity(rule, "a", "b", None, meta, model)
        assert key is not None and sum(map(len, key)) < 1000
    long_a, long_b = "x" * 5000 + "a", "x" * 5000 + "b"
    keys = {rl.identity(by_model, "a", "b", None, {}, model) for model in (long_a, long_b)}
    assert len(keys) == 2
    assert rl.identity(by_model, "a", "b", None, {}, "command-r")[-1] == "command-r"  # short ones as they are
