"""The emulator, driven by the official `cohere` and `openai` SDKs against a real emulator subprocess.

Every response must parse into the SDK's own types (and validate strictly against them, since the SDK
itself constructs its models without validation), and every usage number must equal the formula in
`cohere_gateway.emulator.tokens`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import openai
import pytest
from cohere import errors
from cohere.core.http_sse import EventSource
from cohere.core.unchecked_base_model import construct_type
from cohere.types import (
    EmbeddingsByTypeEmbedResponse,
    EmbeddingsFloatsEmbedResponse,
    NonStreamedChatResponse,
    StreamedChatResponse,
    StreamEndStreamedChatResponse,
    StreamStartStreamedChatResponse,
    TextGenerationStreamedChatResponse,
)
from cohere.v2.types import (
    ContentDeltaV2ChatStreamResponse,
    MessageEndV2ChatStreamResponse,
    MessageStartV2ChatStreamResponse,
    V2ChatResponse,
)

from cohere_gateway.emulator.tokens import (
    PREAMBLE_OVERHEAD,
    count_all,
    count_tokens,
    expected_chat_usage,
    expected_reply,
    generate_reply,
)
from tests.fixtures.emulator import EmulatorRequests, start_emulator

# The SDK's model construction uses pydantic-v1 APIs; its warnings would drown real ones.
pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecationWarning")

KEY = "test-key-123"
FAULT = "X-Emulator-Fault"


@pytest.fixture(scope="module")
def co(emulator_url: str) -> Iterator[cohere.Client]:
    with cohere.Client(api_key=KEY, base_url=emulator_url, max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def co2(emulator_url: str) -> cohere.ClientV2:
    return cohere.ClientV2(api_key=KEY, base_url=emulator_url, max_retries=0, timeout=30)


def fault(value: str) -> dict[str, Any]:
    return {"additional_headers": {FAULT: value}}


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url, content=content, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})


def assert_cohere_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"id", "message"}
    for word in words:
        assert word in body["message"]


# ---------------------------------------------------------------- v1 chat


def test_v1_chat_parses_and_reports_the_formula_usage(co: cohere.Client) -> None:
    history = [{"role": "USER", "message": "Hi!"}, {"role": "CHATBOT", "message": "Hello, how can I help?"}]
    raw = co.with_raw_response.chat(
        message="What is a gateway, exactly?", preamble="You are terse.", chat_history=history, max_tokens=50
    )
    NonStreamedChatResponse.model_validate(raw.response.json())  # strict, unlike the SDK's own parsing
    reply = raw.data
    usage = expected_chat_usage(
        ["You are terse.", "Hi!", "Hello, how can I help?", "What is a gateway, exactly?"]
    )
    assert reply.text == expected_reply("What is a gateway, exactly?")
    assert reply.finish_reason == "COMPLETE"
    assert reply.meta.billed_units.input_tokens == usage.billed_input_tokens == 4 + 2 + 7 + 7
    assert reply.meta.tokens.input_tokens == usage.billed_input_tokens + PREAMBLE_OVERHEAD
    assert (
        reply.meta.billed_units.output_tokens == reply.meta.tokens.output_tokens == count_tokens(reply.text)
    )
    assert raw.response.json()["meta"]["billed_units"]["input_tokens"] == usage.billed_input_tokens  # an int
    assert [m.role for m in reply.chat_history] == ["USER", "CHATBOT", "USER", "CHATBOT"]
    assert reply.generation_id and reply.response_id


def test_v1_chat_max_tokens_cuts_the_reply(co: cohere.Client) -> None:
    reply = co.chat(message="Tell me everything.", max_tokens=3)
    assert reply.finish_reason == "MAX_TOKENS"
    assert count_tokens(reply.text) == reply.meta.billed_units.output_tokens == 3
    assert reply.text == expected_reply("Tell me everything.", 3)


def test_v1_chat_documents_are_billed_as_input(co: cohere.Client) -> None:
    docs = [{"title": "Tall birds", "snippet": "Emperor penguins are the tallest."}]
    reply = co.chat(message="Which penguin is tallest?", documents=docs)
    assert reply.meta.billed_units.input_tokens == count_all(
        ["Which penguin is tallest?", "Tall birds", "Emperor penguins are the tallest."]
    )


def test_v1_chat_stream_is_ndjson_with_the_whole_response_at_the_end(co: cohere.Client) -> None:
    message = "Stream me a reply, emulator:reply-tokens=40"
    with co.with_raw_response.chat_stream(message=message) as raw:
        assert raw.headers["content-type"] == "application/stream+json"
        events = list(raw.data)
    assert isinstance(events[0], StreamStartStreamedChatResponse)
    texts = [e for e in events[1:-1] if isinstance(e, TextGenerationStreamedChatResponse)]
    assert len(texts) == len(events) - 2 == 40
    end = events[-1]
    assert isinstance(end, StreamEndStreamedChatResponse)
    assert end.finish_reason == "COMPLETE"
    assert "".join(e.text for e in texts) == end.response.text == expected_reply(message)
    assert end.response.generation_id == events[0].generation_id
    usage = expected_chat_usage([message])
    assert end.response.meta.billed_units.input_tokens == usage.billed_input_tokens
    assert end.response.meta.billed_units.output_tokens == 40


def test_v1_chat_stream_answers_sse_when_asked_with_accepts(emulator_url: str) -> None:
    """Cohere switches v1 streams to SSE on the non-standard `Accepts` header; parse it with the SDK's
    own SSE reader and event types."""
    body = {"message": "Hello there", "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "Accepts": "text/event-stream"}
    with (
        httpx.Client() as client,
        client.stream("POST", emulator_url + "/v1/chat", json=body, headers=headers) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [
            construct_type(type_=StreamedChatResponse, object_=json.loads(sse.data))
            for sse in EventSource(r).iter_sse()
        ]
    assert [e.event_type for e in (events[0], events[-1])] == ["stream-start", "stream-end"]
    assert "".join(e.text for e in events[1:-1]) == expected_reply("Hello there")
    assert events[-1].response.meta.billed_units.input_tokens == count_tokens("Hello there")


def test_sdk_v1_chat_stream_skips_sse_lines(co: cohere.Client) -> None:
    """Documents an SDK quirk the gateway must not "fix": with accepts="text/event-stream" the SDK
    reads lines as JSON, so every `data: {...}` line is skipped and the stream looks empty."""
    assert list(co.chat_stream(message="Hello there", accepts="text/event-stream")) == []


# ---------------------------------------------------------------- v2 chat


V2_MESSAGES = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": [{"type": "text", "text": "What does a gateway log?"}]},
]


def test_v2_chat_parses_and_reports_the_formula_usage(co2: cohere.ClientV2) -> None:
    raw = co2.with_raw_response.chat(model="command-a-03-2025", messages=V2_MESSAGES)
    V2ChatResponse.model_validate(raw.response.json())
    reply = raw.data
    usage = expected_chat_usage(["Answer in one sentence.", "What does a gateway log?"])
    assert reply.message.role == "assistant"
    assert reply.message.content[0].text == expected_reply("What does a gateway log?")
    assert reply.finish_reason == "COMPLETE"
    assert reply.usage.billed_units.input_tokens == usage.billed_input_tokens == 11
    assert reply.usage.tokens.input_tokens == usage.raw_input_tokens == 11 + PREAMBLE_OVERHEAD
    assert reply.usage.billed_units.output_tokens == usage.billed_output_tokens


def test_v2_chat_stream_events_are_typed_and_end_with_usage(co2: cohere.ClientV2) -> None:
    with co2.with_raw_response.chat_stream(model="command-r", messages=V2_MESSAGES, max_tokens=5) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = list(raw.data)
    types = [e.type for e in events]
    assert types == ["message-start", "content-start"] + ["content-delta"] * 5 + [
        "content-end",
        "message-end",
    ]
    assert isinstance(events[0], MessageStartV2ChatStreamResponse) and events[0].id
    deltas = [e for e in events if isinstance(e, ContentDeltaV2ChatStreamResponse)]
    assert "".join(d.delta.message.content.text for d in deltas) == expected_reply(
        "What does a gateway log?", 5
    )
    end = events[-1]
    assert isinstance(end, MessageEndV2ChatStreamResponse)
    assert end.delta.finish_reason == "MAX_TOKENS"
    usage = expected_chat_usage(["Answer in one sentence.", "What does a gateway log?"], max_tokens=5)
    assert end.delta.usage.billed_units.input_tokens == usage.billed_input_tokens
    assert end.delta.usage.billed_units.output_tokens == 5
    assert end.delta.usage.tokens.input_tokens == usage.raw_input_tokens


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS_TEXT = json.dumps([WEATHER_TOOL], separators=(",", ":"))


def test_v2_tools_get_a_tool_call_and_tool_results_get_text(co2: cohere.ClientV2) -> None:
    raw = co2.with_raw_response.chat(model="command-r", messages=WEATHER_ASK, tools=[WEATHER_TOOL])
    V2ChatResponse.model_validate(raw.response.json())
    reply = raw.data
    assert reply.finish_reason == "TOOL_CALL"
    assert reply.message.tool_plan and not reply.message.content
    (call,) = reply.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "example", "days": 1}
    # Tool definitions are billed as input; the plan and the arguments are the output.
    assert reply.usage.billed_units.input_tokens == count_all([WEATHER_ASK[0]["content"], TOOLS_TEXT])
    generated = [reply.message.tool_plan, call.function.arguments]
    assert reply.usage.billed_units.output_tokens == count_all(generated)

    # The tool's result comes back: now the model answers in text.
    follow = co2.chat(
        model="command-r",
        tools=[WEATHER_TOOL],
        messages=[
            *WEATHER_ASK,
            {"role": "assistant", "tool_plan": reply.message.tool_plan, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": [{"type": "document", "document": {"data": {"forecast": "sunny, 21C"}}}],
            },
        ],
    )
    assert follow.finish_reason == "COMPLETE"
    assert follow.message.content[0].text == expected_reply(WEATHER_ASK[0]["content"])
    # tool_choice NONE: text even though tools were offered.
    plain = co2.chat(model="command-r", messages=WEATHER_ASK, tools=[WEATHER_TOOL], tool_choice="NONE")
    assert plain.finish_reason == "COMPLETE" and not plain.message.tool_calls


def test_v2_tool_call_streams_plan_call_and_arguments(co2: cohere.ClientV2) -> None:
    events = list(co2.chat_stream(model="command-r", messages=WEATHER_ASK, tools=[WEATHER_TOOL]))
    types = [e.type for e in events]
    plan_n, args_n = types.count("tool-plan-delta"), types.count("tool-call-delta")
    assert plan_n and args_n
    assert types == [
        "message-start",
        *["tool-plan-delta"] * plan_n,
        "tool-call-start",
        *["tool-call-delta"] * args_n,
        "tool-call-end",
        "message-end",
    ]
    plan = "".join(e.delta.message.tool_plan for e in events if e.type == "tool-plan-delta")
    arguments = "".join(
        e.delta.message.tool_calls.function.arguments for e in events if e.type == "tool-call-delta"
    )
    start = events[types.index("tool-call-start")]
    assert start.delta.message.tool_calls.function.name == "get_weather"
    assert json.loads(arguments) == {"city": "example", "days": 1}
    end = events[-1]
    assert end.delta.finish_reason == "TOOL_CALL"
    assert end.delta.usage.billed_units.output_tokens == count_all([plan, arguments]) == plan_n + args_n


def test_v2_malformed_tools_are_400_saying_what_to_fix(emulator_url: str) -> None:
    body = {"model": "command-r", "messages": WEATHER_ASK, "tools": [{"type": "function", "function": {}}]}
    assert_cohere_error(post(emulator_url + "/v2/chat", body), 400, "tools[0].function.name")
    body["tools"] = [{"name": "v1-style"}]
    assert_cohere_error(post(emulator_url + "/v2/chat", body), 400, "tools[0]")


def test_v2_documents_are_cited_in_json_and_stream(co2: cohere.ClientV2) -> None:
    docs = [{"id": "faq-7", "data": {"title": "Gateways", "text": "A gateway logs every request."}}]
    reply = co2.chat(model="command-r", messages=V2_MESSAGES, documents=docs)
    (citation,) = reply.message.citations
    text = reply.message.content[0].text
    assert citation.text == text[citation.start : citation.end] and citation.text
    (source,) = citation.sources
    assert source.type == "document" and source.id == "faq-7"
    assert source.document == {"id": "faq-7", "title": "Gateways", "text": "A gateway logs every request."}
    # Documents are billed as input.
    usage = expected_chat_usage(["Answer in one sentence.", "What does a gateway log?"], documents=docs)
    assert reply.usage.billed_units.input_tokens == usage.billed_input_tokens

    events = list(co2.chat_stream(model="command-r", messages=V2_MESSAGES, documents=["plain text doc"]))
    types = [e.type for e in events]
    assert types[-3:] == ["citation-start", "citation-end", "message-end"]
    start = events[-3]
    assert start.delta.message.citations.sources[0].id == "doc:0"
    assert start.delta.message.citations.sources[0].document == {"id": "doc:0", "content": "plain text doc"}


def test_v2_stream_names_each_event_and_ends_with_done(emulator_url: str) -> None:
    body = {"model": "command-r", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    text = post(emulator_url + "/v2/chat", body).text
    frames = [f for f in text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    for frame in frames[:-1]:
        event_line, data_line = frame.split("\n")
        assert event_line == "event: " + json.loads(data_line.removeprefix("data: "))["type"]


def test_async_clients_parse_streams_and_json(emulator_url: str) -> None:
    async def run() -> tuple[Any, ...]:
        v1 = cohere.AsyncClient(api_key=KEY, base_url=emulator_url, max_retries=0)
        v2 = cohere.AsyncClientV2(api_key=KEY, base_url=emulator_url, max_retries=0)
        v1_events = [e async for e in v1.chat_stream(message="async hello")]
        v2_reply = await v2.chat(model="command-r", messages=[{"role": "user", "content": "async hi"}])
        v2_events = [
            e async for e in v2.chat_stream(model="command-r", messages=[{"role": "user", "content": "x"}])
        ]
        embed = await v1.embed(
            texts=["one", "two words"], model="embed-english-v3.0", input_type="search_query"
        )
        return v1_events, v2_reply, v2_events, embed

    v1_events, v2_reply, v2_events, embed = asyncio.run(run())
    assert v1_events[-1].response.text == expected_reply("async hello")
    assert v2_reply.message.content[0].text == expected_reply("async hi")
    assert v2_events[-1].delta.usage.billed_units.input_tokens == 1
    assert embed.meta.billed_units.input_tokens == 3


# ---------------------------------------------------------------- generate, embed, rerank, classify, tokenize


def test_generate_json_and_stream(co: cohere.Client) -> None:
    result = co.generate(prompt="Once upon a time", num_generations=2, max_tokens=10)
    assert [g.text for g in result.generations] == [
        expected_reply("Once upon a time", 10),
        expected_reply("Once upon a time\n#1", 10),
    ]
    assert result.meta.billed_units.input_tokens == 4
    assert result.meta.billed_units.output_tokens == 20

    with co.with_raw_response.generate_stream(prompt="Once upon a time") as raw:
        assert raw.headers["content-type"] == "application/stream+json"
        events = list(raw.data)
    assert {e.event_type for e in events[:-1]} == {"text-generation"}
    assert events[-1].event_type == "stream-end" and events[-1].is_finished
    assert "".join(e.text for e in events[:-1]) == events[-1].response.generations[0].text
    assert events[-1].response.generations[0].text == expected_reply("Once upon a time")


def test_embed_v1_floats_and_by_type(co: cohere.Client) -> None:
    texts = ["hello world", "a longer, punctuated text!"]
    floats = co.embed(texts=texts, model="embed-english-v3.0", input_type="search_document")
    assert isinstance(floats, EmbeddingsFloatsEmbedResponse)
    assert [len(v) for v in floats.embeddings] == [1024, 1024]
    assert floats.meta.billed_units.input_tokens == count_all(texts) == 2 + 6
    typed = co.embed(
        texts=texts,
        model="embed-english-v3.0",
        input_type="search_document",
        embedding_types=["float", "int8"],
    )
    assert isinstance(typed, EmbeddingsByTypeEmbedResponse)
    assert typed.embeddings.float_ == floats.embeddings  # deterministic per (model, text)
    assert all(-128 <= x <= 127 for x in typed.embeddings.int8[0])
    assert typed.embeddings.uint8 is None


def test_embed_v2_is_by_type_with_usage_in_meta(co2: cohere.ClientV2) -> None:
    result = co2.embed(
        texts=["tiny"],
        model="embed-v4.0",
        input_type="classification",
        embedding_types=["float", "ubinary"],
        output_dimension=256,
    )
    assert len(result.embeddings.float_[0]) == 256
    assert len(result.embeddings.ubinary[0]) == 32
    assert result.meta.billed_units.input_tokens == 1
    assert result.meta.api_version.version == "2"


def test_rerank_v1_and_v2_rank_by_overlap_and_bill_search_units(
    co: cohere.Client, co2: cohere.ClientV2
) -> None:
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "France borders Spain."]
    v1 = co.rerank(query="capital of France", documents=docs, return_documents=True, top_n=2)
    assert [r.index for r in v1.results] == [0, 2]
    assert v1.results[0].document.text == docs[0]
    assert 0 <= v1.results[1].relevance_score <= v1.results[0].relevance_score <= 1
    assert v1.meta.billed_units.search_units == 1
    many = [f"document number {i}" for i in range(150)]
    v2 = co2.rerank(model="rerank-v3.5", query="number 7", documents=many)
    assert len(v2.results) == 150
    assert v2.meta.billed_units.search_units == 2


def test_classify_bills_one_unit_per_input(co: cohere.Client) -> None:
    examples = [
        cohere.ClassifyExample(text="I love this movie", label="positive"),
        cohere.ClassifyExample(text="great acting", label="positive"),
        cohere.ClassifyExample(text="I hate it", label="negative"),
        cohere.ClassifyExample(text="terrible plot", label="negative"),
    ]
    result = co.classify(inputs=["love the acting", "terrible, I hate it", "meh"], examples=examples)
    assert [c.prediction for c in result.classifications][:2] == ["positive", "negative"]
    assert all(abs(sum(v.confidence for v in c.labels.values()) - 1) < 1e-5 for c in result.classifications)
    assert result.meta.billed_units.classifications == 3


def test_tokenize_counts_like_the_formula_and_detokenize_reverses_it(co: cohere.Client) -> None:
    text = "Héllo, wörld! It's 2024."
    tokens = co.tokenize(text=text, model="command-r", offline=False)
    assert len(tokens.tokens) == len(tokens.token_strings) == count_tokens(text)
    assert co.detokenize(tokens=tokens.tokens, model="command-r", offline=False).text == text


def test_models_list_filter_and_get(co: cohere.Client) -> None:
    rerankers = co.models.list(endpoint="rerank").models
    assert rerankers and all("rerank" in m.endpoints for m in rerankers)
    assert co.models.get("command-r").context_length == 128000
    with pytest.raises(errors.NotFoundError) as err:
        co.models.get("no-such-model")
    assert "no-such-model" in err.value.body["message"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, errors.BadRequestError),
        (401, errors.UnauthorizedError),
        (403, errors.ForbiddenError),
        (404, errors.NotFoundError),
        (429, errors.TooManyRequestsError),
        (498, errors.InvalidTokenError),
        (499, errors.ClientClosedRequestError),
        (500, errors.InternalServerError),
        (503, errors.ServiceUnavailableError),
        (504, errors.GatewayTimeoutError),
    ],
)
def test_forced_statuses_surface_as_the_sdk_error_types(co: cohere.Client, status: int, error: type) -> None:
    with pytest.raises(error) as caught:
        co.chat(message="hi", request_options=fault(f"status={status}"))
    assert caught.value.status_code == status
    assert set(caught.value.body) == {"id", "message"}
    if status == 429:
        assert caught.value.headers["retry-after"] == "1"


def test_forced_status_on_streams_and_custom_retry_after(co2: cohere.ClientV2) -> None:
    with pytest.raises(errors.TooManyRequestsError) as caught:
        list(
            co2.chat_stream(
                model="command-r",
                messages=[{"role": "user", "content": "hi"}],
                request_options=fault("status=429; retry-after=7"),
            )
        )
    assert caught.value.headers["retry-after"] == "7"


def test_invalid_bodies_are_400_saying_what_to_fix(emulator_url: str) -> None:
    assert_cohere_error(post(emulator_url + "/v1/chat", b"{not json"), 400, "not valid JSON")
    assert_cohere_error(post(emulator_url + "/v1/chat", [1, 2]), 400, "JSON object")
    assert_cohere_error(post(emulator_url + "/v1/chat", {"model": "command-r"}), 400, "message", "required")
    assert_cohere_error(post(emulator_url + "/v2/chat", {"model": "command-r"}), 400, "messages", "required")
    v2_no_model = {"messages": [{"role": "user", "content": "x"}]}
    assert_cohere_error(post(emulator_url + "/v2/chat", v2_no_model), 400, "model", "required")
    assert_cohere_error(
        post(emulator_url + "/v1/chat", {"message": "x", "max_tokens": "ten"}), 400, "max_tokens"
    )
    assert_cohere_error(post(emulator_url + "/v1/rerank", {"query": "q"}), 400, "documents")
    assert_cohere_error(post(emulator_url + "/v1/chat", {"message": "x"}, {FAULT: "explode"}), 400, FAULT)


def test_v2_empty_messages_raise_bad_request_in_the_sdk(co2: cohere.ClientV2) -> None:
    with pytest.raises(errors.BadRequestError, match="messages"):
        co2.chat(model="command-r", messages=[])


def test_unknown_paths_and_models_are_404(emulator_url: str, co2: cohere.ClientV2) -> None:
    assert_cohere_error(post(emulator_url + "/v1/summarise", {}), 404, "/v1/summarise")
    with pytest.raises(errors.NotFoundError, match="not-a-model"):
        co2.chat(model="not-a-model", messages=[{"role": "user", "content": "x"}])


def test_auth_accepts_bearer_and_token_and_rejects_missing_or_wrong_keys(emulator_url: str) -> None:
    body = {"message": "hi"}
    assert_cohere_error(httpx.post(emulator_url + "/v1/chat", json=body), 401, "no api key")
    assert_cohere_error(post(emulator_url + "/v1/chat", body, {"Authorization": ""}), 401)
    assert_cohere_error(post(emulator_url + "/v1/chat", body, {"Authorization": "Basic abc"}), 401)
    assert post(emulator_url + "/v1/chat", body, {"Authorization": "Token any-key"}).status_code == 200
    with start_emulator("--api-key", "the-only-key", "--drop-rate", "1") as url:
        wrong = cohere.Client(api_key="another-key", base_url=url, max_retries=0)
        with pytest.raises(errors.UnauthorizedError):
            wrong.chat(message="hi")
        assert post(url + "/v1/chat", body, {"Authorization": "Token the-only-key"}).status_code == 200
        # --drop-rate 1 cuts every stream, never a plain JSON answer
        right = cohere.Client(api_key="the-only-key", base_url=url, max_retries=0)
        with pytest.raises(httpx.RemoteProtocolError):
            list(right.chat_stream(message="hi"))


def test_error_rate_one_answers_every_request_with_500() -> None:
    with start_emulator("--error-rate", "1") as url:
        client = cohere.ClientV2(api_key=KEY, base_url=url, max_retries=0)
        for _ in range(3):
            with pytest.raises(errors.InternalServerError):
                client.chat(model="command-r", messages=[{"role": "user", "content": "x"}])


def test_delay_fault_holds_the_answer(emulator_url: str) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            emulator_url + "/v1/chat",
            json={"message": "hi"},
            headers={"Authorization": f"Bearer {KEY}", FAULT: "delay-ms=3000"},
            timeout=httpx.Timeout(5.0, read=0.3),
        )


def test_latency_knobs_hold_answers_and_chunks_but_not_health() -> None:
    """Behaviour, not speed: a 10 s pause must outlast a 1 s read timeout."""
    slow_read = httpx.Timeout(10.0, read=1.0)
    headers = {"Authorization": f"Bearer {KEY}"}
    with start_emulator("--latency-ms", "10000") as url:
        assert httpx.get(url + "/__emulator/health", timeout=slow_read).status_code == 200
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat", json={"message": "hi"}, headers=headers, timeout=slow_read)
    with start_emulator("--chunk-delay-ms", "10000") as url:
        body = {"message": "hi", "stream": True}
        with (
            httpx.Client(timeout=slow_read) as client,
            client.stream("POST", url + "/v1/chat", json=body, headers=headers) as response,
        ):
            lines = response.iter_lines()
            assert json.loads(next(lines))["event_type"] == "stream-start"
            with pytest.raises(httpx.ReadTimeout):
                next(lines)


# ---------------------------------------------------------------- dropped connections


def test_drop_mid_stream_truncates_v1_and_v2_streams(
    co: cohere.Client, co2: cohere.ClientV2, emulator_requests: EmulatorRequests
) -> None:
    received: list[Any] = []
    with pytest.raises(httpx.RemoteProtocolError):
        for event in co.chat_stream(message="cut me off", request_options=fault("drop-mid-stream")):
            received.append(event)
    assert received and received[0].event_type == "stream-start"
    assert all(e.event_type != "stream-end" for e in received)
    assert len(received) < generate_reply("cut me off").output_tokens + 2

    v2_received: list[Any] = []
    with pytest.raises(httpx.RemoteProtocolError):
        for event in co2.chat_stream(
            model="command-r",
            messages=[{"role": "user", "content": "x"}],
            request_options=fault("drop-mid-stream"),
        ):
            v2_received.append(event)
    assert v2_received and all(e.type != "message-end" for e in v2_received)
    assert [r.get("dropped") for r in emulator_requests.all()] == [True, True]


def test_drop_on_a_json_answer_sends_a_truncated_body(co: cohere.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        co.chat(message="hi", request_options=fault("drop-mid-stream"))


# ---------------------------------------------------------------- OpenAI-compatible API


def test_openai_sdk_chat_completions_json_and_stream_with_usage(emulator_url: str) -> None:
    client = openai.OpenAI(base_url=emulator_url + "/compatibility/v1", api_key=KEY, max_retries=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello to the gateway."},
    ]
    usage = expected_chat_usage(["Be brief.", "Say hello to the gateway."], max_tokens=8)
    completion = client.chat.completions.create(model="command-a-03-2025", messages=messages, max_tokens=8)
    assert completion.choices[0].message.content == expected_reply("Say hello to the gateway.", 8)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == usage.billed_input_tokens == 3 + 6
    assert completion.usage.completion_tokens == 8
    assert completion.usage.total_tokens == usage.billed_input_tokens + 8

    chunks = list(
        client.chat.completions.create(
            model="command-a-03-2025", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == usage.billed_input_tokens
    assert chunks[-2].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply("Say hello to the gateway.")
    assert chunks[-1].usage.completion_tokens == count_tokens(text)
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(client.chat.completions.create(model="command-a-03-2025", messages=messages, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)


# ---------------------------------------------------------------- request log


def test_request_log_records_what_reached_upstream(
    emulator_url: str, emulator_requests: EmulatorRequests
) -> None:
    post(
        emulator_url + "/v1/embed?trace=1",
        {"texts": ["x"], "model": "embed-english-v3.0", "input_type": "search_query"},
        {"cf-aig-metadata": '{"team": "a"}', "X-Custom": "1"},
    )
    httpx.get(emulator_url + "/__emulator/health")
    entries = emulator_requests.all()
    assert len(entries) == 1  # helper paths are not recorded
    entry = entries[0]
    assert (entry["method"], entry["path"], entry["query"], entry["status"]) == (
        "POST",
        "/v1/embed",
        "trace=1",
        200,
    )
    assert entry["headers"]["authorization"] == f"Bearer {KEY}"
    assert entry["headers"]["cf-aig-metadata"] == '{"team": "a"}'
    assert json.loads(entry["body"])["texts"] == ["x"]
    emulator_requests.clear()
    assert emulator_requests.all() == []
