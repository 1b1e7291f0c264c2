"""DurablePublisher against the real Kafka broker: acknowledged delivery, spooling, replay, order, bounds."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, TopicPartition

from cohere_gateway import events
from cohere_gateway.addons.delivery import DeliveryConfig, DurablePublisher, make_producer
from cohere_gateway.addons.spool import HEADER, SpoolInUseError, encode_record
from tests.fixtures.kafka import dead_bootstrap
from tests.test_events import make_event


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[tuple[bytes, dict[str, Any]]]:
    """Every record in the topic as (key, event dict), in offset order per partition.

    Reads up to the partitions' end offsets, so "exactly N records" is checked without waiting for
    silence: the producer side must be closed first.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        out: list[tuple[int, int, bytes, dict[str, Any]]] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout}s")
            for tp, records in consumer.poll(timeout_ms=500).items():
                out += [
                    (tp.partition, r.offset, r.key, events.to_builtins(events.decode(r.value)))
                    for r in records
                ]
    finally:
        consumer.close()
    out.sort(key=lambda r: (r[0], r[1]))
    return [(key, event) for _, _, key, event in out]


def per_key_sequences(records: list[tuple[bytes, dict[str, Any]]]) -> dict[bytes, list[int]]:
    seqs: dict[bytes, list[int]] = {}
    for key, event in records:
        seqs.setdefault(key, []).append(int(event["metadata"]["n"]))
    return seqs


def publish_events(pub: DurablePublisher, start: int, count: int, *, gateways: int = 3) -> list[str]:
    ids = []
    for n in range(start, start + count):
        event = make_event(gateway_id=f"gw{n % gateways}", metadata={"n": str(n)})
        pub.publish(f"{event.account_id}/{event.gateway_id}".encode(), events.encode(event))
        ids.append(event.event_id)
    return ids


def config(bootstrap: str, topic: str, spool_dir: Path, **overrides: Any) -> DeliveryConfig:
    fields: dict[str, Any] = {"delivery_timeout_ms": 1500, "max_pending_events": 500}
    return DeliveryConfig(bootstrap=bootstrap, topic=topic, spool_dir=spool_dir, **(fields | overrides))


def assert_in_order(records: list[tuple[bytes, dict[str, Any]]], total: int) -> None:
    for key, seq in per_key_sequences(records).items():
        assert seq == sorted(seq), f"events of {key!r} out of order"
    assert sorted(int(e["metadata"]["n"]) for _, e in records) == list(range(total))


