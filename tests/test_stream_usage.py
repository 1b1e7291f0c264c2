"""The compat stream a client gets when the gateway asked upstream for usage on its behalf: exactly the
stream it asked for, however upstream cut it into chunks. Pure (cohere_gateway.addons.streaming)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cohere_gateway.addons.streaming import StreamWatcher, UsageStripper, want_stream_usage

BASE = {"id": "c1", "created": 1, "model": "command-r", "object": "chat.completion.chunk"}


def sse(objs: list[dict], newline: str = "\n") -> bytes:
    events = [f"data: {json.dumps(o)}{newline}{newline}" for o in objs]
    return ("".join(events) + f"data: [DONE]{newline}{newline}").encode()


def chunks(with_usage: bool) -> list[dict]:
    extra = {"usage": None} if with_usage else {}
    out = [
        {**BASE, **extra, "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None}]}
        for t in ("Hel", "lo ", "wörld")
    ]
    out.append({**BASE, **extra, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if with_usage:
        out.append({**BASE, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}})
    return out


def strip(stream: bytes, cuts: list[int]) -> bytes:
    stripper = UsageStripper()
    out, last = [], 0
    for cut in [*sorted(cuts), len(stream)]:
        out.append(stripper.feed(stream[last:cut]))
        last = cut
    return b"".join(out) + stripper.flush()


def parsed(stream: bytes) -> list[object]:
    return [
        line[6:].decode() if line == b"data: [DONE]" else json.loads(line[6:])
        for line in stream.splitlines()
        if line.startswith(b"data: ")
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2000), max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_the_client_gets_the_stream_it_asked_for_at_any_chunk_boundaries(cuts: list[int], nl: str) -> None:
    upstream = sse(chunks(with_usage=True), nl)
    got = strip(upstream, [c % (len(upstream) + 1) for c in cuts])
    assert parsed(got) == parsed(sse(chunks(with_usage=False), nl))
    assert b'"usage"' not in got and got.endswith(f"data: [DONE]{nl}{nl}".encode())


def test_events_without_usage_pass_byte_for_byte() -> None:
    upstream = b': comment\n\nevent: x\ndata: {"a": 1}\n\n' + sse(chunks(with_usage=False))
    assert strip(upstream, [3, 17, 40]) == upstream


def test_the_watcher_still_sees_the_usage() -> None:
    watcher = StreamWatcher("compat", "chat.completions", "sse")
    watcher.feed(sse(chunks(with_usage=True)))
    assert (watcher.extracted.usage.input_tokens, watcher.extracted.usage.output_tokens) == (5, 3)


def test_when_the_gateway_asks_for_usage() -> None:
    assert want_stream_usage("compat", "chat.completions", True, {})
    assert want_stream_usage("compat", "chat.completions", True, {"stream_options": {"include_usage": False}})
    assert not want_stream_usage(
        "compat", "chat.completions", True, {"stream_options": {"include_usage": True}}
    )
    assert not want_stream_usage("compat", "chat.completions", False, {})
    assert not want_stream_usage("v2", "chat", True, {})
    assert not want_stream_usage(
        "compat", "chat.completions", True, {"stream_options": "yes"}
    )  # upstream's 400


def test_errors_inside_a_200_stream() -> None:
    v1 = StreamWatcher("v1", "generate", "ndjson")
    v1.feed(b'{"event_type": "text-generation", "text": "a"}\n')
    v1.feed(b'{"event_type": "stream-error", "is_finished": true, "finish_reason": "ERROR", "err": "boom"}\n')
    assert v1.stream_error and v1.extracted.error_message == "boom" and v1.complete
    v2 = StreamWatcher("v2", "chat", "sse")
    v2.feed(b'event: message-end\ndata: {"type": "message-end", "delta": {"finish_reason": "ERROR", ')
    v2.feed(b'"error": "overloaded", "usage": {"billed_units": {"input_tokens": 3}}}}\n\n')
    assert v2.stream_error and v2.extracted.error_message == "overloaded"
    assert v2.extracted.usage.input_tokens == 3
    ok = StreamWatcher("v2", "chat", "sse")
    ok.feed(b'data: {"type": "message-end", "delta": {"finish_reason": "COMPLETE"}}\n\n')
    assert not ok.stream_error
