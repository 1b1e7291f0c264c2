"""The gateway end to end: a real mitmdump process with the addon, the emulator as upstream, the real Kafka
broker, and the official `cohere` and `openai` SDKs (and curl) as clients.

Each call carries a unique `cf-aig-event-id`, so a test finds its own event among the session topic's.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from typing import Any

import cohere
import httpx
import pytest
from openai import OpenAI

from cohere_gateway.events import Event
from tests.fixtures.gateway import EventReader, GatewayProcess

API_KEY = "test-key-" + uuid.uuid4().hex  # scanned for in every Kafka message at the end


def corr() -> str:
    return "t-" + uuid.uuid4().hex


def opts(cid: str, **headers: str) -> dict[str, Any]:
    return {"additional_headers": {"cf-aig-event-id": cid, **headers}}


def one_event(events: EventReader, cid: str) -> Event:
    found = events.wait_until(lambda e: e.client_event_id == cid)
    assert len(found) == 1, f"{len(found)} events for one exchange"
    return found[0]


def billed(meta: Any) -> tuple[int | None, int | None]:
    return meta.billed_units.input_tokens, meta.billed_units.output_tokens


@pytest.fixture(scope="module")
def v1(gateway: GatewayProcess) -> cohere.Client:
    return cohere.Client(api_key=API_KEY, base_url=gateway.base() + "/cohere")


@pytest.fixture(scope="module")
def v2(gateway: GatewayProcess) -> cohere.ClientV2:
    return cohere.ClientV2(api_key=API_KEY, base_url=gateway.base() + "/cohere")


# --- Cloudflare's two Cohere examples, verbatim ------------------------------------------------------


def test_cloudflare_curl_example(gateway: GatewayProcess, gateway_events: EventReader) -> None:
    cid = corr()
    url = f"{gateway.url}/v1/my-account/my-gateway/cohere/v1/chat"
    out = subprocess.run(
        [
            "curl", "-sS", "--dump-header", "/dev/stderr", url,
            "--header", f"Authorization: Token {API_KEY}",
            "--header", "Content-Type: application/json",
            "--header", f"cf-aig-event-id: {cid}",
            "--data", json.dumps({
                "chat_history": [
                    {"role": "USER", "message": "Who discovered gravity?"},
                    {"role": "CHATBOT", "message": "The man who is widely credited with discovering gravity "
                                                   "is Sir Isaac Newton"},
                ],
                "message": "What year was he born?",
                "connectors": [{"id": "web-search"}],
            }),
        ],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    head = out.stderr.lower()
    assert head.startswith("http/1.1 200")
    reply = json.loads(out.stdout)
    event = one_event(gateway_events, cid)
    assert (event.account_id, event.gateway_id, event.route_mode) == ("my-account", "my-gateway", "gateway")
    assert (event.api_version, event.endpoint, event.path, event.status_code) == (
        "v1",
        "chat",
        "/v1/chat",
        200,
    )
    assert event.usage.input_tokens == reply["meta"]["billed_units"]["input_tokens"]
    assert event.usage.output_tokens == reply["meta"]["billed_units"]["output_tokens"]
    assert event.usage.raw_input_tokens == reply["meta"]["tokens"]["input_tokens"]
    assert event.response_id == reply["response_id"] and event.outcome == "ok"
    assert f"cf-aig-log-id: {event.event_id}" in head


def test_cloudflare_python_example(gateway: GatewayProcess, gateway_events: EventReader) -> None:
    account_id, gateway_id, cid = "acc1", "gw1", corr()
    co = cohere.Client(
        api_key=API_KEY,
        base_url=f"{gateway.url}/v1/{account_id}/{gateway_id}/cohere/v1",
    )
    chat = co.chat(message="hello world!", model="command-r-plus", request_options=opts(cid))
    assert chat.text
    event = one_event(gateway_events, cid)
    assert (event.path, event.model, event.stream) == ("/v1/chat", "command-r-plus", False)
    assert (event.usage.input_tokens, event.usage.output_tokens) == billed(chat.meta)
    assert event.cost_source == "pricing" and event.cost_usd is not None and event.cost_usd > 0
    assert event.api_key_fingerprint is not None and API_KEY not in event.api_key_fingerprint


def test_client_v2_with_cloudflare_style_base_url(
    gateway: GatewayProcess, gateway_events: EventReader
) -> None:
    cid = corr()
    co = cohere.ClientV2(api_key=API_KEY, base_url=gateway.base() + "/cohere/v1")  # -> .../cohere/v1/v2/chat
    res = co.chat(
        model="command-a-03-2025", messages=[{"role": "user", "content": "hi"}], request_options=opts(cid)
    )
    event = one_event(gateway_events, cid)
    assert (event.path, event.api_version, event.finish_reason) == ("/v2/chat", "v2", res.finish_reason)
    assert event.usage.output_tokens == res.usage.billed_units.output_tokens


# --- the cohere SDK, every endpoint --------------------------------------------------------------------


def test_v1_endpoints(v1: cohere.Client, gateway_events: EventReader) -> None:
    cid = corr()
    gen = v1.generate(prompt="Say hi", model="command", request_options=opts(cid))
    event = one_event(gateway_events, cid)
    assert (event.endpoint, event.usage.output_tokens) == ("generate", gen.meta.billed_units.output_tokens)

    cid = corr()
    emb = v1.embed(texts=["a", "b c"], model="embed-english-v3.0", input_type="search_document",
                   request_options=opts(cid))  # fmt: skip
    event = one_event(gateway_events, cid)
    assert (event.endpoint, event.usage.input_tokens, event.usage.embeddings) == (
        "embed",
        emb.meta.billed_units.input_tokens,
        2,
    )
    assert event.cost_source == "pricing"

    cid = corr()
    rr = v1.rerank(query="q", documents=["x", "y"], model="rerank-v3.5", request_options=opts(cid))
    event = one_event(gateway_events, cid)
    assert event.usage.search_units == rr.meta.billed_units.search_units
    assert event.cost_usd == pytest.approx(rr.meta.billed_units.search_units * 2.0 / 1000)

    cid = corr()
    cl = v1.classify(inputs=["great"], examples=[
        cohere.ClassifyExample(text="good", label="pos"), cohere.ClassifyExample(text="fine", label="pos"),
        cohere.ClassifyExample(text="bad", label="neg"), cohere.ClassifyExample(text="awful", label="neg"),
    ], request_options=opts(cid))  # fmt: skip
    event = one_event(gateway_events, cid)
    assert event.usage.classifications == cl.meta.billed_units.classifications

    cid = corr()
    tok = v1.tokenize(text="hello world", model="command-r", request_options=opts(cid))
    event = one_event(gateway_events, cid)
    assert tok.tokens and (event.endpoint, event.cost_source, event.cost_usd) == (
        "tokenize",
        "not_billable",
        0.0,
    )


def test_v1_chat_stream_ndjson(v1: cohere.Client, gateway_events: EventReader) -> None:
    cid = corr()
    events = list(v1.chat_stream(message="stream please", model="command-r", request_options=opts(cid)))
    end = events[-1]
    assert end.event_type == "stream-end"
    event = one_event(gateway_events, cid)
    assert event.stream and event.outcome == "ok" and event.finish_reason == end.finish_reason
    assert (event.usage.input_tokens, event.usage.output_tokens) == billed(end.response.meta)
    assert event.latency.ttft_ms is not None and event.latency.ttft_ms <= event.latency.total_ms
    assert event.generation_id == events[0].generation_id


def test_v1_chat_stream_sse_when_client_accepts_it(
    gateway: GatewayProcess, gateway_events: EventReader
) -> None:
    cid = corr()
    headers = {"Authorization": f"Bearer {API_KEY}", "Accepts": "text/event-stream", "cf-aig-event-id": cid}
    with httpx.stream(
        "POST",
        gateway.base() + "/cohere/v1/chat",
        headers=headers,
        json={"message": "hi", "model": "command-r", "stream": True},
        timeout=30,
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read().decode()
    end = json.loads([line for line in body.splitlines() if "stream-end" in line][-1].removeprefix("data: "))
    event = one_event(gateway_events, cid)
    assert event.usage.output_tokens == end["response"]["meta"]["billed_units"]["output_tokens"]
    assert event.finish_reason == end["finish_reason"]


def test_v2_endpoints_and_stream(v2: cohere.ClientV2, gateway_events: EventReader) -> None:
    cid = corr()
    chunks = list(v2.chat_stream(model="command-r-plus", messages=[{"role": "user", "content": "hi"}],
                                 request_options=opts(cid)))  # fmt: skip
    end = chunks[-1]
    assert end.type == "message-end"
    event = one_event(gateway_events, cid)
    assert event.stream and event.api_version == "v2" and event.finish_reason == end.delta.finish_reason
    assert event.usage.input_tokens == end.delta.usage.billed_units.input_tokens
    assert event.usage.output_tokens == end.delta.usage.billed_units.output_tokens
    assert event.usage.raw_input_tokens == end.delta.usage.tokens.input_tokens

    cid = corr()
    emb = v2.embed(texts=["x"], model="embed-v4.0", input_type="classification", embedding_types=["float"],
                   request_options=opts(cid))  # fmt: skip
    event = one_event(gateway_events, cid)
    assert (event.path, event.usage.input_tokens) == ("/v2/embed", emb.meta.billed_units.input_tokens)

    cid = corr()
    rr = v2.rerank(model="rerank-v3.5", query="q", documents=["a"], request_options=opts(cid))
    assert one_event(gateway_events, cid).usage.search_units == rr.meta.billed_units.search_units


def test_v2_tool_calls_json_and_stream(v2: cohere.ClientV2, gateway_events: EventReader) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
    ask = [{"role": "user", "content": "Where is my order?"}]
    cid = corr()
    res = v2.chat(model="command-r-plus", messages=ask, tools=[tool], request_options=opts(cid))
    assert res.finish_reason == "TOOL_CALL" and res.message.tool_calls[0].function.name == "lookup_order"
    event = one_event(gateway_events, cid)
    assert (event.finish_reason, event.outcome) == ("TOOL_CALL", "ok")
    assert event.usage.input_tokens == res.usage.billed_units.input_tokens
    assert event.usage.output_tokens == res.usage.billed_units.output_tokens

    cid = corr()
    stream = v2.chat_stream(model="command-r-plus", messages=ask, tools=[tool], request_options=opts(cid))
    chunks = list(stream)
    assert "tool-call-delta" in [c.type for c in chunks]
    end = chunks[-1]
    event = one_event(gateway_events, cid)
    assert event.stream and event.finish_reason == end.delta.finish_reason == "TOOL_CALL"
    assert event.usage.output_tokens == end.delta.usage.billed_units.output_tokens
    assert event.latency.ttft_ms is not None  # the tool plan is the first generated text


def test_async_client_stream(gateway: GatewayProcess, gateway_events: EventReader) -> None:
    cid = corr()

    async def run() -> Any:
        co = cohere.AsyncClientV2(api_key=API_KEY, base_url=gateway.base() + "/cohere")
        out = [c async for c in co.chat_stream(model="command-r", messages=[{"role": "user", "content": "x"}],
                                               request_options=opts(cid))]  # fmt: skip
        return out[-1]

    end = asyncio.run(run())
    assert one_event(gateway_events, cid).usage.output_tokens == end.delta.usage.billed_units.output_tokens


# --- the openai SDK on the compat route -------------------------------------------------------------------


def test_openai_sdk_on_compat_route(
    gateway: GatewayProcess, gateway_events: EventReader, emulator_requests: Any
) -> None:
    client = OpenAI(api_key=API_KEY, base_url=gateway.base() + "/compat")
    cid = corr()
    res = client.chat.completions.create(
        model="cohere/command-r",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"cf-aig-event-id": cid},
    )
    event = one_event(gateway_events, cid)
    assert (event.route_mode, event.api_version, event.endpoint) == ("compat", "compat", "chat.completions")
    assert (event.model, event.path) == ("command-r", "/compatibility/v1/chat/completions")
    assert (event.usage.input_tokens, event.usage.output_tokens) == (res.usage.prompt_tokens,
                                                                     res.usage.completion_tokens)  # fmt: skip
    sent = emulator_requests.for_path("/compatibility/v1/chat/completions")[-1]
    assert json.loads(sent["body"])["model"] == "command-r"  # provider prefix removed

    cid = corr()
    stream = client.chat.completions.create(
        model="cohere/command-r", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}, extra_headers={"cf-aig-event-id": cid},
    )  # fmt: skip
    chunks = list(stream)
    usage = next(c.usage for c in reversed(chunks) if c.usage)
    event = one_event(gateway_events, cid)
    assert event.stream and (event.usage.input_tokens, event.usage.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert event.latency.ttft_ms is not None
