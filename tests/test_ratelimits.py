"""Rate limits end to end: real gateway processes in front of the emulator, a real `redis-server` for
the shared counters, events from a real Kafka. Counts are exact: N allowed means N reached upstream."""

from __future__ import annotations

import concurrent.futures
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import pytest

from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.redis import start_redis

API_KEY = "key-" + uuid.uuid4().hex


def chat(gw: GatewayProcess, gateway: str, marker: str, **headers: str) -> httpx.Response:
    body = {"model": "command-r", "messages": [{"role": "user", "content": marker}], "max_tokens": 60}
    headers = {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": marker, **headers}
    return httpx.post(gw.base("acct", gateway) + "/cohere/v2/chat", json=body, timeout=30, headers=headers)


def reached_upstream(emulator_url: str, marker: str) -> int:
    entries = httpx.get(emulator_url + "/__emulator/requests", timeout=5).json()["requests"]
    return sum(1 for e in entries if marker in e["body"])


CONFIG = """
[gateways."acct/three"]
rate_limits = [{ limit = 3, window = 60 }]
[gateways."acct/per-user"]
rate_limits = [{ limit = 1, window = 60, key = "metadata.user" }]
[gateways."acct/sliding"]
rate_limits = [{ limit = 2, window = 1, technique = "sliding" }]
[gateways."acct/tokens"]
rate_limits = [{ limit = 400, window = 60, unit = "tokens" }]
[gateways."acct/budget"]
budgets = [{ usd = 0.0002, window = 5 }]
[gateways."acct/cost"]
rate_limits = [{ limit = 0.001, window = 60, unit = "cost", key = "model" }]
[gateways."acct/shared"]
rate_limits = [{ limit = 5, window = 60 }, { limit = 1000, window = 60, unit = "tokens" }]
[gateways."acct/sdk"]
rate_limits = [{ limit = 1, window = 2 }]
[gateways."acct/rolling"]
budgets = [{ usd = 0.0002, rolling = 4 }]
[gateways."acct/slide-cost"]
rate_limits = [{ limit = 0.005, window = 60, unit = "cost", technique = "sliding" }]
[gateways."acct/slide-tokens"]
rate_limits = [{ limit = SLIDE_TOKENS, window = 60, unit = "tokens", technique = "sliding" }]
"""


def token_body(marker: str) -> bytes:
    return json.dumps({"model": "command-r", "messages": [{"role": "user", "content": marker}],
                       "max_tokens": 50}).encode()  # fmt: skip


def token_marker(run: str, i: int) -> str:
    return f"tok-{run}-{i:02d}"  # one length for all: every request reserves the same tokens


# What one request of token_body reserves (its max_tokens + its input at 4 bytes a token + 1), and a
# sliding token limit of exactly five of them.
RESERVED = 50 + len(token_body(token_marker(uuid.uuid4().hex, 0))) // 4 + 1
CONFIG = CONFIG.replace("SLIDE_TOKENS", str(5 * RESERVED))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ratelimits") / "gateways.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def gw(emulator_url: str, kafka_bootstrap: str, gateway_topic: str, config: Path) -> Iterator[GatewayProcess]:
    g = start_gateway(emulator_url, kafka_bootstrap, gateway_topic, transparent=False, config=str(config))
    try:
        yield g
    finally:
        g.stop()


def test_a_limit_of_n_allows_exactly_n_and_never_contacts_upstream_beyond(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    marker = "three-" + uuid.uuid4().hex
    answers = [chat(gw, "three", f"{marker}-{i}") for i in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    refused = answers[3]
    assert "rate limit" in refused.json()["message"]
    assert refused.headers["x-ratelimit-limit"] == "3" and refused.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-reset"] == refused.headers["retry-after"]
    assert reached_upstream(emulator_url, marker) == 3
    events = gateway_events.wait_until(lambda e: (e.client_event_id or "").startswith(marker), 5)
    refusals = [e for e in events if e.status_code == 429]
    assert len(refusals) == 2
    assert {(e.outcome, e.error_type, e.attempts) for e in refusals} == {
        ("gateway_error", "rate_limited", None)
    }
    # the official SDK raises its typed error, with the gateway's retry-after
    co = cohere.ClientV2(api_key=API_KEY, base_url=gw.base("acct", "three") + "/cohere")
    with pytest.raises(cohere.errors.TooManyRequestsError) as err:
        co.chat(model="command-r", messages=[{"role": "user", "content": marker}],
                request_options={"max_retries": 0})  # fmt: skip
    assert err.value.status_code == 429 and int(err.value.headers["retry-after"]) >= 1


def test_limits_keyed_by_a_metadata_value(gw: GatewayProcess) -> None:
    marker = "user-" + uuid.uuid4().hex
    alice = {"cf-aig-metadata": f'{{"user": "alice-{marker}"}}'}
    bob = {"cf-aig-metadata": f'{{"user": "bob-{marker}"}}'}
    assert chat(gw, "per-user", marker + "1", **alice).status_code == 200
    assert chat(gw, "per-user", marker + "2", **alice).status_code == 429
    assert chat(gw, "per-user", marker + "3", **bob).status_code == 200
    # a request without the entry is not under the rule
    assert chat(gw, "per-user", marker + "4").status_code == 200
    assert chat(gw, "per-user", marker + "5").status_code == 200


def test_a_sliding_window_frees_as_it_slides(gw: GatewayProcess) -> None:
    marker = "slide-" + uuid.uuid4().hex
    assert [chat(gw, "sliding", f"{marker}{i}").status_code for i in range(3)] == [200, 200, 429]
    deadline = time.monotonic() + 10
    while chat(gw, "sliding", marker + "later").status_code == 429:
        assert time.monotonic() < deadline, "the window never slid"
        time.sleep(0.1)


def test_token_limits_reserve_before_and_settle_after(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    marker = "tokens-" + uuid.uuid4().hex
    stream = {"model": "command-r", "messages": [{"role": "user", "content": marker}], "max_tokens": 100,
              "stream": True}  # fmt: skip

    def one(i: int, slow: bool = False) -> int:
        headers = {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": f"{marker}-{i}"}
        if slow:  # all of the burst in flight together: the upstream answers after 800 ms
            headers["X-Emulator-Fault"] = "delay-ms=800"
        with httpx.stream("POST", gw.base("acct", "tokens") + "/cohere/v2/chat", json=stream, timeout=30,
                          headers=headers) as r:  # fmt: skip
            r.read()
            return r.status_code

    # 8 concurrent streams, each reserving its max_tokens (100) + its input: at most 3 fit in 400 at once
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda i: one(i, slow=True), range(8)))
    assert 1 <= burst.count(200) <= 3 and burst.count(429) >= 5
    # settled to what was billed (less than reserved), the window takes more requests afterwards
    later = [one(100 + i) for i in range(8)]
    assert later.count(200) >= 1
    admitted = burst.count(200) + later.count(200)
    events = gateway_events.wait_until(
        lambda e: (e.client_event_id or "").startswith(marker) and e.status_code == 200, admitted
    )
    billed = sum((e.usage.input_tokens or 0) + (e.usage.output_tokens or 0) for e in events)
    # never more than the limit: every admission had its worst case reserved
    assert 0 < billed <= 400
    assert reached_upstream(emulator_url, marker) == admitted


@pytest.fixture(scope="module")
def redis() -> Iterator[str]:
    with start_redis() as server:
        yield server.url


def test_two_gateways_sharing_a_redis_allow_exactly_n_together(
    emulator_url: str, config: Path, redis: str
) -> None:
    gws = [start_gateway(emulator_url, "", "unused", transparent=False, config=str(config), state_url=redis)
           for _ in range(2)]  # fmt: skip
    try:
        marker = "pair-" + uuid.uuid4().hex
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(
                pool.map(lambda i: chat(gws[i % 2], "shared", f"{marker}-{i}").status_code, range(12))
            )
        assert codes.count(200) == 5 and codes.count(429) == 7
        assert reached_upstream(emulator_url, marker) == 5
    finally:
        for g in gws:
            g.stop()


def test_workers_share_the_counters_through_redis_and_refuse_without(
    emulator_url: str, config: Path, redis: str
) -> None:
    fresh = redis.rsplit("/", 1)[0] + "/1"  # another database: the counters of the test above are spent
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(config), state_url=fresh,
                      workers=2)  # fmt: skip
    try:
        marker = "workers-" + uuid.uuid4().hex
        pids = set()

        def one(i: int) -> int:
            pids.add(httpx.get(g.url + "/healthz", timeout=5).json().get("pid"))
            return chat(
                g, "shared", f"{marker}-{i}"
            ).status_code  # a new connection each: spread over workers

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(one, range(14)))
        assert codes.count(200) == 5 and codes.count(429) == 9
        assert reached_upstream(emulator_url, marker) == 5
        assert len(pids) == 2
    finally:
        g.stop()
    # per-worker counters would allow limit x workers: without shared state the gateway refuses
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(config), workers=2)
    try:
        resp = chat(g, "shared", "no-state-" + uuid.uuid4().hex)
        assert resp.status_code == 503 and "--state-url" in resp.json()["message"]
    finally:
        g.stop()


