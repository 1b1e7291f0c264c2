"""Usage extraction, stream watching and pricing: pure functions over Cohere's wire shapes."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cohere_gateway.addons.headers import CustomCost
from cohere_gateway.addons.pricing import compute_cost, load_pricing
from cohere_gateway.addons.streaming import StreamWatcher, is_stream_response
from cohere_gateway.addons.usage import extract_body, extract_json, request_fields
from cohere_gateway.events import Usage

PRICING = load_pricing()

V1_CHAT = {
    "response_id": "r1",
    "generation_id": "g1",
    "text": "hi",
    "finish_reason": "COMPLETE",
    "meta": {
        "api_version": {"version": "1"},
        "billed_units": {"input_tokens": 5, "output_tokens": 7},
        "tokens": {"input_tokens": 12, "output_tokens": 7},
    },
}


def test_v1_chat_bills_from_billed_units_and_keeps_raw_tokens() -> None:
    ex = extract_json("v1", "chat", V1_CHAT)
    assert ex.usage == Usage(input_tokens=5, output_tokens=7, raw_input_tokens=12, raw_output_tokens=7)
    assert (ex.response_id, ex.generation_id, ex.finish_reason) == ("r1", "g1", "COMPLETE")


def test_v2_chat_usage_block() -> None:
    body = {
        "id": "c2",
        "finish_reason": "COMPLETE",
        "message": {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
        "usage": {"billed_units": {"input_tokens": 3, "output_tokens": 4},
                  "tokens": {"input_tokens": 9, "output_tokens": 4}, "cached_tokens": 2},
    }  # fmt: skip
    ex = extract_json("v2", "chat", body)
    assert ex.usage == Usage(input_tokens=3, output_tokens=4, raw_input_tokens=9, raw_output_tokens=4,
                             cached_tokens=2)  # fmt: skip
    assert ex.response_id == "c2"


def test_embed_rerank_classify() -> None:
    embed = {"embeddings": {"float": [[0.1], [0.2], [0.3]]}, "meta": {"billed_units": {"input_tokens": 6}}}
    ex = extract_json("v2", "embed", embed)
    assert (ex.usage.input_tokens, ex.usage.embeddings) == (6, 3)
    assert extract_json("v1", "embed", {"embeddings": [[1.0], [2.0]]}).usage.embeddings == 2
    rerank = {"id": "rr", "results": [], "meta": {"billed_units": {"search_units": 1}}}
    assert extract_json("v1", "rerank", rerank).usage.search_units == 1
    classify = {"id": "cl", "classifications": [], "meta": {"billed_units": {"classifications": 2}}}
    assert extract_json("v1", "classify", classify).usage.classifications == 2


def test_compat_usage_and_errors() -> None:
    body = {"id": "cmpl", "model": "command-r", "choices": [{"finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}  # fmt: skip
    ex = extract_json("compat", "chat.completions", body)
    got = (ex.usage.input_tokens, ex.usage.output_tokens, ex.finish_reason, ex.model)
    assert got == (11, 2, "stop", "command-r")
    assert extract_json("v1", "chat", {"id": "x", "message": "invalid api token"}).error_message == (
        "invalid api token"
    )
    assert extract_json("compat", "chat.completions", {"error": {"message": "bad"}}).error_message == "bad"


def test_missing_or_odd_values_are_none_not_zero() -> None:
    ex = extract_json("v1", "chat", {"meta": {"billed_units": {"input_tokens": -1, "output_tokens": "7"}}})
    assert ex.usage == Usage()
    assert extract_body("v1", "chat", b"<html>oops</html>").usage == Usage()
    assert extract_body("v1", "chat", b"[1, 2]").usage == Usage()


def test_request_fields_tolerate_malformed_json() -> None:
    assert request_fields(b'{"model": "command-r", "stream": true}')[1:] == ("command-r", True)
    assert request_fields(b"{not json")[1:] == (None, False)
    assert request_fields(b'"text"')[1:] == (None, False)


# --- streams ---------------------------------------------------------------------------------------


def v1_ndjson() -> bytes:
    events = [
        {"event_type": "stream-start", "generation_id": "g9", "is_finished": False},
        {"event_type": "text-generation", "text": "Hel", "is_finished": False},
        {"event_type": "text-generation", "text": "lo", "is_finished": False},
        {"event_type": "stream-end", "finish_reason": "MAX_TOKENS", "is_finished": True,
         "response": {"response_id": "r9", "text": "Hello", "meta": {
             "billed_units": {"input_tokens": 4, "output_tokens": 2},
             "tokens": {"input_tokens": 10, "output_tokens": 2}}}},
    ]  # fmt: skip
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def v1_sse() -> bytes:
    """v1 chat as SSE, what Cohere sends when the client asks with `Accepts: text/event-stream`."""
    return b"".join(b"data: " + line + b"\n\n" for line in v1_ndjson().splitlines())


def v2_sse() -> bytes:
    events = [
        {"type": "message-start", "id": "m1", "delta": {"message": {"role": "assistant"}}},
        {"type": "content-start", "index": 0},
        {"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": "Hi"}}}},
        {"type": "content-end", "index": 0},
        {"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": {
            "billed_units": {"input_tokens": 3, "output_tokens": 1},
            "tokens": {"input_tokens": 8, "output_tokens": 1}}}},
    ]  # fmt: skip
    out = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    return out + b"data: [DONE]\n\n"


def compat_sse() -> bytes:
    chunks = [
        {"id": "c1", "model": "command-r", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {"content": "Yo"}}]},
        {"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 1}},
    ]
    return b"".join(f"data: {json.dumps(c)}\r\n\r\n".encode() for c in chunks) + b"data: [DONE]\r\n\r\n"


def feed_split(watcher: StreamWatcher, data: bytes, cuts: list[int]) -> None:
    last = 0
    for cut in sorted(set(cuts)):
        watcher.feed(data[last:cut])
        last = cut
    watcher.feed(data[last:])
    watcher.finish()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_streams_parse_the_same_however_chunks_split(data: st.DataObject) -> None:
    cases = [
        ("v1", "chat", "ndjson", v1_ndjson(), (4, 2, 10, "MAX_TOKENS", "r9", "g9")),
        ("v1", "chat", "sse", v1_sse(), (4, 2, 10, "MAX_TOKENS", "r9", "g9")),
        ("v2", "chat", "sse", v2_sse(), (3, 1, 8, "COMPLETE", "m1", None)),
        ("compat", "chat.completions", "sse", compat_sse(), (6, 1, None, "stop", "c1", None)),
    ]  # fmt: skip
    api, endpoint, fmt, body, expected = data.draw(st.sampled_from(cases))
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    ticks = iter(range(100, 10_000))
    watcher = StreamWatcher(api, endpoint, fmt, clock=lambda: float(next(ticks)))
    feed_split(watcher, body, cuts)
    ex = watcher.extracted
    got = (ex.usage.input_tokens, ex.usage.output_tokens, ex.usage.raw_input_tokens, ex.finish_reason,
           ex.response_id, ex.generation_id)  # fmt: skip
    assert got == expected
    assert watcher.ended and watcher.first_token_at is not None
    assert watcher.bytes_seen == len(body)


def test_first_token_time_is_the_first_generated_text() -> None:
    now = [0.0]
    watcher = StreamWatcher("v1", "chat", "ndjson", clock=lambda: now[0])
    body = v1_ndjson().split(b"\n")
    now[0] = 1.0
    watcher.feed(body[0] + b"\n")  # stream-start: not a token
    assert watcher.first_token_at is None
    now[0] = 2.0
    watcher.feed(body[1] + b"\n")
    now[0] = 3.0
    watcher.feed(b"\n".join(body[2:]))
    assert watcher.first_token_at == 2.0


@pytest.mark.parametrize(
    ("api", "framing", "start", "token"),
    [
        ("v2", "sse", b'event: message-start\ndata: {"type":"message-start","id":"x"}\n\n',
         b'event: tool-plan-delta\ndata: {"type":"tool-plan-delta","delta":{"message":{}}}\n\n'),
        ("v2", "sse", b'event: message-start\ndata: {"type":"message-start","id":"x"}\n\n',
         b'event: tool-call-delta\ndata: {"type":"tool-call-delta","index":0}\n\n'),
        ("v1", "ndjson", b'{"event_type":"stream-start","generation_id":"g"}\n',
         b'{"event_type":"tool-calls-chunk","tool_call_delta":{"name":"f"}}\n'),
    ],
)  # fmt: skip
def test_a_tool_call_is_generated_output_for_the_first_token_time(
    api: str, framing: str, start: bytes, token: bytes
) -> None:
    now = [1.0]
    watcher = StreamWatcher(api, "chat", framing, clock=lambda: now[0])
    watcher.feed(start)
    assert watcher.first_token_at is None
    now[0] = 2.0
    watcher.feed(token)
    assert watcher.first_token_at == 2.0


def test_aborted_stream_keeps_what_was_seen() -> None:
    watcher = StreamWatcher("v1", "chat", "ndjson")
    watcher.feed(v1_ndjson()[:150])
    watcher.finish()
    assert not watcher.ended and watcher.extracted.generation_id == "g9"
    assert watcher.extracted.usage == Usage()


def test_garbage_lines_are_skipped() -> None:
    watcher = StreamWatcher("v2", "chat", "sse")
    watcher.feed(b"data: {not json stream-end message-end}\n\n: comment\n\nretry: 5\n\n" + v2_sse())
    watcher.finish()
    assert watcher.extracted.usage.output_tokens == 1


def test_stream_detection() -> None:
    assert is_stream_response("text/event-stream; charset=utf-8", False)
    assert is_stream_response("application/stream+json", False)
    assert not is_stream_response("application/json", True)  # an error answer to a stream request


# --- pricing ---------------------------------------------------------------------------------------


def test_cost_from_billed_units() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=100_000, raw_input_tokens=2_000_000)
    # command-r-plus is an alias of command-r-plus-04-2024 (Cohere's model page), not of the 08-2024 model
    cost, source = compute_cost(PRICING, "chat", "command-r-plus", usage)
    assert source == "pricing" and cost == pytest.approx(3.00 + 1.50)
    cost, _ = compute_cost(PRICING, "chat", "command-r-plus-08-2024", usage)
    assert cost == pytest.approx(3.50)
    cost, _ = compute_cost(PRICING, "rerank", "rerank-v3.5", Usage(search_units=3))
    assert cost == pytest.approx(0.006)
    cost, _ = compute_cost(PRICING, "embed", "embed-english-v3.0", Usage(input_tokens=500_000))
    assert cost == pytest.approx(0.05)


def test_unknown_model_is_null_and_flagged_never_zero() -> None:
    assert compute_cost(PRICING, "chat", "my-finetune-xyz", Usage(input_tokens=5)) == (None, "unknown_model")
    assert compute_cost(PRICING, "chat", None, Usage(input_tokens=5)) == (None, "unknown_model")


def test_custom_cost_overrides_and_free_endpoints() -> None:
    usage = Usage(input_tokens=10, output_tokens=20)
    assert compute_cost(PRICING, "chat", "unknown", usage, CustomCost(total_cost=0.25)) == (0.25, "custom")
    custom = CustomCost(per_token_in=0.1, per_token_out=1)
    cost, source = compute_cost(PRICING, "chat", "command-r", usage, custom)
    assert source == "custom" and cost == pytest.approx(21.0)
    assert compute_cost(PRICING, "tokenize", None, Usage()) == (0.0, "not_billable")
    assert compute_cost(PRICING, "chat", "command-r", Usage()) == (None, None)  # nothing reported


def test_pricing_table_covers_the_documented_models() -> None:
    for model in ("command-r", "command-r-plus", "command-r7b", "command-a", "command-light", "command",
                  "embed-english-v3.0", "embed-multilingual-v3.0", "embed-v4.0", "rerank-v3.5",
                  "rerank-english-v3.0"):  # fmt: skip
        assert PRICING.lookup(model, datetime.now(UTC)) is not None, model


DONE = b"data: [DONE]\n\n"
V2_END = b'event: message-end\ndata: {"type": "message-end", "delta": {}}\n\n'
COMPAT_END = b'data: {"choices": [{"finish_reason": "stop", "delta": {}}]}\n\n'
V1_TEXT = b'{"event_type": "text-generation", "text": "hi"}\n'
V1_END = b'{"event_type": "stream-end", "finish_reason": "COMPLETE", "response": {}}\n'


@pytest.mark.parametrize(
    ("api", "fmt", "before_last", "last"),
    [("v2", "sse", V2_END, DONE), ("compat", "sse", COMPAT_END, DONE), ("v1", "ndjson", V1_TEXT, V1_END)],
)
def test_stream_is_complete_only_with_its_last_data(
    api: str, fmt: str, before_last: bytes, last: bytes
) -> None:
    """The gateway publishes a stream's event when `complete` turns true, before passing that chunk on."""
    watcher = StreamWatcher(api, "chat", fmt)
    watcher.feed(before_last)
    assert not watcher.complete
    watcher.feed(last)
    assert watcher.complete
