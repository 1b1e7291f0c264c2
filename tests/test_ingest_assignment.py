"""Ingest never stalls on an empty or partial assignment (consumers/assignment.py).

Real Kafka broker throughout. The race itself is made deterministic with one seam, in-process: the
consumer's metadata responses leave the topic out until shortly after the group's leader has assigned
(as a response requested before the subscription does when it lands after it: kafka-python then also
forgets the refresh it had pending, and asks again only after metadata_max_age_ms, 5 min). Everything
else is the real client, broker and group protocol; without the watch the same setup stays empty.
The end-to-end cases (partitions added to a running topic, a consumer started before its topic exists)
run `cohere-gateway consume` as a real process with no seam at all.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cohere_gateway.consumers.assignment import CHECK_INTERVAL_S, GRACE_S, GroupView, Watch, diagnose
from cohere_gateway.settings import DEFAULT_PARTITIONS
from tests import test_consumer
from tests.fixtures.clickhouse import Storage
from tests.fixtures.kafka import create_topic, topic_partitions
from tests.test_consumer import ConsumerProcess, event_messages, wait_for

# The consumer-process fixtures of tests/test_consumer.py, shared rather than written twice.
group = test_consumer.group
running = test_consumer.running

HOLD_AFTER_S = 2.0  # shorter than GRACE_S, so the repair's own refresh gets the real answer
# A repair needs two observations of the stall GRACE_S apart, then a rebalance: well inside this.
REPAIR_DEADLINE_S = CHECK_INTERVAL_S + GRACE_S + 15


# -- what counts as stalled ---------------------------------------------------------------------------


def view(partitions: int | None, state: str = "Stable", **members: set[int]) -> GroupView:
    return GroupView(partitions, state, {k: frozenset(v) for k, v in members.items()})


@pytest.mark.parametrize(
    ("group_view", "local", "stalled"),
    [
        (view(3, me={0, 1, 2}), {0, 1, 2}, None),
        (view(3, me={0}, other={1, 2}), {0}, None),
        (view(1, me=set(), other={0}), set(), None),  # more members than partitions: fine
        (view(3, me=set(), other={0, 1, 2}), set(), "was assigned no partition while another member reads"),
        (view(3, me=set()), set(), "partitions [0, 1, 2] of 3 are assigned to no member"),
        (view(6, me={0, 1, 2}), {0, 1, 2}, "partitions [3, 4, 5] of 6 are assigned to no member"),
        (view(3, me={0}, other={1, 2}), set(), "assigned partitions [0] to this consumer, which reads []"),
        (view(3, "PreparingRebalance", me=set()), set(), None),  # mid-rebalance: not judged
        (view(3, "CompletingRebalance", me=set()), set(), None),
        (view(None, me=set()), set(), None),  # the broker does not know the topic
        # Left out of the generation the others formed: seen on CI, a member idle for minutes.
        (view(3, other={0, 1, 2}), set(), "is not a member of the group while another member reads"),
        (view(2, other={0}, third={1}), set(), None),  # not a member, but nothing to take over
    ],
)
def test_diagnose(group_view: GroupView, local: set[int], stalled: str | None) -> None:
    reason = diagnose(group_view, "me", frozenset(local))
    if stalled is None:
        assert reason is None
    else:
        assert reason is not None and stalled in reason


# -- what the watch does about a stall: the broker's view given, a stand-in consumer ----------------------


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


class _StandInConsumer:
    """What Watch.tick touches: assignment(), and through kafka_seam the cluster's request_update() and
    the coordinator's request_rejoin(). A stand-in, because the state this reproduces (a member that
    kafka-python believes joined but the group does not list, seen on CI) cannot be made on purpose
    with a real client."""

    def __init__(self, topic: str, partitions: set[int]) -> None:
        from types import SimpleNamespace

        self.topic, self.partitions, self.rejoins = topic, partitions, 0
        done = SimpleNamespace(is_done=True)
        self._client = SimpleNamespace(cluster=SimpleNamespace(request_update=lambda: done))
        self._coordinator = SimpleNamespace(request_rejoin=self._rejoin)

    def _rejoin(self) -> None:
        self.rejoins += 1

    def assignment(self) -> set[Any]:
        from kafka import TopicPartition

        return {TopicPartition(self.topic, p) for p in self.partitions}


def _watched(consumer: _StandInConsumer) -> tuple[Watch, _Clock, list[str]]:
    clock, notes = _Clock(), []
    return Watch("unused:9092", consumer.topic, "g", "me", note=notes.append, clock=clock), clock, notes


def test_a_member_the_group_left_out_rejoins_and_then_is_replaced_by_a_new_member() -> None:
    consumer = _StandInConsumer("t", set())
    watch, clock, notes = _watched(consumer)
    left_out = view(6, a={0, 1, 2}, b={3, 4, 5})
    answers = []
    for _ in range(60):  # 30 s of ticks every 0.5 s (two repairs COOLDOWN_S apart, then the third)
        answers.append(watch.tick(consumer))
        watch.observe(left_out)
        clock.now += 0.5
    assert consumer.rejoins == 2 and answers.count(True) == 1  # two rejoins, then a new member
    assert "is not a member of the group" in notes[0] and "new member" in notes[-1]


def test_a_stall_the_consumer_has_left_by_the_time_it_is_judged_is_not_repaired() -> None:
    consumer = _StandInConsumer("t", set())
    watch, clock, notes = _watched(consumer)
    watch.tick(consumer)
    watch.observe(view(6, a={0, 1, 2}, b={3, 4, 5}))  # seen while this consumer was joining
    consumer.partitions = {4, 5}  # a rebalance gave it work since; the broker has not been asked again
    for _ in range(20):
        clock.now += 0.5
        assert watch.tick(consumer) is False
    assert consumer.rejoins == 0 and watch.repairs == 0 and not notes


# -- the race, deterministically ------------------------------------------------------------------------


class HeldMember:
    """A real KafkaConsumer in a poll loop (as the consumer's Consumer.run drives it), whose metadata
    responses leave the topic out until HOLD_AFTER_S after its first assignment (the seam, see the module
    doc): the refresh the leader asks for while assigning is answered inside that window."""

    def __init__(self, bootstrap: str, topic: str, group_id: str, watched: bool) -> None:
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        self.topic = topic
        self.client_id = f"held-{uuid.uuid4().hex[:8]}"
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id, client_id=self.client_id, enable_auto_commit=False
        )
        self.first_assignment = threading.Event()
        self.released_at: float | None = None  # HOLD_AFTER_S after the first assignment
        cluster = self.consumer._client.cluster
        apply = cluster.update_metadata

        def response(metadata: Any) -> Any:
            if self.released_at is None or time.monotonic() < self.released_at:
                metadata.topics = [t for t in metadata.topics if t.name != topic]
            return apply(metadata)

        cluster.update_metadata = response
        member = self

        class Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                pass

            def on_partitions_assigned(self, assigned: Any) -> None:
                if not member.first_assignment.is_set():
                    member.released_at = time.monotonic() + HOLD_AFTER_S
                    member.first_assignment.set()

        self.consumer.subscribe([topic], listener=Listener())
        self.watch = Watch(bootstrap, topic, group_id, self.client_id) if watched else None
        self.assigned: frozenset[int] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> HeldMember:
        if self.watch is not None:
            self.watch.start()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.consumer.poll(timeout_ms=100)
            if self.watch is not None:
                self.watch.tick(self.consumer)
            self.assigned = frozenset(tp.partition for tp in self.consumer.assignment())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.watch is not None:
            self.watch.stop()
        self.consumer.close(autocommit=False)


@pytest.fixture
def members(kafka_bootstrap: str) -> Iterator[Callable[..., HeldMember]]:
    started: list[HeldMember] = []

    def start(topic: str, group_id: str, watched: bool) -> HeldMember:
        started.append(HeldMember(kafka_bootstrap, topic, group_id, watched).start())
        return started[-1]

    yield start
    for member in started:
        member.close()


def test_leader_that_assigned_without_the_topic_metadata_is_repaired(
    members: Callable[..., HeldMember], kafka_topic: str
) -> None:
    # Without the watch, kafka-python stays on the empty assignment until metadata_max_age_ms (5 min):
    # the control shows the race was really hit.
    control = members(kafka_topic, f"control-{uuid.uuid4().hex[:8]}", watched=False)
    watched = members(kafka_topic, f"watched-{uuid.uuid4().hex[:8]}", watched=True)
    for member in (control, watched):
        wait_for(member.first_assignment.is_set, "the first (empty) assignment", 60)
    assert not control.assigned and not watched.assigned

    wait_for(
        lambda: watched.assigned == {0, 1, 2},
        "the watched consumer to own every partition",
        REPAIR_DEADLINE_S,
    )
    assert watched.watch is not None and watched.watch.repairs >= 1
    assert control.assigned == frozenset(), "kafka-python recovered by itself: the race was not reproduced"


def test_members_joining_at_once_behind_a_leader_without_metadata_cover_every_partition(
    members: Callable[..., HeldMember], kafka_bootstrap: str
) -> None:
    """The simultaneous-join case: three members start together; whichever leads assigns from metadata
    without the topic. Every partition must end up read, each by one member."""
    topic = create_topic(kafka_bootstrap, f"test-{uuid.uuid4().hex[:12]}", partitions=6)
    group_id = f"group-{uuid.uuid4().hex[:8]}"
    trio = [members(topic, group_id, watched=True) for _ in range(3)]
    wait_for(lambda: all(m.first_assignment.is_set() for m in trio), "every member's first assignment", 60)

    def covered() -> bool:
        shares = [m.assigned for m in trio]
        return sum(map(len, shares)) == 6 and frozenset().union(*shares) == set(range(6))

    wait_for(covered, "all 6 partitions read, each by one member", REPAIR_DEADLINE_S + 10)
    assert all(m.assigned for m in trio)


# -- end to end: `cohere-gateway consume` -----------------------------------------------------------------


def produce_to(bootstrap: str, topic: str, partitions: list[int], messages: list[tuple[Any, Any]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for i, (key, value) in enumerate(messages):
            producer.send(topic, key=key, value=value, partition=partitions[i % len(partitions)])
        producer.flush(timeout=30)
    finally:
        producer.close()


def readyz_partitions(consumer: ConsumerProcess) -> list[int]:
    _, body = consumer.get("/readyz")
    return body.get("partitions", []) if isinstance(body, dict) else []


@pytest.mark.parametrize("storage", ["chdb"], indirect=True)  # Kafka is the subject, as below
def test_partitions_added_to_a_running_topic_are_read_within_seconds(
    running: Callable[..., ConsumerProcess], kafka_bootstrap: str, kafka_topic: str, group: str
) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewPartitions

    consumer = running()
    wait_for(lambda: readyz_partitions(consumer) == [0, 1, 2], "the consumer to own the 3 partitions")
    # The fixture's topic has 3, fewer than the default --partitions: said once, and left as it is.
    log = consumer.log.read_text()
    assert f"exists with 3 partitions, fewer than the {DEFAULT_PARTITIONS} asked for" in log
    assert topic_partitions(kafka_bootstrap, kafka_topic) == 3

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_partitions({kafka_topic: NewPartitions(total_count=5)})
    finally:
        admin.close()
    produce_to(kafka_bootstrap, kafka_topic, [3, 4], event_messages(0, 40))
    started = time.monotonic()
    wait_for(lambda: consumer.landed() == 40, "the events on the added partitions", REPAIR_DEADLINE_S)
    assert readyz_partitions(consumer) == [0, 1, 2, 3, 4]
    # Not asserted: that the watch did the repair. A metadata refresh of kafka-python's own can see the new
    # partitions first (CI saw that), and then there is nothing to repair. Without the watch the next
    # refresh is metadata_max_age_ms (5 min) away, far past REPAIR_DEADLINE_S.
    repairs = consumer.metric("cohere_gateway_consumer_assignment_repairs_total")
    print(
        f"events on added partitions landed {time.monotonic() - started:.1f}s after being produced, "
        f"{repairs:.0f} repair(s)"
    )
    assert consumer.stop() == 0


# The topic's creation is the subject, not storage: one backend keeps the suite's wall time.
@pytest.mark.parametrize("storage", ["chdb"], indirect=True)
def test_consumer_started_before_its_topic_exists_creates_it_and_reads_the_first_event(
    storage: Storage, kafka_bootstrap: str, group: str, tmp_path: Path
) -> None:
    topic = f"test-{uuid.uuid4().hex[:12]}"
    assert topic_partitions(kafka_bootstrap, topic) is None
    storage.close()  # the consumer process owns the embedded data directory
    consumer = ConsumerProcess(
        storage, kafka_bootstrap, topic, group, storage.data_dir, env={"COHERE_GATEWAY_PARTITIONS": "4"}
    )
    try:
        wait_for(lambda: readyz_partitions(consumer) == [0, 1, 2, 3], "the consumer to own its new topic")
        assert topic_partitions(kafka_bootstrap, topic) == 4  # --partitions, not the broker's default 3
        produce_to(kafka_bootstrap, topic, [3], event_messages(0, 1))
        started = time.monotonic()
        wait_for(lambda: consumer.landed() == 1, "the first event", 10)
        print(f"first event landed {time.monotonic() - started:.1f}s after being produced")
        assert consumer.stop() == 0
    finally:
        if consumer.proc.poll() is None:
            consumer.proc.kill()
            consumer.proc.wait()
        print(consumer.log.read_text()[-3000:])
