"""Errors, streams and failures end to end: upstream error statuses passed through and classified, chunks
reaching the client as they are produced, client aborts, upstream drops, an unreachable upstream and an
unreachable Kafka."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.emulator import start_emulator
from tests.fixtures.gateway import EventReader, GatewayProcess, free_port, start_gateway

API_KEY = "key-" + uuid.uuid4().hex
CHUNK_DELAY_MS = 40


def headers(cid: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "cf-aig-event-id": cid, **extra}


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "bad_request"), (401, "unauthorized"), (402, "payment_required"), (404, "not_found"),
     (422, "unprocessable_entity"), (429, "rate_limited"), (498, "invalid_token"), (499, "request_cancelled"),
     (500, "internal_server_error"), (503, "service_unavailable")],
)  # fmt: skip
def test_upstream_errors_pass_through_unchanged_and_are_classified(
    gateway: GatewayProcess, gateway_events: EventReader, status: int, error_type: str
) -> None:
    cid = "err-" + uuid.uuid4().hex
    resp = httpx.post(
        gateway.base() + "/cohere/v2/chat",
        json={"model": "command-r", "messages": [{"role": "user", "content": "x"}]},
        headers=headers(cid, **{"X-Emulator-Fault": f"status={status}"}),
        timeout=30,
    )
    assert resp.status_code == status
    message = resp.json()["message"]  # Cohere's error body, as the emulator sent it
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.status_code, event.outcome, event.error_type) == (status, "upstream_error", error_type)
    assert event.error_message == message


@pytest.fixture(scope="module")
def slow(kafka_bootstrap: str, gateway_topic: str) -> Iterator[tuple[str, GatewayProcess]]:
    """An emulator that pauses between streamed chunks, and a gateway in front of it."""
    with start_emulator("--chunk-delay-ms", str(CHUNK_DELAY_MS)) as upstream:
        gw = start_gateway(upstream, kafka_bootstrap, gateway_topic, transparent=False)
        try:
            yield upstream, gw
        finally:
            gw.stop()


def arrival_times(url: str, cid: str) -> list[tuple[float, str]]:
    body = {
        "model": "command-r",
        "messages": [{"role": "user", "content": "tell me a long story"}],
        "stream": True,
    }
    out = []
    with httpx.stream("POST", url + "/v2/chat", json=body, headers=headers(cid), timeout=30) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        start = time.monotonic()
        for line in resp.iter_lines():
            if line.startswith("data:"):
                out.append((time.monotonic() - start, line))
    return out


def test_stream_chunks_reach_the_client_as_they_are_produced(slow: Any, gateway_events: EventReader) -> None:
    upstream, gw = slow
    cid = "slow-" + uuid.uuid4().hex
    through = arrival_times(gw.base() + "/cohere", cid)
    # Ordering, not speed: the first content arrived long before the stream ended (chunks are CHUNK_DELAY_MS
    # apart upstream), i.e. the gateway did not hold the response back.
    first = next(t for t, line in through if "content-delta" in line)
    assert first < through[-1][0] / 2
    direct = arrival_times(upstream, "direct-" + cid)
    first_direct = next(t for t, line in direct if "content-delta" in line)
    # Time to first chunk through the gateway vs direct: measured in bench/, here only "not held back".
    assert first - first_direct < through[-1][0] / 2
    assert len({round(t * 1000 / CHUNK_DELAY_MS) for t, _ in through}) > 5  # spread out, not one burst
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.outcome == "ok" and event.latency.ttft_ms is not None
    assert event.latency.ttft_ms < event.latency.total_ms / 2
    assert event.latency.upstream_ttfb_ms is not None and event.latency.gateway_overhead_ms is not None


def test_client_abort_mid_stream(slow: Any, gateway_events: EventReader) -> None:
    _, gw = slow
    cid = "abort-" + uuid.uuid4().hex
    body = {"message": "long story", "model": "command-r", "stream": True}
    with httpx.stream(
        "POST", gw.base() + "/cohere/v1/chat", json=body, headers=headers(cid), timeout=30
    ) as resp:
        lines = resp.iter_lines()
        first = json.loads(next(lines))
        next(lines)
    # leaving the block closed the connection mid-stream
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.stream, event.status_code) == ("client_aborted", True, 200)
    assert event.generation_id == first["generation_id"]  # what was seen before the abort is kept
    assert event.usage.output_tokens is None and event.cost_usd is None


def test_upstream_drop_mid_stream(gateway: GatewayProcess, gateway_events: EventReader) -> None:
    cid = "drop-" + uuid.uuid4().hex
    body = {"message": "hi", "model": "command-r", "stream": True}
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream(
            "POST", gateway.base() + "/cohere/v1/chat", json=body, timeout=30,
            headers=headers(cid, **{"X-Emulator-Fault": "drop-mid-stream"}),
        ) as resp,
    ):  # fmt: skip
        resp.read()
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.error_type) == ("upstream_error", "upstream_disconnected")


def test_unreachable_upstream_and_unreachable_kafka(kafka_bootstrap: str, gateway_topic: str) -> None:
    """Neither a dead upstream nor a dead Kafka breaks the gateway; the first is recorded as an event."""
    dead = f"127.0.0.1:{free_port()}"
    gw = start_gateway(f"http://{dead}", kafka_bootstrap, gateway_topic, transparent=False)
    reader = EventReader(kafka_bootstrap, gateway_topic)
    try:
        cid = "dead-" + uuid.uuid4().hex
        resp = httpx.post(
            gw.base() + "/cohere/v1/chat", json={"message": "x"}, headers=headers(cid), timeout=30
        )
        assert resp.status_code == 502
        assert "could not reach the upstream" in resp.json()["message"]  # JSON, not mitmproxy's HTML page
        event = reader.wait_until(lambda e: e.client_event_id == cid)[0]
        assert (event.status_code, event.outcome, event.error_type) == (
            0,
            "upstream_error",
            "connection_failed",
        )
    finally:
        reader.close()
        gw.stop()

    with start_emulator() as upstream:
        gw = start_gateway(upstream, dead, gateway_topic, transparent=False)
        try:
            for _ in range(3):
                resp = httpx.post(gw.base() + "/cohere/v1/chat", json={"message": "x"}, headers=headers("k"),
                                  timeout=30)  # fmt: skip
                assert resp.status_code == 200 and resp.json()["text"]
            assert json.loads(gw.get("/healthz"))["status"] == "ok"
        finally:
            assert gw.stop() == 0
