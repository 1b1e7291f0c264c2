"""Retries and request timeouts end to end: a real gateway in front of the emulator, whose fault knobs
(`X-Emulator-Fault: status=500,times=2` fails the first two requests carrying that header) make the
upstream fail, hang or cut; events read back from a real Kafka. Attempts are asserted exactly, timings
loosely (lower bounds from the configured delays, generous upper bounds)."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import pytest

from tests.fixtures.emulator import start_emulator
from tests.fixtures.gateway import EventReader, GatewayProcess, free_port, start_gateway

API_KEY = "key-" + uuid.uuid4().hex
CHAT = {"model": "command-r", "messages": [{"role": "user", "content": "hello"}]}
STREAM = {**CHAT, "stream": True}
CHUNK_DELAY_MS = 150
ATTEMPTS = "cf-aig-max-attempts"


def headers(cid: str, fault: str | None = None, **extra: str) -> dict[str, str]:
    out = {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": cid, **extra}
    if fault is not None:
        out["X-Emulator-Fault"] = f"{fault},id={cid}"
    return out


def post(gw: GatewayProcess, cid: str, fault: str | None = None, body: dict = CHAT, **extra: str):
    return httpx.post(
        gw.base() + "/cohere/v2/chat", json=body, headers=headers(cid, fault, **extra), timeout=60
    )


def upstream_calls(emulator_url: str, cid: str) -> int:
    entries = httpx.get(emulator_url + "/__emulator/requests", timeout=5).json()["requests"]
    return sum(1 for e in entries if cid in e["headers"].get("x-emulator-fault", ""))


@pytest.fixture(scope="module")
def gw(emulator_url: str, kafka_bootstrap: str, gateway_topic: str) -> Iterator[GatewayProcess]:
    g = start_gateway(emulator_url, kafka_bootstrap, gateway_topic, transparent=False)
    try:
        yield g
    finally:
        g.stop()


@pytest.mark.parametrize(
    ("fault", "statuses"),
    [("status=500,times=2", [500, 500, 200]), ("status=503,times=1", [503, 200]),
     ("drop-mid-stream,times=2", [0, 0, 200])],
)  # fmt: skip
def test_retries_recover_an_injected_failure_with_linear_backoff(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str, fault: str, statuses: list[int]
) -> None:
    cid = "retry-" + uuid.uuid4().hex
    start = time.monotonic()
    resp = post(gw, cid, fault, **{"cf-aig-max-attempts": "3", "cf-aig-retry-delay": "150",
                                   "cf-aig-backoff": "linear"})  # fmt: skip
    elapsed = time.monotonic() - start
    assert resp.status_code == 200, resp.text
    assert resp.json()["message"]["content"][0]["text"]
    assert resp.headers["x-cohere-gateway-attempts"] == str(len(statuses))
    # linear: 150 ms before the first retry, 300 ms before the second
    assert elapsed >= sum(0.15 * n for n in range(1, len(statuses))) * 0.9
    assert elapsed < 20
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.status_code) == ("ok", 200)
    assert (event.attempts, event.attempt_statuses) == (len(statuses), statuses)
    assert event.usage.output_tokens  # the successful attempt's usage, billed once
    assert upstream_calls(emulator_url, cid) == len(statuses)


def test_a_429_waits_for_the_upstreams_retry_after(gw: GatewayProcess, gateway_events: EventReader) -> None:
    cid = "after-" + uuid.uuid4().hex
    start = time.monotonic()
    resp = post(gw, cid, "status=429,retry-after=1,times=1", **{"cf-aig-max-attempts": "2"})
    elapsed = time.monotonic() - start
    assert resp.status_code == 200
    assert 0.9 <= elapsed < 20  # the retry-after second, not the (zero) configured delay
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.attempt_statuses == [429, 200]


def test_a_retry_after_longer_than_the_gateway_waits_goes_to_the_client(
    gw: GatewayProcess, gateway_events: EventReader
) -> None:
    cid = "long-after-" + uuid.uuid4().hex
    start = time.monotonic()
    resp = post(gw, cid, "status=429,retry-after=30", **{"cf-aig-max-attempts": "3"})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "30"
    assert time.monotonic() - start < 10
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.error_type, event.attempt_statuses) == (
        "upstream_error",
        "rate_limited",
        [429],
    )


def test_exhausted_retries_answer_the_last_upstream_error_and_exponential_backoff(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    cid = "exhaust-" + uuid.uuid4().hex
    start = time.monotonic()
    resp = post(gw, cid, "status=500", **{"cf-aig-max-attempts": "4", "cf-aig-retry-delay": "100",
                                          "cf-aig-backoff": "exponential"})  # fmt: skip
    elapsed = time.monotonic() - start
    assert resp.status_code == 500 and "emulated fault" in resp.json()["message"]
    assert resp.headers["x-cohere-gateway-attempts"] == "4"
    assert elapsed >= (0.1 + 0.2 + 0.4) * 0.9
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.attempt_statuses) == ("upstream_error", [500, 500, 500, 500])
    assert upstream_calls(emulator_url, cid) == 4


def test_errors_of_the_request_itself_are_not_retried(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    cid = "noretry-" + uuid.uuid4().hex
    resp = post(gw, cid, "status=400", **{"cf-aig-max-attempts": "5"})
    assert resp.status_code == 400
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.attempt_statuses == [400]
    assert upstream_calls(emulator_url, cid) == 1


def test_a_hung_upstream_gives_504_after_the_timeout(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    cid = "hung-" + uuid.uuid4().hex
    start = time.monotonic()
    resp = post(gw, cid, "delay-ms=20000", **{"cf-aig-request-timeout": "400", "cf-aig-max-attempts": "2"})
    elapsed = time.monotonic() - start
    assert resp.status_code == 504
    assert "did not answer within 400 ms (2 attempts)" in resp.json()["message"]
    assert 0.7 <= elapsed < 10  # two attempts of 400 ms, not the 20 s the upstream would take
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.status_code, event.outcome) == (504, "upstream_timeout")
    assert (event.attempts, event.attempt_statuses) == (2, [0, 0])
    assert event.cost_usd == 0 or event.cost_usd is None
    assert upstream_calls(emulator_url, cid) == 2


def test_a_stream_is_retried_before_its_first_byte_only(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    cid = "stream-retry-" + uuid.uuid4().hex
    retry = {"cf-aig-max-attempts": "3"}
    with httpx.stream("POST", gw.base() + "/cohere/v2/chat", json=STREAM, timeout=60,
                      headers=headers(cid, "status=500,times=1", **retry)) as resp:  # fmt: skip
        assert resp.status_code == 200
        text = resp.read().decode()
    assert "message-end" in text
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.attempt_statuses) == ("ok", [500, 200])
    assert event.usage.output_tokens

    cut = "stream-cut-" + uuid.uuid4().hex
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("POST", gw.base() + "/cohere/v2/chat", json=STREAM, timeout=60,
                     headers=headers(cut, "drop-mid-stream", **{"cf-aig-max-attempts": "3"})) as resp,
    ):  # fmt: skip
        resp.read()
    event = gateway_events.wait_until(lambda e: e.client_event_id == cut)[0]
    # its first bytes had reached the client: cut for the client too, never sent again
    assert (event.outcome, event.error_type, event.attempt_statuses) == (
        "upstream_error",
        "upstream_disconnected",
        [200],
    )
    assert upstream_calls(emulator_url, cut) == 1


def test_a_slow_stream_that_started_in_time_completes_and_streams(
    kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    with start_emulator("--chunk-delay-ms", str(CHUNK_DELAY_MS)) as upstream:
        g = start_gateway(upstream, kafka_bootstrap, gateway_topic, transparent=False)
        try:
            cid = "slow-" + uuid.uuid4().hex
            arrivals: list[float] = []
            timeout = {"cf-aig-request-timeout": "1000"}
            with httpx.stream("POST", g.base() + "/cohere/v2/chat", json=STREAM, timeout=60,
                              headers=headers(cid, **timeout)) as resp:  # fmt: skip
                assert resp.status_code == 200, resp.read()
                start = time.monotonic()
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        arrivals.append(time.monotonic() - start)
        finally:
            g.stop()
    # the stream ran well past the 1 s timeout, chunk by chunk (never buffered by the relay)
    assert arrivals[-1] > 1.0
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 2) * CHUNK_DELAY_MS / 1000 * 0.8
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.attempts) == ("ok", 1)
    assert event.finish_reason and event.usage.output_tokens


@pytest.mark.parametrize(
    ("header", "value"),
    [("cf-aig-max-attempts", "6"), ("cf-aig-max-attempts", "0"), ("cf-aig-retry-delay", "5001"),
     ("cf-aig-backoff", "fast"), ("cf-aig-request-timeout", "soon"), ("cf-aig-request-timeout", "0")],
)  # fmt: skip
def test_bad_retry_headers_are_refused_naming_the_header(
    gw: GatewayProcess, emulator_url: str, header: str, value: str
) -> None:
    cid = "bad-" + uuid.uuid4().hex
    resp = post(gw, cid, "status=500", **{header: value})
    assert resp.status_code == 400 and header in resp.json()["message"]
    assert upstream_calls(emulator_url, cid) == 0


def test_gateway_defaults_from_the_configuration(
    emulator_url: str, kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader, tmp_path: Path
) -> None:
    config = tmp_path / "gateways.toml"
    config.write_text(
        '[gateways."*/*"]\nrequest_timeout = 2000\n'
        '[gateways."acct/retrying"]\nretries = { max_attempts = 3, delay = 50, backoff = "constant" }\n'
    )
    g = start_gateway(emulator_url, kafka_bootstrap, gateway_topic, transparent=False, config=str(config))
    try:
        cid = "defaults-" + uuid.uuid4().hex
        resp = httpx.post(g.base("acct", "retrying") + "/cohere/v2/chat", json=CHAT, timeout=60,
                          headers=headers(cid, "status=502,times=2"))  # fmt: skip
        assert resp.status_code == 200 and resp.headers["x-cohere-gateway-attempts"] == "3"
        hung = "defaults-hung-" + uuid.uuid4().hex
        resp = httpx.post(g.base("acct", "other") + "/cohere/v2/chat", json=CHAT, timeout=60,
                          headers=headers(hung, "delay-ms=20000"))  # fmt: skip
        assert resp.status_code == 504
        # a request's header overrides the gateway's default
        fast = "defaults-override-" + uuid.uuid4().hex
        resp = httpx.post(g.base("acct", "retrying") + "/cohere/v2/chat", json=CHAT, timeout=60,
                          headers=headers(fast, "status=502,times=2", **{ATTEMPTS: "1"}))  # fmt: skip
        assert resp.status_code == 502
    finally:
        g.stop()
    events = {
        e.client_event_id: e
        for e in gateway_events.wait_until(lambda e: e.client_event_id in (cid, hung, fast), 3)
    }
    assert events[cid].attempt_statuses == [502, 502, 200]
    assert (events[hung].outcome, events[hung].attempts) == ("upstream_timeout", 1)
    assert events[fast].attempt_statuses == [502]


def test_the_cohere_sdk_sees_its_typed_gateway_timeout(gw: GatewayProcess) -> None:
    co = cohere.ClientV2(api_key=API_KEY, base_url=gw.base() + "/cohere")
    start = time.monotonic()
    with pytest.raises(cohere.errors.GatewayTimeoutError):
        co.chat(
            **CHAT,
            request_options={
                "max_retries": 0,
                "additional_headers": {"cf-aig-request-timeout": "300", "X-Emulator-Fault": "delay-ms=20000"},
            },
        )
    assert time.monotonic() - start < 10


def test_the_cohere_sdks_retries_multiply_the_gateways_as_documented(
    gw: GatewayProcess, emulator_url: str
) -> None:
    """docs/gateway.md: the SDK retries 5xx twice by default on top of the gateway's attempts; with
    the SDK's max_retries=0 the gateway's attempts are all there is."""
    for sdk_retries, expected in ((None, 2 * 3), (0, 2)):
        cid = "sdk-retries-" + uuid.uuid4().hex
        co = cohere.ClientV2(api_key=API_KEY, base_url=gw.base() + "/cohere")
        options: dict = {"additional_headers": {ATTEMPTS: "2", "X-Emulator-Fault": f"status=500,id={cid}"}}
        if sdk_retries is not None:
            options["max_retries"] = sdk_retries
        start = time.monotonic()
        with pytest.raises(cohere.errors.InternalServerError):
            co.chat(**CHAT, request_options=options)
        elapsed = time.monotonic() - start
        assert upstream_calls(emulator_url, cid) == expected
        if sdk_retries is None:  # the SDK's own backoff: about 1 s, then 2 s (jitter ±10 %)
            assert elapsed >= (1 + 2) * 0.85


def test_an_unreachable_upstream_is_retried_then_answered_502(
    kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    g = start_gateway(f"http://127.0.0.1:{free_port()}", kafka_bootstrap, gateway_topic, transparent=False)
    try:
        cid = "unreachable-" + uuid.uuid4().hex
        resp = httpx.post(g.base() + "/cohere/v2/chat", json=CHAT, timeout=60,
                          headers=headers(cid, **{ATTEMPTS: "3", "cf-aig-retry-delay": "50"}))  # fmt: skip
    finally:
        g.stop()
    assert resp.status_code == 502 and "could not reach the upstream (3 attempts)" in resp.json()["message"]
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.status_code, event.outcome, event.error_type) == (0, "upstream_error", "connection_failed")
    assert event.attempt_statuses == [0, 0, 0] and event.cost_usd == 0


def test_a_client_that_leaves_stops_the_retries(
    gw: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> None:
    cid = "leaves-" + uuid.uuid4().hex
    body = json.dumps(CHAT).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers(cid, "status=503", **{ATTEMPTS: "5",
                   "cf-aig-retry-delay": "1500"}).items())  # fmt: skip
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/acct/gw/cohere/v2/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{head}\r\n".encode()
            + body
        )
        deadline = time.monotonic() + 20
        while upstream_calls(emulator_url, cid) < 1:  # the first attempt was made; the backoff runs
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # the client left during the 1.5 s backoff: no further attempt, the exchange ends as client_aborted
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.outcome == "client_aborted"
    time.sleep(2.0)  # past the next backoff: an attempt the relay went on with would have arrived
    assert upstream_calls(emulator_url, cid) == 1
