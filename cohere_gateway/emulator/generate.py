"""Legacy generation: `/v1/generate`, JSON or NDJSON stream.

Generation i (of `num_generations`) is the reply to the prompt (i = 0) or to the prompt plus "#i";
billed input = tokens of the prompt, output = the sum over generations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cohere.types import GenerateStreamedResponse, Generation

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.chat import new_id
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result, StreamResult
from cohere_gateway.emulator.shapes import checked
from cohere_gateway.emulator.tokens import Reply, count_tokens, generate_reply

MAX_GENERATIONS = 5


def replies(prompt: str, n: int, max_tokens: int | None) -> list[Reply]:
    return [generate_reply(prompt if i == 0 else f"{prompt}\n#{i}", max_tokens) for i in range(n)]


def generate(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    prompt = fields.require_str(body, "prompt")
    model = fields.optional_str(body, "model") or catalog.DEFAULT_GENERATE_MODEL
    catalog.lookup(model, "generate")
    n = fields.optional_int(body, "num_generations", minimum=1) or 1
    if n > MAX_GENERATIONS:
        raise bad_request(f"num_generations must be at most {MAX_GENERATIONS}, got {n}")
    outs = replies(prompt, n, fields.optional_int(body, "max_tokens"))
    input_tokens = count_tokens(prompt)
    output_tokens = sum(r.output_tokens for r in outs)
    meta = {
        "api_version": {"version": "1"},
        "billed_units": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        "tokens": {"input_tokens": input_tokens, "output_tokens": output_tokens},
    }
    generations = [
        {"id": new_id(), "text": r.text, "index": i, "finish_reason": r.finish_reason}
        for i, r in enumerate(outs)
    ]
    response = {"id": new_id(), "generations": generations, "prompt": prompt, "meta": meta}
    if not fields.optional_bool(body, "stream"):
        return JsonResult(checked(Generation, response))
    events: list[dict[str, Any]] = []
    for i, r in enumerate(outs):
        for token in r.tokens:
            event: dict[str, Any] = {"text": token, "is_finished": False, "event_type": "text-generation"}
            if n > 1:
                event["index"] = i
            events.append(event)
    # The SDK's stream-end type has no `meta`; Cohere sends it anyway and the gateway bills from it.
    end = {
        "is_finished": True,
        "event_type": "stream-end",
        "finish_reason": outs[-1].finish_reason,
        "response": response,
    }
    events.append(checked(GenerateStreamedResponse, end))
    return StreamResult(events, "ndjson")
