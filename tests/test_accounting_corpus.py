"""The accounting corpus: for every endpoint x JSON/stream x ok/upstream error/dropped mid-stream/error
inside the stream, the upstream's bytes, the usage and cost they imply, and the gateway's event; then the
same events (with duplicates) through the consumer, where every read query equals a recomputation from the
distinct events.

Real parts: the emulator as upstream, a real mitmdump with the addon, the real Kafka broker, the consumer
as a subprocess, ClickHouse. The upstream's bytes are fetched from the emulator directly with the same
request (its answers are deterministic but for ids); the expected usage is read from them here, by this
file's own reading of Cohere's shapes, and priced with this file's own copy of the list prices."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from cohere_gateway.events import Event, encode
from tests import accounting, test_consumer
from tests.fixtures.clickhouse import Storage
from tests.fixtures.gateway import EventReader, GatewayProcess
from tests.test_consumer import ConsumerProcess, produce, wait_for
from tests.test_duplicates import check_every_query, messages

running = test_consumer.running
group = test_consumer.group

KEY = "corpus-key-" + uuid.uuid4().hex
IMAGE = "data:image/png;base64," + "iVBORw0KGgo" * 8

# model -> USD per 1M input, per 1M output, per 1k search units, per 1M image tokens (Cohere's list
# prices, written out again here so the test does not read the table it checks).
PRICES: dict[str, tuple[float, float, float, float]] = {
    "command-r-plus-08-2024": (2.50, 10.00, 0, 0),
    "command-a-03-2025": (2.50, 10.00, 0, 0),
    "command-r-03-2024": (0.50, 1.50, 0, 0),  # what `command-r` stands for
    "command": (1.00, 2.00, 0, 0),
    "embed-english-v3.0": (0.10, 0, 0, 0),
    "embed-v4.0": (0.12, 0, 0, 0.47),
    "rerank-v3.5": (0, 0, 2.00, 0),
}
ALIASES = {"command-r": "command-r-03-2024"}


@dataclass
class Case:
    name: str
    path: str  # after /cohere (or /compat)
    body: dict[str, Any]
    fault: str = ""
    compat: bool = False
    # what the event must say beyond usage and cost
    outcome: str = "ok"
    error_type: str | None = None
    model: str | None = None  # the event's model when the request names none
    implied: bool = False
    billed: bool = True
    priced: bool = True  # a list price exists for every unit billed
    extra: dict[str, Any] = field(default_factory=dict)


def chat_v1(**kw: Any) -> dict[str, Any]:
    return {"message": "What year was Newton born?", **kw}


def chat_v2(**kw: Any) -> dict[str, Any]:
    return {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "Newton?"}], **kw}


def compat(**kw: Any) -> dict[str, Any]:
    return {"model": "cohere/command-r", "messages": [{"role": "user", "content": "hi"}], **kw}


CASES = [
    # v1 chat: README's curl example names no model: Cohere bills its default, priced as that and flagged
    Case("v1 chat, no model", "/v1/chat", chat_v1(), model="command-r-plus-08-2024", implied=True),
    Case("v1 chat", "/v1/chat", chat_v1(model="command-r")),
    Case("v1 chat stream", "/v1/chat", chat_v1(model="command-r", stream=True)),
    Case("v1 chat 429", "/v1/chat", chat_v1(model="command-r"), "status=429", outcome="upstream_error",
         error_type="rate_limited", billed=False),
    Case("v1 chat stream dropped", "/v1/chat", chat_v1(model="command-r", stream=True), "drop-mid-stream",
         outcome="upstream_error", error_type="upstream_disconnected", priced=False),
    Case("v1 chat stream-error", "/v1/chat", chat_v1(model="command-r", stream=True), "stream-error",
         outcome="upstream_error", error_type="stream_error", priced=False),
    # v2 chat
    Case("v2 chat", "/v2/chat", chat_v2()),
    Case("v2 chat stream", "/v2/chat", chat_v2(stream=True)),
    Case("v2 chat 500", "/v2/chat", chat_v2(), "status=500", outcome="upstream_error",
         error_type="internal_server_error", billed=False),
    Case("v2 chat stream dropped", "/v2/chat", chat_v2(stream=True), "drop-mid-stream",
         outcome="upstream_error", error_type="upstream_disconnected", priced=False),
    Case("v2 chat stream, error in message-end", "/v2/chat", chat_v2(stream=True), "stream-error",
         outcome="upstream_error", error_type="stream_error"),
    # generate (legacy v1)
    Case("generate", "/v1/generate", {"prompt": "Once upon", "model": "command"}),
    Case("generate stream", "/v1/generate", {"prompt": "Once upon", "model": "command", "stream": True}),
    Case("generate stream-error", "/v1/generate", {"prompt": "Once", "model": "command", "stream": True},
         "stream-error", outcome="upstream_error", error_type="stream_error", priced=False),
    # embed: texts, images (v3 bills images, which have no list price here: unknown; v4 image tokens)
    Case("v1 embed texts", "/v1/embed", {"model": "embed-english-v3.0", "texts": ["a", "b c"],
                                         "input_type": "search_document"}),
    Case("v2 embed texts", "/v2/embed", {"model": "embed-v4.0", "texts": ["a b"],
                                         "input_type": "search_query"}),
    Case("v2 embed v3 image", "/v2/embed", {"model": "embed-english-v3.0", "images": [IMAGE],
                                            "input_type": "image"}, priced=False),
    Case("v2 embed v4 image", "/v2/embed", {"model": "embed-v4.0", "images": [IMAGE], "input_type": "image"}),
    Case("v2 embed 400", "/v2/embed", {"model": "embed-v4.0", "texts": ["a"]}, "status=400",
         outcome="upstream_error", error_type="bad_request", billed=False),
    # rerank, classify, tokenize
    Case("v2 rerank", "/v2/rerank", {"model": "rerank-v3.5", "query": "q", "documents": ["a", "b", "c"]}),
    Case("v1 classify", "/v1/classify", {"model": "embed-english-v3.0", "inputs": ["good"], "examples": [
        {"text": "great", "label": "pos"}, {"text": "fine", "label": "pos"},
        {"text": "awful", "label": "neg"}, {"text": "bad", "label": "neg"}]}, priced=False),
    Case("v1 tokenize", "/v1/tokenize", {"text": "hello world", "model": "command-r"}, billed=False),
    # OpenAI-compatible: a stream without include_usage still gets usage (the gateway asks for it)
    Case("compat", "/chat/completions", compat(), compat=True),
    Case("compat stream with usage", "/chat/completions",
         compat(stream=True, stream_options={"include_usage": True}), compat=True),
    Case("compat stream without usage", "/chat/completions", compat(stream=True), compat=True),
    Case("compat 429", "/chat/completions", compat(), "status=429", compat=True, outcome="upstream_error",
         error_type="rate_limited", billed=False),
]  # fmt: skip


def parse_lines(raw: bytes) -> list[dict[str, Any]]:
    """Every JSON object of a body: the body itself, NDJSON lines, or SSE `data:` lines."""
    try:
        return [json.loads(raw)]
    except ValueError:
        pass
    out = []
    for line in raw.splitlines():
        line = line.removeprefix(b"data:").strip()
        if line.startswith(b"{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def expected_usage(raw: bytes) -> dict[str, int | None]:
    """Billed units in the upstream's bytes (this test's own reading of the shapes)."""
    units: dict[str, int | None] = {}
    for obj in parse_lines(raw):
        blocks = [
            obj.get("meta"),
            obj.get("usage"),
            (obj.get("response") or {}).get("meta"),
            (obj.get("delta") or {}).get("usage") if isinstance(obj.get("delta"), dict) else None,
        ]
        for block in blocks:
            if not isinstance(block, dict):
                continue
            if "prompt_tokens" in block:  # compat
                units |= {"input_tokens": block["prompt_tokens"], "output_tokens": block["completion_tokens"]}
            for name, value in (block.get("billed_units") or {}).items():
                units[name] = value
    return units


def expected_cost(model: str, units: dict[str, int | None]) -> float:
    price_in, price_out, per_search, per_image_token = PRICES[ALIASES.get(model, model)]
    return (
        (units.get("input_tokens") or 0) * price_in / 1e6
        + (units.get("output_tokens") or 0) * price_out / 1e6
        + (units.get("search_units") or 0) * per_search / 1e3
        + (units.get("image_tokens") or 0) * per_image_token / 1e6
    )


def send(url: str, case: Case, headers: dict[str, str]) -> tuple[int, bytes]:
    if case.fault:
        headers = headers | {"X-Emulator-Fault": case.fault}
    try:
        with httpx.Client(timeout=30) as client:
            resp = client.post(url, json=case.body, headers={"Authorization": f"Bearer {KEY}", **headers})
            return resp.status_code, resp.content
    except httpx.HTTPError:  # dropped mid-stream: the client sees a cut response
        return 200, b""


@pytest.fixture(scope="module")
def corpus(
    gateway: GatewayProcess, gateway_events: EventReader, emulator_url: str
) -> list[tuple[Case, Event, bytes]]:
    out = []
    for case in CASES:
        upstream_body = dict(case.body)
        if case.compat:
            upstream_body["model"] = upstream_body["model"].removeprefix("cohere/")
            if upstream_body.get("stream"):  # what the gateway sends: usage asked for
                upstream_body["stream_options"] = {"include_usage": True}
            upstream_url = emulator_url + "/compatibility/v1" + case.path
        else:
            upstream_url = emulator_url + case.path
        _, upstream = send(upstream_url, Case(case.name, case.path, upstream_body, case.fault), {})
        cid = "corpus-" + uuid.uuid4().hex
        base = gateway.base() + ("/compat" if case.compat else "/cohere")
        _, received = send(base + case.path, case, {"cf-aig-event-id": cid})
        if case.compat and case.body.get("stream") and "stream_options" not in case.body:
            # exactly the stream the client asked for: no usage chunk, no usage keys
            assert b'"usage"' not in received and b"[DONE]" in received, received[-300:]
        found = gateway_events.wait_until(lambda e, cid=cid: e.client_event_id == cid)
        assert len(found) == 1, case.name
        out.append((case, found[0], upstream))
    return out


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_the_gateways_event_matches_the_corpus(name: str, corpus: list[tuple[Case, Event, bytes]]) -> None:
    case, event, upstream = next(item for item in corpus if item[0].name == name)
    assert (event.outcome, event.error_type) == (case.outcome, case.error_type)
    if case.error_type == "stream_error":
        assert event.error_message and "emulated fault" in event.error_message
    model = case.model or (case.body.get("model") or "").removeprefix("cohere/")
    assert (event.model, event.model_implied) == (model, case.implied)
    units = expected_usage(upstream) if case.outcome == "ok" or case.error_type == "stream_error" else {}
    got = {name: getattr(event.usage, name) for name in units}
    assert got == units, f"{name}: event usage {got}, upstream billed {units}"
    if not case.billed:
        assert (event.cost_usd, event.cost_source) == (0.0, "not_billable")
    elif not case.priced or not units:
        assert event.cost_usd is None, f"{name}: a cost of {event.cost_usd} made up"
    else:
        assert event.cost_source == "pricing"
        assert event.cost_usd == pytest.approx(expected_cost(model, units), rel=1e-9, abs=1e-12)


def test_the_corpus_through_the_consumer_with_duplicates(
    corpus: list[tuple[Case, Event, bytes]],
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
) -> None:
    events = [event for _, event, _ in corpus]
    rnd = random.Random(7)
    with_copies = list(events)
    for _ in range(len(events)):
        with_copies.insert(rnd.randrange(len(with_copies) + 1), rnd.choice(events))
    consumer = running()
    produce(kafka_bootstrap, kafka_topic, messages(with_copies))
    wait_for(
        lambda: (
            consumer.metric("cohere_gateway_consumer_events_inserted_total")
            + consumer.metric("cohere_gateway_consumer_duplicates_total")
            >= len(with_copies)
        ),
        "every message",
    )
    assert encode(events[0])  # the events are the gateway's own bytes, re-produced
    check_every_query(consumer, storage, accounting.distinct(events))
