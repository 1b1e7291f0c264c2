"""Publishing events to Kafka off the request path.

Protocol shared with the durable spool publisher (addons/delivery.py): `publish(key, value)` never blocks
and never raises, `close(timeout)`, `counters()`. This one keeps events in a bounded in-memory queue that a
background thread hands to kafka-python; when Kafka is down or slow and the queue fills, events are
dropped - counted and logged, never delaying a client.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Protocol

log = logging.getLogger("cohere_gateway.publish")

_STOP = (b"", b"")


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


class KafkaPublisher:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        queue_size: int = 10_000,
        linger_ms: int = 5,
        max_block_ms: int = 5_000,
        client_id: str = "cohere-gateway",
    ) -> None:
        self.topic = topic
        self._config = {
            "bootstrap_servers": bootstrap.split(","),
            "acks": "all",
            "linger_ms": linger_ms,
            "max_block_ms": max_block_ms,  # bounds how long the *sender thread* waits on a dead cluster
            "client_id": client_id,
            "retries": 5,
        }
        self._queue: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._counts = {"events_queued": 0, "events_published": 0, "events_failed": 0, "events_dropped": 0}
        self._last_drop_log = 0.0
        self._producer = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="kafka-publisher", daemon=True)
        self._thread.start()

    def publish(self, key: bytes, value: bytes) -> None:
        try:
            self._queue.put_nowait((key, value))
        except queue.Full:
            self._count("events_dropped")
            self._log_drop("publish queue full (Kafka down or slow)")
            return
        self._count("events_queued")

    def counters(self) -> dict[str, int]:
        with self._lock:
            out = dict(self._counts)
        out["events_pending"] = self._queue.qsize()
        return out

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._closing = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, timeout))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        producer = self._producer
        if producer is not None:
            try:
                producer.flush(timeout=max(0.1, deadline - time.monotonic()))
                producer.close(timeout=max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                log.warning("closing the Kafka producer failed: %s", exc)
        lost = self._queue.qsize()
        if lost:
            self._count("events_dropped", lost)
            log.warning("%d events were still queued at shutdown and are dropped", lost)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def _log_drop(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_drop_log > 10:  # one line per 10 s, not one per event
            self._last_drop_log = now
            log.warning("dropping events: %s; %d dropped so far", why, self._counts["events_dropped"])

    def _connect(self):  # -> KafkaProducer | None
        from kafka import KafkaProducer

        try:
            return KafkaProducer(**self._config)
        except Exception as exc:
            log.warning("cannot reach Kafka at %s: %s", ",".join(self._config["bootstrap_servers"]), exc)
            return None

    def _on_sent(self, _metadata: object) -> None:
        self._count("events_published")

    def _on_failed(self, exc: BaseException) -> None:
        self._count("events_failed")
        self._log_drop(f"Kafka refused an event: {exc}")

    def _run(self) -> None:
        backoff = 0.5
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            while self._producer is None:
                self._producer = self._connect()
                if self._producer is None:
                    if self._closing:
                        self._count("events_failed")
                        break
                    time.sleep(backoff)  # reconnect pacing; events wait (or drop) in the bounded queue
                    backoff = min(backoff * 2, 10.0)
            if self._producer is None:
                continue
            backoff = 0.5
            key, value = item
            try:
                future = self._producer.send(self.topic, key=key, value=value)
            except Exception as exc:
                self._on_failed(exc)
                continue
            future.add_callback(self._on_sent)
            future.add_errback(self._on_failed)
