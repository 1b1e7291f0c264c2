"""Scale-out for real: several `cohere-gateway consume` processes in one consumer group share a 6-partition
topic of a real Kafka broker and write to one real ClickHouse server through clickhouse-connect. A member
is killed with SIGKILL mid-run; the server itself is stopped for 30 s mid-run. Every event lands exactly
once: raw rows, committed offsets, and the per-minute aggregates, compared with a recomputation from the
raw events. The faults are real process deaths: SIGKILL from outside, and the consumer's test hook that
SIGKILLs itself between an insert and its commit (no other moment can be hit on purpose from outside).
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cohere_gateway.consumers.consumer import CRASH_AFTER_INSERTS_ENV
from tests.fixtures.clickhouse import Storage, local_server, server_database
from tests.fixtures.kafka import create_topic
from tests.test_consumer import (
    ConsumerProcess,
    committed,
    counts,
    event_messages,
    expected_errors,
    produce,
    wait_for,
)
from tests.test_storage import assert_aggregates_match_raw

PARTITIONS = 6
OUTAGE_S = 30.0
INSERTED = "cohere_gateway_consumer_events_inserted_total"
Start = Callable[..., ConsumerProcess]  # (storage, group, name, env=None): a member started


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    return create_topic(kafka_bootstrap, f"scale-{uuid.uuid4().hex[:8]}", PARTITIONS)


@pytest.fixture
def fleet(kafka_bootstrap: str, topic: str, tmp_path: Path) -> Iterator[Start]:
    started: list[ConsumerProcess] = []

    def start(storage: Storage, group: str, name: str, env: dict[str, str] | None = None) -> ConsumerProcess:
        proc = ConsumerProcess(storage, kafka_bootstrap, topic, group, tmp_path / name, env=env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
        print(f"--- {proc.log.name} (exit {proc.proc.returncode}) ---\n{proc.log.read_text()[-3000:]}")


def partitions(consumer: ConsumerProcess) -> set[int]:
    try:
        _, ready = consumer.get("/readyz")
    except OSError:  # a member that just died (on purpose) has no API any more
        return set()
    return set(ready["partitions"]) if isinstance(ready, dict) else set()


def join_at_once(start: Start, storage: Storage, group: str, names: str) -> list[ConsumerProcess]:
    """Members started together, as a deployment starts them (the assignment watch repairs a join that
    kafka-python 3.0.12 leaves partial: docs/storage.md)."""
    members = [start(storage, group, name) for name in names]
    wait_for(lambda: split_over(members), f"{PARTITIONS} partitions split over {len(members)} consumers", 90)
    return members


def split_over(members: list[ConsumerProcess]) -> bool:
    owned = [partitions(m) for m in members]
    union = set().union(*owned)
    return all(owned) and union == set(range(PARTITIONS)) and sum(map(len, owned)) == PARTITIONS


def assert_landed_exactly_once(storage: Storage, count: int) -> None:
    assert counts(storage) == {
        "raw": count,  # not merely after FINAL: no duplicate row was ever inserted
        "raw_final": count,
        "distinct_ids": count,
        "agg_requests": count,
        "agg_errors": expected_errors(0, count),
    }
    assert assert_aggregates_match_raw(storage.open()) > 50


def produce_paced(bootstrap: str, topic: str, start: int, count: int, chunk: int = 50) -> threading.Thread:
    """Events arriving while the test acts, not all up front; the pause paces the traffic (nothing to
    await here)."""

    def run() -> None:
        for first in range(start, start + count, chunk):
            produce(bootstrap, topic, event_messages(first, min(chunk, start + count - first)), PARTITIONS)
            time.sleep(0.1)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(300)
def test_three_consumers_share_six_partitions_and_a_kill_9_mid_run_loses_and_doubles_nothing(
    fleet: Start,
    clickhouse_server_url: str,
    kafka_bootstrap: str,
    topic: str,
    tmp_path: Path,
) -> None:
    group = f"scale-{uuid.uuid4().hex[:8]}"
    with server_database(clickhouse_server_url) as url:
        storage = Storage(data_dir=tmp_path / "unused", url=url)
        a, b, c = join_at_once(fleet, storage, group, "abc")

        produce(kafka_bootstrap, topic, event_messages(0, 300), PARTITIONS)
        wait_for(lambda: counts(storage)["raw"] == 300, "the first 300 events")
        # Each wrote its share. Its counter moves when the insert's answer reaches it, a little after
        # the rows are visible to the query above, so this is awaited too.
        wait_for(lambda: all(m.metric(INSERTED) > 0 for m in (a, b, c)), "each member's insert counted")

        traffic = produce_paced(kafka_bootstrap, topic, 300, 1000)
        before = b.metric(INSERTED)
        wait_for(lambda: b.metric(INSERTED) > before, "b to write events of the running traffic")
        b.proc.send_signal(signal.SIGKILL)
        assert b.proc.wait(timeout=30) == -signal.SIGKILL
        # Its replacement dies too, at the worst moment: its first batch written, not committed. The
        # next owner of those partitions re-cuts that range from the shared intent log.
        b2 = fleet(storage, group, "b2", {CRASH_AFTER_INSERTS_ENV: "1"})
        wait_for(lambda: b2.proc.poll() is not None or partitions(b2), "b2 to join", 90)
        traffic.join(timeout=120)
        assert not traffic.is_alive()
        produce(kafka_bootstrap, topic, event_messages(1300, 60), PARTITIONS)  # work on every partition
        assert b2.proc.wait(timeout=90) == -signal.SIGKILL
        b3 = fleet(storage, group, "b3")

        wait_for(lambda: counts(storage)["raw_final"] == 1360, "all 1360 events", 120)
        wait_for(
            lambda: committed(kafka_bootstrap, group, topic, PARTITIONS) == 1360, "every offset committed"
        )
        for member in (a, c, b3):
            assert member.stop() == 0
        assert_landed_exactly_once(storage, 1360)


@pytest.mark.timeout(300)
def test_clickhouse_server_down_30s_mid_run_consumers_pause_and_resume_losing_nothing(
    fleet: Start, kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    """Its own server (not the session's): this test stops it, and restarts it on the same port and data."""
    group = f"outage-{uuid.uuid4().hex[:8]}"
    with local_server(tmp_path / "server") as server, server_database(server.url()) as url:
        storage = Storage(data_dir=tmp_path / "unused", url=url)
        a, b = join_at_once(fleet, storage, group, "ab")
        produce(kafka_bootstrap, topic, event_messages(0, 300), PARTITIONS)
        wait_for(
            lambda: committed(kafka_bootstrap, group, topic, PARTITIONS) == 300, "the first 300 committed"
        )
        storage.close()

        server.stop()
        down_since = time.monotonic()
        traffic = produce_paced(kafka_bootstrap, topic, 300, 500)
        for member in (a, b):
            wait_for(lambda m=member: m.get("/readyz")[0] == 503, "each consumer to report storage down")
            wait_for(
                lambda m=member: m.metric("cohere_gateway_consumer_insert_failures_total") >= 1, "retries"
            )
        traffic.join(timeout=60)
        assert committed(kafka_bootstrap, group, topic, PARTITIONS) == 300  # nothing it could not write
        # The outage's length is the point of the test: hold the server down for the rest of it.
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_since)))

        server.start()
        for member in (a, b):
            wait_for(lambda m=member: m.get("/readyz")[0] == 200, "each consumer to resume", 60)
        wait_for(lambda: committed(kafka_bootstrap, group, topic, PARTITIONS) == 800, "all 800 committed", 60)
        assert a.stop() == 0 and b.stop() == 0
        assert_landed_exactly_once(storage, 800)
