"""What storage would not keep, what ClickHouse refuses, and dead letters too large for Kafka: each goes
to the dead-letter topic with its reason, and the partition moves on. Real broker, the consumer as a
subprocess, real ClickHouse (chdb or the server)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec

from cohere_gateway.consumers.backends import is_data_error
from cohere_gateway.consumers.rows import outside_retention
from cohere_gateway.events import encode
from tests import test_consumer
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_consumer import BASE, ConsumerProcess, counts, dead_letters, event_messages, produce, wait_for

running = test_consumer.running
group = test_consumer.group


def test_events_storage_would_not_keep_are_dead_letters_with_the_reason(
    running: Callable[..., ConsumerProcess], storage: Storage, kafka_bootstrap: str, kafka_topic: str
) -> None:
    now = datetime.now(UTC)
    skewed = [
        make_event(1000, datetime(2001, 9, 9, tzinfo=UTC)),  # a gateway whose clock says 2001
        make_event(1001, now - timedelta(days=120)),  # a replay of what retention (90 days) dropped
        make_event(1002, now + timedelta(days=3)),  # a clock days ahead
    ]
    produce(
        kafka_bootstrap,
        kafka_topic,
        event_messages(0, 60) + [(b"k", encode(ev)) for ev in skewed] + event_messages(60, 40),
    )
    consumer = running()
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_dead_letters_total") == 3, "3 dead letters")
    wait_for(lambda: consumer.landed() == 100, "the 100 good events")
    reasons = sorted(letter["reason"] for letter in dead_letters(kafka_bootstrap, kafka_topic))
    assert sum("older than the raw retention (90 days" in r for r in reasons) == 2, reasons
    assert sum("ahead of the consumer's clock" in r for r in reasons) == 1, reasons
    assert consumer.stop() == 0
    assert counts(storage)["raw"] == counts(storage)["agg_requests"] == 100


def test_an_oversize_dead_letter_does_not_halt_the_consumer(
    running: Callable[..., ConsumerProcess], storage: Storage, kafka_bootstrap: str, kafka_topic: str
) -> None:
    # Almost 1 MiB of not-JSON: as a dead letter, escaped into JSON beside its reason, it would exceed
    # what the producer may send; before, the consumer paused all partitions forever.
    huge = b"\x01not an event " * 70_000
    produce(kafka_bootstrap, kafka_topic, [(b"k", huge), *event_messages(0, 50)])
    consumer = running()
    wait_for(lambda: consumer.landed() == 50, "the events after the huge message")
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_dead_letters_total") == 1, "its dead letter")
    letter = dead_letters(kafka_bootstrap, kafka_topic)[0]
    assert letter["original_truncated"] is True and letter["original_bytes"] == len(huge)
    assert "not a JSON event" in letter["reason"]
    status, ready = consumer.get("/readyz")
    assert status == 200 and ready["ready"] and not ready["paused"]


def test_an_insert_clickhouse_refuses_is_split_until_each_part_inserts(
    running: Callable[..., ConsumerProcess], storage: Storage, kafka_bootstrap: str, kafka_topic: str
) -> None:
    """A replay spanning more days than one insert may touch (ClickHouse: at most 100 partitions per
    insert; possible with a raw retention above 100 days) used to be retried forever. Now the batch is
    split until each part inserts."""
    now = datetime.now(UTC)
    spread = [
        msgspec.structs.replace(make_event(i, BASE), start_time=t, end_time=t + timedelta(seconds=1))
        for i, t in ((i, now - timedelta(days=150) + timedelta(hours=10.5 * i)) for i in range(330))
    ]
    produce(
        kafka_bootstrap,
        kafka_topic,
        [(f"{ev.account_id}/{ev.gateway_id}".encode(), encode(ev)) for ev in spread],
    )
    consumer = running(env={"COHERE_GATEWAY_RETENTION_DAYS": "200"})
    wait_for(
        lambda: consumer.metric("cohere_gateway_consumer_events_inserted_total") == 330,
        "all 330 events: over 144 days, about 110 days in each Kafka partition's batch",
    )
    assert consumer.metric("cohere_gateway_consumer_insert_splits_total") >= 1
    wait_for(  # the hour/day rollups' insert (migration 0016) is split the same way
        lambda: consumer.metric("cohere_gateway_consumer_rollup_events_total") == 330, "their rollups"
    )
    status, ready = consumer.get("/readyz")
    assert status == 200 and ready["ready"]
    assert consumer.get("/api/summary?since=160d&by=none")[1]["total"]["requests"] == 330


def test_data_errors_are_told_from_outages() -> None:
    assert is_data_error("Code: 27. DB::Exception: Cannot parse input: expected '\"' before: 'x'")
    assert is_data_error(
        "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100)"
    )
    assert not is_data_error("Code: 252. DB::Exception: Too many parts (300). Merges are processing")
    assert not is_data_error("Code: 210. DB::NetException: Connection refused")
    assert not is_data_error("Code: 16. DB::Exception: No such column foo in table events")  # operator's


def test_outside_retention_bounds() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert outside_retention(now - timedelta(days=89, hours=23), now, 90) is None
    assert outside_retention(now + timedelta(hours=23), now, 90) is None
    assert "older than" in (outside_retention(now - timedelta(days=90, seconds=1), now, 90) or "")
    assert "ahead" in (outside_retention(now + timedelta(days=1, seconds=1), now, 90) or "")
    assert json.dumps(outside_retention(datetime(2001, 1, 1, tzinfo=UTC), now, 90))
