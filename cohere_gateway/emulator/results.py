"""What an endpoint answers, before any framing or fault: a JSON document or a list of stream events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NDJSON = "application/stream+json"
SSE = "text/event-stream"


@dataclass(frozen=True)
class JsonResult:
    payload: dict[str, Any]
    status: int = 200


@dataclass(frozen=True)
class StreamResult:
    """`framing` is "ndjson" (one JSON object per line), "sse" (`data:` lines) or "sse-named"
    (`event: <type>` then `data:`); `done` appends `data: [DONE]`."""

    events: list[dict[str, Any]]
    framing: str
    event_key: str = "type"  # where the SSE event name is read from, for "sse-named"
    done: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return NDJSON if self.framing == "ndjson" else SSE


Result = JsonResult | StreamResult
