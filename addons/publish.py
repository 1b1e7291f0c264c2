"""What the gateway publishes events through: `publish(key, value)` never blocks and never raises,
`close(timeout)` flushes within the grace period, `counters()` feeds /metrics. The real one is the durable
publisher in addons/delivery.py (Kafka with a disk spool); NullPublisher serves when no Kafka is configured.
"""

from __future__ import annotations

from typing import Protocol


class Publisher(Protocol):
    def publish(self, key: bytes, value: bytes) -> None: ...
    def close(self, timeout: float) -> None: ...
    def counters(self) -> dict[str, int]: ...


class NullPublisher:
    """No Kafka configured: events are counted as not published."""

    def __init__(self) -> None:
        self._disabled = 0

    def publish(self, key: bytes, value: bytes) -> None:
        self._disabled += 1

    def close(self, timeout: float) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"events_disabled": self._disabled}
