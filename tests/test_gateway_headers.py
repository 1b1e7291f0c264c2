"""Cloudflare-compatible cf-aig-* request headers and the gateway's own responses, end to end (real
mitmdump + emulator + Kafka)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import pytest

from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.kafka import create_topic

TOKEN = "gw-token-" + uuid.uuid4().hex
API_KEY = "key-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {API_KEY}", "cf-aig-authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def secured(emulator_url: str, kafka_bootstrap: str) -> Iterator[tuple[GatewayProcess, EventReader]]:
    """A gateway with a token, payload logging on (truncated to 200 characters) and its own topic."""
    topic = create_topic(kafka_bootstrap, f"gw-headers-{uuid.uuid4().hex[:8]}")
    gw = start_gateway(emulator_url, kafka_bootstrap, topic, transparent=False, gateway_token=TOKEN,
                       log_payloads=True, payload_max_bytes=200, max_request_bytes=4096)  # fmt: skip
    reader = EventReader(kafka_bootstrap, topic)
    try:
        yield gw, reader
    finally:
        reader.close()
        gw.stop()


def post(gw: GatewayProcess, path: str, body: Any = None, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body or {"message": "hi", "model": "command-r"})
    return httpx.post(gw.base() + path, content=content, headers={**AUTH, **headers}, timeout=30)


def test_gateway_token_is_required_and_upstream_never_contacted(secured: Any, emulator_requests: Any) -> None:
    gw, events = secured
    for bad in ({}, {"cf-aig-authorization": "Bearer wrong"}, {"cf-aig-authorization": TOKEN}):
        headers = {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": "denied", **bad}
        resp = httpx.post(gw.base() + "/cohere/v1/chat", json={"message": "x"}, headers=headers, timeout=10)
        assert resp.status_code == 401 and "cf-aig-authorization" in resp.json()["message"]
    assert emulator_requests.all() == []
    # the SDK raises its typed error for the gateway's JSON answer
    with pytest.raises(cohere.UnauthorizedError):
        cohere.ClientV2(api_key=API_KEY, base_url=gw.base() + "/cohere").chat(
            model="command-r", messages=[{"role": "user", "content": "x"}]
        )
    # No event: its account, event id, metadata and cost would all be the unauthenticated client's word
    # (issue 13). The refusals are counted instead.
    cid = "after-denied-" + uuid.uuid4().hex
    assert post(gw, "/cohere/v1/chat", **{"cf-aig-event-id": cid}).status_code == 200
    events.wait_until(lambda e: e.client_event_id == cid)
    assert not [e for e in events.all() if e.client_event_id == "denied"]


def test_metadata_payloads_and_headers_not_forwarded(secured: Any, emulator_requests: Any) -> None:
    gw, events = secured
    cid = "meta-" + uuid.uuid4().hex
    resp = post(gw, "/cohere/v1/chat", {"message": "x" * 500, "model": "command-r"},
                **{"cf-aig-metadata": '{"user": "alice", "n": 3, "beta": false}', "cf-aig-event-id": cid,
                   "cf-aig-cache-ttl": "60"})  # fmt: skip
    assert resp.status_code == 200
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.metadata == {"user": "alice", "n": "3", "beta": "false"}
    assert resp.headers["cf-aig-log-id"] == event.event_id
    assert float(resp.headers["x-cohere-gateway-overhead-ms"]) >= 0
    assert event.request_body is not None and len(event.request_body) == 200  # truncated
    assert event.response_body is not None and event.response_body.startswith("{")
    sent = emulator_requests.last()
    assert not [h for h in sent["headers"] if h.startswith("cf-aig-")]
    assert sent["headers"]["authorization"] == f"Bearer {API_KEY}"  # the app's key does reach Cohere


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_overhead_header_is_the_events_overhead(secured: Any, stream: bool) -> None:
    """The gateway's own time a response tells its client is the time its event records: one formula."""
    gw, events = secured
    cid = f"overhead-{stream}-" + uuid.uuid4().hex
    body = {"message": "hi", "model": "command-r", "stream": stream}
    headers = {**AUTH, "cf-aig-event-id": cid}
    with httpx.stream("POST", gw.base() + "/cohere/v1/chat", json=body, headers=headers, timeout=30) as resp:
        assert resp.status_code == 200
        resp.read()
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.stream is stream
    overhead = event.latency.gateway_overhead_ms
    assert overhead is not None and 0 <= overhead <= event.latency.total_ms
    assert float(resp.headers["x-cohere-gateway-overhead-ms"]) == overhead


def test_collect_log_payload_false_keeps_event_without_bodies(secured: Any) -> None:
    gw, events = secured
    cid = "nopayload-" + uuid.uuid4().hex
    post(gw, "/cohere/v1/chat", **{"cf-aig-collect-log-payload": "false", "cf-aig-event-id": cid})
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.request_body is None and event.response_body is None and event.usage.input_tokens