def spend_until_refused(gw: GatewayProcess, gateway: str, marker: str) -> tuple[list[int], httpx.Response]:
    """Requests to `gateway` until its budget refuses one: every status, and the refusal."""
    codes = []
    for i in range(60):
        resp = chat(gw, gateway, f"{marker}-{i}")
        codes.append(resp.status_code)
        if resp.status_code == 429:
            break
    assert codes[0] == 200 and codes[-1] == 429, codes
    return codes, resp


def test_a_budget_stops_requests_once_spent_and_resumes_in_the_next_period(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    marker = "budget-" + uuid.uuid4().hex
    codes, resp = spend_until_refused(gw, "budget", marker)
    assert "budget of this gateway spent: $0.0002" in resp.json()["message"]
    assert 1 <= int(resp.headers["retry-after"]) <= 5
    assert float(resp.headers["x-ratelimit-limit"]) == 0.0002
    # the next period (windows of 5 s aligned to the epoch) takes requests again
    deadline = time.monotonic() + 15
    while chat(gw, "budget", f"{marker}-next").status_code == 429:
        assert time.monotonic() < deadline, "the budget never resumed"
        time.sleep(0.2)
    admitted = codes.count(200)
    events = gateway_events.wait_until(
        lambda e: (e.client_event_id or "").startswith(marker + "-") and e.status_code == 200, admitted + 1
    )
    spent: dict[int, float] = {}
    for e in events:
        assert e.cost_usd is not None and e.cost_usd > 0
        period = int(e.start_time.timestamp() // 5)
        spent[period] = spent.get(period, 0.0) + e.cost_usd
    assert max(spent.values()) <= 0.0002 + 1e-12  # reserved at the worst case: never overspent
    assert reached_upstream(emulator_url, marker) == admitted + 1


def test_a_cost_limit_per_model_and_an_unpriced_model_is_refused(gw: GatewayProcess) -> None:
    marker = "cost-" + uuid.uuid4().hex
    codes = [chat(gw, "cost", f"{marker}-{i}").status_code for i in range(40)]
    assert codes[0] == 200 and 429 in codes
    # spend that cannot be priced cannot be held to a limit: refused, never let through as free
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": marker}]}
    resp = httpx.post(gw.base("acct", "cost") + "/cohere/v2/chat", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert resp.status_code == 422 and "unknown" in resp.json()["message"]


def test_a_rolling_budget_stops_requests_once_spent_and_resumes_as_spend_slides_out(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    marker = "rolling-" + uuid.uuid4().hex
    codes, resp = spend_until_refused(gw, "rolling", marker)
    assert "budget of this gateway spent: $0.0002 in the last 4 s (rolling" in resp.json()["message"]
    assert 1 <= int(resp.headers["retry-after"]) <= 8  # at most until the spend's window has slid out
    deadline = time.monotonic() + 15
    i = 0
    while chat(gw, "rolling", f"{marker}-next{i}").status_code == 429:
        assert time.monotonic() < deadline, "the budget never freed"
        i += 1
        time.sleep(0.2)
    admitted = codes.count(200) + 1
    events = gateway_events.wait_until(
        lambda e: (e.client_event_id or "").startswith(marker + "-") and e.status_code == 200, admitted
    )
    assert reached_upstream(emulator_url, marker) == admitted
    # Recomputed from the events: at each admission, the spend of the windows of 4 s (the previous one
    # weighted by its share still in the last 4 s) never passed the budget, in the gateway's micro-dollars.
    spent = sorted((e.start_time.timestamp(), math.ceil(e.cost_usd * 1_000_000)) for e in events)
    for at, own in spent:
        n = int(at // 4)
        current = sum(c for t, c in spent if n * 4 <= t < at) + own
        previous = sum(c for t, c in spent if (n - 1) * 4 <= t < n * 4)
        assert math.floor(previous * (1 - (at / 4 - n))) + current <= 200


def _post(g: GatewayProcess, gateway: str, content: bytes, marker: str, **headers: str) -> int:
    headers = {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": marker,
               "content-type": "application/json", **headers}  # fmt: skip
    return httpx.post(g.base("acct", gateway) + "/cohere/v2/chat", content=content, timeout=30,
                      headers=headers).status_code  # fmt: skip


@pytest.mark.parametrize("topology", ["two gateways", "workers 2"])
def test_sliding_token_and_cost_limits_are_exact_across_processes_sharing_a_redis(
    emulator_url: str, config: Path, redis: str, topology: str
) -> None:
    db = {"two gateways": 2, "workers 2": 3}[topology]
    url = redis.rsplit("/", 1)[0] + f"/{db}"
    if topology == "two gateways":
        gws = [start_gateway(emulator_url, "", "unused", transparent=False, config=str(config), state_url=url)
               for _ in range(2)]  # fmt: skip
    else:
        gws = [start_gateway(emulator_url, "", "unused", transparent=False, config=str(config),
                             state_url=url, workers=2)]  # fmt: skip
    try:
        run = uuid.uuid4().hex
        # cost: every request costs exactly $0.001 (its custom cost): five fit in $0.005
        cost = json.dumps({"total_cost": 0.001})

        def priced(i: int) -> int:
            body = token_body(f"cost-{run}-{i}")
            return _post(
                gws[i % len(gws)], "slide-cost", body, f"cost-{run}-{i}", **{"cf-aig-custom-cost": cost}
            )

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(priced, range(12)))
        assert codes.count(200) == 5 and codes.count(429) == 7, codes
        assert reached_upstream(emulator_url, f"cost-{run}") == 5

        # tokens: all twelve in flight at once (the upstream answers after 3 s), each holding its
        # reservation: exactly five reservations fit, whichever process took them
        def streamed(i: int) -> int:
            marker = token_marker(run, i)
            return _post(gws[i % len(gws)], "slide-tokens", token_body(marker), marker,
                         **{"X-Emulator-Fault": "delay-ms=3000"})  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(streamed, range(12)))
        assert codes.count(200) == 5 and codes.count(429) == 7, codes
        assert reached_upstream(emulator_url, f"tok-{run}-") == 5
    finally:
        for g in gws:
            g.stop()


def test_the_cohere_sdk_retries_a_gateway_429_after_its_retry_after(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    """The SDK's own retry of a 429 (2 by default) waits the gateway's retry-after, so it comes back
    when the window has freed instead of hammering it: one refusal, then the answer."""
    marker = "sdk-" + uuid.uuid4().hex
    co = cohere.ClientV2(api_key=API_KEY, base_url=gw.base("acct", "sdk") + "/cohere")
    ask = {"model": "command-r", "messages": [{"role": "user", "content": marker}]}
    co.chat(**ask, request_options={"max_retries": 0})
    start = time.monotonic()
    co.chat(**ask, request_options={"additional_headers": {"cf-aig-event-id": marker}})  # default retries
    assert time.monotonic() - start >= 0.5  # it waited (the rest of the 2 s window, at least 1 s asked)
    assert reached_upstream(emulator_url, marker) == 2
    events = gateway_events.wait_until(lambda e: e.client_event_id == marker, 2)
    assert sorted(e.status_code for e in events) == [200, 429]
