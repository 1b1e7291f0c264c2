"""What goes to the dead-letter topic for a message that is not a valid event. Pure."""

from __future__ import annotations

import base64
from typing import Any

import orjson


def dead_letter(record: Any, reason: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The DLQ value (JSON: reason, where the message came from, the message itself) and headers that
    repeat the origin so tools can route on them without parsing the value."""
    value = record.value or b""
    try:
        original: dict[str, str] = {"original": value.decode("utf-8")}
    except UnicodeDecodeError:
        original = {"original_base64": base64.b64encode(value).decode()}
    payload = {
        "reason": reason,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key": record.key.decode("utf-8", "replace") if record.key else None,
        **original,
    }
    headers = [
        ("dlq.reason", reason.encode()[:1000]),
        ("dlq.topic", record.topic.encode()),
        ("dlq.partition", str(record.partition).encode()),
        ("dlq.offset", str(record.offset).encode()),
    ]
    return orjson.dumps(payload), headers
