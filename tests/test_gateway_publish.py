"""addons/publish.py's in-memory KafkaPublisher against the real broker, and against no broker at all."""

from __future__ import annotations

import time

from addons.publish import KafkaPublisher
from tests.fixtures.gateway import EventReader, free_port


def test_publishes_keyed_messages(kafka_bootstrap: str, kafka_topic: str) -> None:
    pub = KafkaPublisher(kafka_bootstrap, kafka_topic)
    for i in range(5):
        pub.publish(b"acct/gw", b'{"n": %d}' % i)
    pub.close(20.0)
    assert pub.counters()["events_published"] == 5
    reader = EventReader(kafka_bootstrap, kafka_topic)
    try:
        deadline = time.monotonic() + 20
        while len(reader.raw) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        raw = list(reader.raw)
    finally:
        reader.close()
    assert [v for _, v in raw] == [b'{"n": %d}' % i for i in range(5)]  # one key: one partition, in order
    assert {k for k, _ in raw} == {b"acct/gw"}


def test_dead_kafka_never_blocks_and_drops_are_counted() -> None:
    pub = KafkaPublisher(f"127.0.0.1:{free_port()}", "t", queue_size=3)
    started = time.monotonic()
    for _ in range(10):
        pub.publish(b"k", b"v")  # must return at once even though no broker answers
    elapsed = time.monotonic() - started
    counts = pub.counters()
    pub.close(1.0)
    # a blocking send would take max_block_ms (5 s) per event; this bounds behaviour, not speed
    assert elapsed < 1.0, "publish() blocked on a dead broker"
    assert counts["events_dropped"] >= 6 and counts["events_published"] == 0
