"""The kafka-python internals cohere_gateway/kafka_seam.py calls: fails loudly when kafka-python moves
(the pin changed without rereading the seam, or the pinned version lost an internal). Real broker."""

from __future__ import annotations

import uuid

import kafka
from kafka import KafkaConsumer, KafkaProducer

from cohere_gateway import kafka_seam
from tests.test_consumer import wait_for


def test_the_pinned_kafka_python_is_the_one_the_seam_was_read_against() -> None:
    assert kafka.__version__ == kafka_seam.CHECKED_VERSION, (
        f"kafka-python {kafka.__version__} installed; cohere_gateway/kafka_seam.py was checked against "
        f"{kafka_seam.CHECKED_VERSION}: reread it and update CHECKED_VERSION"
    )
    assert kafka_seam.available()


def test_the_consumer_internals_the_assignment_repair_uses_are_still_there(kafka_bootstrap: str) -> None:
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}")
    try:
        kafka_seam.check(consumer)
        refresh = kafka_seam.request_metadata_refresh(consumer)
        wait_for(lambda: refresh.is_done, "the requested metadata refresh", 10)
        consumer._coordinator.rejoin_needed = False
        kafka_seam.request_rejoin(consumer)
        assert consumer._coordinator.need_rejoin() is False  # not subscribed: nothing to rejoin
        assert consumer._coordinator.rejoin_needed is True
    finally:
        consumer.close()


def test_aborting_a_producer_forces_its_sender_and_fails_what_it_had_not_sent(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    # linger: the record is still in the accumulator when the abort comes
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=60_000)
    kafka_seam.check_producer(producer)
    future = producer.send(kafka_topic, b"never sent")
    kafka_seam.abort_producer(producer)
    assert not producer._sender.is_alive()
    wait_for(lambda: future.is_done, "the aborted record's future", 10)
    assert future.failed()
