"""Usage, ids and finish reason from Cohere response bodies: pure functions over parsed JSON.

Shapes (see /work/shared/reference/wire-facts.md): v1 reports `meta.billed_units` + `meta.tokens`; v2 chat
`usage.billed_units` + `usage.tokens` (+ `cached_tokens`); embed (v1 and v2) and rerank keep `meta`;
the OpenAI-compatible API uses `usage.prompt_tokens/completion_tokens`. Missing counts stay None, never 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

from cohere_gateway.events import Usage


@dataclass(slots=True)
class Extracted:
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    response_id: str | None = None
    generation_id: str | None = None
    model: str | None = None
    error_message: str | None = None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def usage_from_cohere(block: Any) -> Usage:
    """`meta` (v1, embed, rerank) or `usage` (v2 chat): both carry `billed_units` and `tokens`."""
    block = _dict(block)
    billed = _dict(block.get("billed_units"))
    tokens = _dict(block.get("tokens"))
    return Usage(
        input_tokens=_int(billed.get("input_tokens")),
        output_tokens=_int(billed.get("output_tokens")),
        raw_input_tokens=_int(tokens.get("input_tokens")),
        raw_output_tokens=_int(tokens.get("output_tokens")),
        cached_tokens=_int(block.get("cached_tokens")),
        search_units=_int(billed.get("search_units")),
        classifications=_int(billed.get("classifications")),
        images=_int(billed.get("images")),
        image_tokens=_int(billed.get("image_tokens")),
    )


def usage_from_compat(block: Any) -> Usage:
    block = _dict(block)
    details = _dict(block.get("prompt_tokens_details"))
    return Usage(
        input_tokens=_int(block.get("prompt_tokens")),
        output_tokens=_int(block.get("completion_tokens")),
        cached_tokens=_int(details.get("cached_tokens")),
    )


def count_embeddings(embeddings: Any) -> int | None:
    if isinstance(embeddings, list):
        return len(embeddings)
    # embeddings_by_type: {"float": [...], "int8": [...]}, one vector per input in each
    if isinstance(embeddings, dict):
        for vectors in embeddings.values():
            if isinstance(vectors, list):
                return len(vectors)
    return None


def error_message_of(body: Any) -> str | None:
    body = _dict(body)
    msg = body.get("message")
    if isinstance(msg, str):
        return msg
    err = body.get("error")  # OpenAI-style {"error": {"message": ...}}
    if isinstance(err, dict):
        return _str(err.get("message"))
    return _str(err)


def extract_json(api_version: str, endpoint: str, body: Any) -> Extracted:
    """Everything an event needs from one whole (non-streamed) JSON response."""
    if not isinstance(body, dict):
        return Extracted()
    if api_version == "compat":
        choices = body.get("choices")
        first = _dict(choices[0]) if isinstance(choices, list) and choices else {}
        usage = usage_from_compat(body.get("usage"))
        if endpoint == "embeddings" and isinstance(body.get("data"), list):
            usage.embeddings = len(body["data"])
        return Extracted(
            usage=usage,
            finish_reason=_str(first.get("finish_reason")),
            response_id=_str(body.get("id")),
            model=_str(body.get("model")),
            error_message=error_message_of(body),
        )
    usage = usage_from_cohere(body["usage"] if isinstance(body.get("usage"), dict) else body.get("meta"))
    if endpoint == "embed":
        usage.embeddings = count_embeddings(body.get("embeddings"))
    finish = _str(body.get("finish_reason"))
    generations = body.get("generations")
    if finish is None and isinstance(generations, list) and generations:
        finish = _str(_dict(generations[0]).get("finish_reason"))
    return Extracted(
        usage=usage,
        finish_reason=finish,
        response_id=_str(body.get("response_id")) or _str(body.get("id")),
        generation_id=_str(body.get("generation_id")),
        error_message=error_message_of(body),
    )


def extract_body(api_version: str, endpoint: str, raw: bytes | None) -> Extracted:
    """Like `extract_json` from raw bytes; a body that is not JSON yields an empty `Extracted`."""
    if not raw:
        return Extracted()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Extracted()
    return extract_json(api_version, endpoint, body)


def request_fields(raw: bytes | None) -> tuple[dict | None, str | None, bool]:
    """(parsed body or None, model, stream flag) of a request body. Malformed JSON is fine: it is
    forwarded for Cohere to answer, we just learn nothing from it."""
    if not raw:
        return None, None, False
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson refuses what Python's json takes (a lone surrogate "\ud800", invalid UTF-8 in a
        # string); the model and stream flag are still worth knowing. The event sanitises the strings.
        try:
            body = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            return None, None, False
    if not isinstance(body, dict):
        return None, None, False
    return body, _str(body.get("model")), body.get("stream") is True
