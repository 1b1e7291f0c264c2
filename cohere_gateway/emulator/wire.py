"""Framing of stream events on the wire: NDJSON lines, SSE `data:` frames, named SSE frames."""

from __future__ import annotations

import orjson

from cohere_gateway.emulator.results import StreamResult

DONE_FRAME = b"data: [DONE]\n\n"


def frames(result: StreamResult) -> list[bytes]:
    out: list[bytes] = []
    for event in result.events:
        data = orjson.dumps(event)
        if result.framing == "ndjson":
            out.append(data + b"\n")
        elif result.framing == "sse":
            out.append(b"data: " + data + b"\n\n")
        else:
            name = str(event.get(result.event_key, "message")).encode()
            out.append(b"event: " + name + b"\ndata: " + data + b"\n\n")
    if result.done:
        out.append(DONE_FRAME)
    return out
