"""What goes to the dead-letter topic for a message that is not a valid event. Pure."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import orjson

# The most of the original message a dead letter carries. The producer refuses records over 1 MiB
# (kafka-python's max_request_size, like the broker's default message.max.bytes), and a message that
# size, escaped into JSON beside the reason, would be larger: refused, the consumer could never commit
# past it. Base64 grows 4/3 and JSON escaping up to 6x for control bytes, so the cut leaves room for both.
MAX_ORIGINAL_BYTES = 128 * 1024
MAX_REASON_CHARS = 2000


def dead_letter(record: Any, reason: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The DLQ value (JSON: reason, where the message came from, the message itself) and headers that
    repeat the origin so tools can route on them without parsing the value. A long original is cut to
    MAX_ORIGINAL_BYTES (`original_truncated`, its full size and SHA-256 beside it) so the dead letter
    always fits a Kafka record."""
    value = record.value or b""
    reason = reason[:MAX_REASON_CHARS]
    original: dict[str, Any] = {}
    if len(value) > MAX_ORIGINAL_BYTES:
        original = {
            "original_truncated": True,
            "original_bytes": len(value),
            "original_sha256": hashlib.sha256(value).hexdigest(),
        }
        value = value[:MAX_ORIGINAL_BYTES]
    try:
        original["original"] = value.decode("utf-8")
    except UnicodeDecodeError:
        original["original_base64"] = base64.b64encode(value).decode()
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
