"""OpenAI-compatible chat: `POST /compatibility/v1/chat/completions`, JSON or SSE chunks.

Usage: `prompt_tokens` is the billed input of tokens.py, `completion_tokens` the reply's tokens. A
stream ends with a chunk carrying the finish reason, then (with `stream_options.include_usage`) a chunk
with empty `choices` and the usage, then `data: [DONE]`, as OpenAI's API does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.chat import ChatRequest, message_texts, new_id
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result, StreamResult
from cohere_gateway.emulator.tokens import chat_usage

FINISH_REASONS = {"COMPLETE": "stop", "MAX_TOKENS": "length"}


def parse(body: dict[str, Any]) -> tuple[ChatRequest, bool]:
    """The request and whether the stream should end with a usage chunk."""
    model = fields.require_str(body, "model")
    messages = fields.require_list(body, "messages")
    catalog.lookup(model, "chat")
    texts, last_user = message_texts(messages)
    max_tokens = fields.optional_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = fields.optional_int(body, "max_tokens")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request('stream_options must be an object such as {"include_usage": true}')
    request = ChatRequest(
        model=model,
        input_texts=tuple(texts),
        seed=last_user,
        max_tokens=max_tokens,
        stream=fields.optional_bool(body, "stream"),
    )
    return request, bool(options.get("include_usage"))


def chat_completions(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    request, include_usage = parse(body)
    reply = request.reply()
    counted = chat_usage(request.input_texts, reply)
    usage = {
        "prompt_tokens": counted.billed_input_tokens,
        "completion_tokens": counted.billed_output_tokens,
        "total_tokens": counted.billed_input_tokens + counted.billed_output_tokens,
    }
    finish_reason = FINISH_REASONS[reply.finish_reason]
    base = {"id": new_id(), "created": int(time.time()), "model": request.model}
    if not request.stream:
        return JsonResult(
            {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply.text},
                        "finish_reason": finish_reason,
                    }
                ],
                "usage": usage,
            }
        )

    chunk = {**base, "object": "chat.completion.chunk"}
    if include_usage:
        chunk["usage"] = None

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    events = [
        choice({"role": "assistant", "content": ""}),
        *(choice({"content": t}) for t in reply.tokens),
        choice({}, finish_reason),
    ]
    if include_usage:
        events.append({**chunk, "choices": [], "usage": usage})
    return StreamResult(events, "sse", done=True)
