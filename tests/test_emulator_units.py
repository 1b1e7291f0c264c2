"""Pure parts of the emulator: the token formula, fault parsing, stream framing, auth, request fields."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cohere_gateway.emulator.errors import ApiError
from cohere_gateway.emulator.faults import Fault, parse_fault, with_random_faults
from cohere_gateway.emulator.results import StreamResult
from cohere_gateway.emulator.server import check_auth, parse_body
from cohere_gateway.emulator.tokens import (
    PREAMBLE_OVERHEAD,
    REPLY_TOKENS,
    count_tokens,
    document_texts,
    expected_chat_usage,
    generate_reply,
    search_units,
    split_tokens,
)
from cohere_gateway.emulator.wire import frames


@pytest.mark.parametrize(
    ("text", "n"),
    [("", 0), ("Hello, world!", 4), ("  spaced   out  ", 2), ("it's 2024.", 5), ("naïve café", 2)],
)
def test_count_tokens_counts_words_and_punctuation(text: str, n: int) -> None:
    assert count_tokens(text) == n


@given(st.text())
def test_split_tokens_is_lossless_and_agrees_with_count(text: str) -> None:
    parts = split_tokens(text)
    assert "".join(parts) == text.rstrip()
    assert len(parts) == count_tokens(text)


@given(st.text(max_size=200), st.one_of(st.none(), st.integers(min_value=0, max_value=50)))
def test_reply_is_deterministic_counted_and_capped(seed: str, max_tokens: int | None) -> None:
    reply = generate_reply(seed, max_tokens)
    assert reply == generate_reply(seed, max_tokens)
    assert count_tokens(reply.text) == reply.output_tokens
    full = generate_reply(seed).output_tokens
    if max_tokens is not None and max_tokens < full:
        assert (reply.output_tokens, reply.finish_reason) == (max_tokens, "MAX_TOKENS")
    else:
        assert (reply.output_tokens, reply.finish_reason) == (full, "COMPLETE")


def test_reply_length_directive() -> None:
    assert generate_reply("hi").output_tokens == REPLY_TOKENS
    assert generate_reply("long one emulator:reply-tokens=300").output_tokens == 300


def test_expected_chat_usage() -> None:
    usage = expected_chat_usage(
        ["Be brief.", "Hello, world!"], documents=[{"title": "A doc", "snippet": "x y"}], max_tokens=5
    )
    assert usage.billed_input_tokens == 3 + 4 + 2 + 2
    assert usage.raw_input_tokens == usage.billed_input_tokens + PREAMBLE_OVERHEAD
    assert usage.billed_output_tokens == usage.raw_output_tokens == 5


def test_document_texts_reads_v1_and_v2_documents() -> None:
    docs = ["plain", {"title": "t", "snippet": "s", "id": "doc-1"}, {"id": "d", "data": {"text": "v2"}}]
    assert document_texts(docs) == ["plain", "t", "s", "v2"]


@pytest.mark.parametrize(("n", "units"), [(0, 1), (1, 1), (100, 1), (101, 2), (250, 3)])
def test_search_units(n: int, units: int) -> None:
    assert search_units(n) == units


def test_parse_fault_items() -> None:
    assert parse_fault(None) == Fault()
    assert parse_fault("status=429, retry-after=2.5; delay-ms=300,drop-mid-stream") == Fault(
        status=429, retry_after_s=2.5, delay_ms=300.0, drop_mid_stream=True
    )
    error = parse_fault("status=429").error()
    assert error is not None and error.status == 429 and error.headers == {"retry-after": "1"}
    assert parse_fault("delay-ms=5").error() is None


@pytest.mark.parametrize(
    "header", ["status=200", "status=abc", "delay-ms=-1", "explode", "drop-mid-stream=1"]
)
def test_parse_fault_rejects_bad_items_with_400(header: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_fault(header)
    assert caught.value.status == 400 and "X-Emulator-Fault" in caught.value.message


def test_random_faults_only_drop_streams() -> None:
    rng = random.Random(0)
    assert with_random_faults(Fault(), error_rate=1, drop_rate=1, streaming=False, rng=rng) == Fault(
        status=500
    )
    assert with_random_faults(Fault(), error_rate=0, drop_rate=1, streaming=True, rng=rng).drop_mid_stream
    assert (
        with_random_faults(Fault(status=429), error_rate=1, drop_rate=0, streaming=True, rng=rng).status
        == 429
    )


def test_frames() -> None:
    events = [{"type": "a", "x": 1}, {"type": "b"}]
    assert frames(StreamResult(events, "ndjson")) == [b'{"type":"a","x":1}\n', b'{"type":"b"}\n']
    assert frames(StreamResult(events[:1], "sse", done=True)) == [
        b'data: {"type":"a","x":1}\n\n',
        b"data: [DONE]\n\n",
    ]
    assert frames(StreamResult(events[1:], "sse-named")) == [b'event: b\ndata: {"type":"b"}\n\n']


@pytest.mark.parametrize("header", ["Bearer k", "Token k", "bearer k", "  Bearer k  "])
def test_auth_accepts(header: str) -> None:
    check_auth(header, "")
    check_auth(header, "k")


@pytest.mark.parametrize(
    ("header", "key"), [(None, ""), ("", ""), ("Bearer ", ""), ("Basic k", ""), ("Bearer x", "k")]
)
def test_auth_rejects_with_401(header: str | None, key: str) -> None:
    with pytest.raises(ApiError) as caught:
        check_auth(header, key)
    assert caught.value.status == 401


@pytest.mark.parametrize("raw", [b"", b"nope", b"[]", b'"s"', b"\xff\xfe"])
def test_parse_body_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(raw)
    assert caught.value.status == 400


def test_parse_body_reads_objects() -> None:
    assert parse_body(json.dumps({"a": 1}).encode()) == {"a": 1}