def test_events_are_delivered_once_in_order_with_acks_all_and_idempotence(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    producers: list[Any] = []

    def factory(bootstrap: str, timeout_ms: int) -> Any:
        producers.append(make_producer(bootstrap, timeout_ms))
        return producers[-1]

    pub = DurablePublisher(config(kafka_bootstrap, kafka_topic, tmp_path / "spool"), producer_factory=factory)
    ids = publish_events(pub, 0, 300)
    wait_for(lambda: pub.counters()["events_delivered"] == 300, 30, "300 acknowledged events")
    pub.close(5.0)

    # kafka-python raises at construction if explicit idempotence is unsupported; against Kafka 4.1 it holds.
    assert producers and producers[0].config["enable_idempotence"] is True
    assert producers[0].config["acks"] == -1
    records = read_topic(kafka_bootstrap, kafka_topic)
    assert [e["event_id"] for _, e in records] != [] and sorted(e["event_id"] for _, e in records) == sorted(
        ids
    )
    assert_in_order(records, 300)
    counts = pub.counters()
    assert counts["events_queued"] == 300 and counts["events_spooled"] == 0 and counts["events_dropped"] == 0
    assert not list((tmp_path / "spool").glob("*.seg"))


def test_unreachable_kafka_spools_everything_and_the_next_start_replays_it_before_new_events(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    down = DurablePublisher(config(dead_bootstrap(), kafka_topic, spool_dir))
    publish_events(down, 0, 60)
    wait_for(lambda: down.counters()["events_spooled"] == 60, 20, "60 spooled events")
    down.close(1.0)
    publish_events(down, 60, 1)  # an exchange finishing after close(): still spooled, not lost
    counts = down.counters()
    assert counts["events_spooled"] == 61 and counts["events_dropped"] == 0
    assert counts["events_delivered"] == 0 and counts["kafka_outages"] == 1
    assert list(spool_dir.glob("*.seg"))

    up = DurablePublisher(config(kafka_bootstrap, kafka_topic, spool_dir))
    publish_events(up, 61, 39)  # while the old spool is still being replayed: must queue behind it
    wait_for(lambda: up.counters()["events_delivered"] == 100, 30, "100 acknowledged events")
    up.close(5.0)

    records = read_topic(kafka_bootstrap, kafka_topic)
    assert len(records) == 100
    assert_in_order(records, 100)
    assert up.counters()["events_replayed"] >= 61
    assert not list(spool_dir.glob("*.seg")), "a drained spool is truncated"


def test_a_corrupt_spool_record_is_skipped_counted_and_the_rest_delivered(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    down = DurablePublisher(config(dead_bootstrap(), kafka_topic, spool_dir))
    publish_events(down, 0, 20, gateways=1)
    wait_for(lambda: down.counters()["events_spooled"] == 20, 20, "20 spooled events")
    down.close(1.0)

    segment = sorted(spool_dir.glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    first_len = HEADER.unpack_from(data, 0)[1] + HEADER.size
    data[first_len + HEADER.size + 30] ^= 0xFF  # inside the payload of the second record
    segment.write_bytes(bytes(data))

    up = DurablePublisher(config(kafka_bootstrap, kafka_topic, spool_dir))
    wait_for(lambda: up.counters()["events_delivered"] == 19, 30, "19 acknowledged events")
    up.close(5.0)
    assert up.counters()["spool_corrupt_records"] == 1
    records = read_topic(kafka_bootstrap, kafka_topic)
    assert [int(e["metadata"]["n"]) for _, e in records] == [0, *range(2, 20)]


def test_spool_cap_drops_new_events_counts_them_and_keeps_the_spooled_ones(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    record_size = len(encode_record(b"acct-1/gw0", events.encode(make_event(metadata={"n": "0"}))))
    cap = record_size * 30 + record_size // 2
    down = DurablePublisher(config(dead_bootstrap(), kafka_topic, spool_dir, spool_max_bytes=cap))
    publish_events(down, 0, 100, gateways=1)
    wait_for(
        lambda: down.counters()["events_spooled"] + down.counters()["events_dropped"] == 100,
        20,
        "all handled",
    )
    down.close(1.0)
    counts = down.counters()
    assert counts["events_spooled"] == 30 and counts["events_dropped"] == 70
    assert counts["spool_bytes_pending"] <= cap

    up = DurablePublisher(config(kafka_bootstrap, kafka_topic, spool_dir, spool_max_bytes=cap))
    wait_for(lambda: up.counters()["events_replayed"] == 30, 30, "30 replayed events")
    up.close(5.0)
    records = read_topic(kafka_bootstrap, kafka_topic)
    assert [int(e["metadata"]["n"]) for _, e in records] == list(range(30))


def test_one_spool_directory_cannot_serve_two_publishers(tmp_path: Path) -> None:
    first = DurablePublisher(config(dead_bootstrap(), "t", tmp_path / "spool"))
    try:
        with pytest.raises(SpoolInUseError, match="in use by another process"):
            DurablePublisher(config(dead_bootstrap(), "t", tmp_path / "spool"))
    finally:
        first.close(0.5)


def test_bad_settings_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delivery_timeout_ms must be at least 100"):
        DurablePublisher(config(dead_bootstrap(), "t", tmp_path, delivery_timeout_ms=5))
    with pytest.raises(ValueError, match="max_pending_events must be at least 1"):
        DurablePublisher(config(dead_bootstrap(), "t", tmp_path, max_pending_events=0))