def test_collect_log_false_emits_no_event(secured: Any) -> None:
    gw, events = secured
    skipped, marker = "skip-" + uuid.uuid4().hex, "mark-" + uuid.uuid4().hex
    assert post(
        gw, "/cohere/v1/chat", **{"cf-aig-collect-log": "false", "cf-aig-event-id": skipped}
    ).is_success
    post(gw, "/cohere/v1/chat", **{"cf-aig-event-id": marker})
    # same account/gateway -> same partition, in order: once the later marker is in, the first would be too
    events.wait_until(lambda e: e.client_event_id == marker)
    assert not [e for e in events.all() if e.client_event_id == skipped]


def test_custom_cost_overrides_pricing(secured: Any) -> None:
    gw, events = secured
    cid = "cost-" + uuid.uuid4().hex
    post(gw, "/cohere/v1/chat", {"message": "hi", "model": "command-r"},
         **{"cf-aig-custom-cost": '{"total_cost": 0.42}', "cf-aig-event-id": cid})  # fmt: skip
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.cost_usd, event.cost_source) == (0.42, "custom")
    # the emulator answers 404 for a model it does not serve: a custom cost applies to 2xx only
    cid = "cost404-" + uuid.uuid4().hex
    post(gw, "/cohere/v1/chat", {"message": "hi", "model": "no-such-model"},
         **{"cf-aig-custom-cost": '{"total_cost": 0.42}', "cf-aig-event-id": cid})  # fmt: skip
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    # Cohere answers 404 for a model it does not know and bills no error answer; custom cost is 2xx only
    assert (event.status_code, event.cost_usd, event.cost_source) == (404, 0.0, "not_billable")


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({"cf-aig-metadata": "{oops"}, "cf-aig-metadata"),
        ({"cf-aig-metadata": json.dumps({str(i): i for i in range(6)})}, "at most 5"),
        ({"cf-aig-custom-cost": '{"total_cost": -1}'}, "cf-aig-custom-cost"),
        ({"cf-aig-collect-log": "perhaps"}, "cf-aig-collect-log"),
    ],
)
def test_malformed_cf_headers_are_400_and_not_forwarded(secured: Any, emulator_requests: Any,
                                                        headers: dict, fragment: str) -> None:  # fmt: skip
    gw, _ = secured
    resp = post(gw, "/cohere/v1/chat", **headers)
    assert resp.status_code == 400 and fragment in resp.json()["message"]
    assert emulator_requests.all() == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("cf-aig-cache-ttl", "600"),
        ("cf-aig-skip-cache", "true"),
        ("cf-aig-cache-key", "k"),
        ("cf-aig-metadata", '{"a": 1}'),
        ("cf-aig-event-id", "e"),
        ("cf-aig-collect-log", "false"),
        ("cf-aig-authorization", f"Bearer {TOKEN}"),
        ("cf-aig-request-timeout", "1000"),
    ],
)
def test_a_repeated_cf_aig_header_is_400_and_not_forwarded(
    secured: Any, emulator_requests: Any, name: str, value: str
) -> None:
    """Two copies of one cf-aig-* header are ambiguous (which TTL, which metadata?): refused, never
    silently read first-wins. The same value twice too, and in another letter case."""
    gw, _ = secured
    body = json.dumps({"message": "hi", "model": "command-r"})
    base = [(k, v) for k, v in AUTH.items() if not (name == "cf-aig-authorization" and k == name)]
    for second in (name, name.upper()):
        headers = [*base, (name, value), (second, value)]
        resp = httpx.post(gw.base() + "/cohere/v1/chat", content=body, headers=headers, timeout=30)
        assert resp.status_code == 400, resp.text
        assert resp.json()["message"] == f"duplicate {name} header: send it once"
    assert emulator_requests.all() == []


def test_body_limit_and_malformed_json(secured: Any, emulator_requests: Any) -> None:
    gw, events = secured
    resp = post(gw, "/cohere/v1/chat", b'{"message": "' + b"x" * 5000 + b'"}')
    assert resp.status_code == 413 and "4096" in resp.json()["message"]
    assert emulator_requests.all() == []
    cid = "badjson-" + uuid.uuid4().hex
    resp = post(gw, "/cohere/v1/chat", b'{"message": "unterminated', **{"cf-aig-event-id": cid})
    assert emulator_requests.last()["body"] == '{"message": "unterminated'  # forwarded as sent
    event = events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.status_code == resp.status_code and event.outcome == (
        "ok" if resp.is_success else "upstream_error"
    )


def test_health_and_metrics(secured: Any) -> None:
    gw, _ = secured
    assert json.loads(gw.get("/healthz")) == {"status": "ok"}  # without the token: liveness only
    health = httpx.get(gw.url + "/healthz", headers=AUTH, timeout=5).json()
    assert health["status"] == "ok" and health["upstream"].startswith("http://127.0.0.1")
    assert httpx.get(gw.url + "/metrics", timeout=5).status_code == 401
    text = httpx.get(gw.url + "/metrics", headers=AUTH, timeout=5).text
    assert "# TYPE cohere_gateway_requests_total counter" in text
    assert 'cohere_gateway_rejected_total{status="401"}' in text
    assert "cohere_gateway_events_dropped_total" in text
