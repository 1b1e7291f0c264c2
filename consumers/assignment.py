"""Keeps a consumer off an empty or partial assignment while its topic has partitions.

kafka-python 3.0.12 learns a topic's partitions only from its own metadata, refreshed every
metadata_max_age_ms (5 min) unless something asks sooner. A group's leader that assigns from metadata
lacking the topic (a response requested before the subscription, applied after it, also clears the
pending refresh) hands out nothing and does not look again for minutes; partitions added to a running
topic stay unread as long; and when members join at the same instant the leader can drop its own second
assignment. The broker knows better in every case, so this watch asks it, on its own thread and with its
own admin client (public API): every CHECK_INTERVAL_S it compares the topic's partitions with what the
group's members hold, and this member's share with what the consumer actually reads. A difference that
outlives a rebalance (GRACE_S, the group Stable) is repaired from the consume loop, which owns the
consumer: a metadata refresh, then a rejoin once it is applied (cohere_gateway/kafka_seam.py), at most once
per COOLDOWN_S. A consumer that two such repairs left reading nothing while another member reads several
partitions (CI saw one left out of the generation the others formed, idle for minutes: a rejoin asks
for a JoinGroup that such a member never sends) is replaced by the consume loop with a new member.
Every decision is taken against what the consumer reads at that moment, not when the broker was asked.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cohere_gateway import kafka_seam
from cohere_gateway.kafka_topics import partition_count

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 2.0
GRACE_S = 3.0  # a rebalance in progress is not Stable; this covers the moments around one
COOLDOWN_S = 10.0  # lets the rebalance a repair starts finish before the next is considered
REFRESH_WAIT_S = 2.0  # rejoin after this long even if the refreshed metadata has not arrived
ADMIN_TIMEOUT_MS = 5_000


@dataclass(frozen=True)
class GroupView:
    """What the broker says: the topic's partition count and each member's share of it."""

    partitions: int | None  # None: the broker does not know the topic
    state: str  # the group's state: Stable, PreparingRebalance, CompletingRebalance, Empty, Dead
    members: Mapping[str, frozenset[int]]  # client id -> partitions of the topic assigned to it


def diagnose(view: GroupView, client_id: str, local: frozenset[int]) -> str | None:
    """Why ingest is stalled, or None. Only a Stable group is judged: during a rebalance every member's
    assignment is in flux by design."""
    if view.partitions is None or view.state != "Stable":
        return None
    covered = frozenset().union(*view.members.values())
    missing = sorted(set(range(view.partitions)) - covered)
    if missing:
        return (
            f"partitions {missing} of {view.partitions} are assigned to no member of the group "
            f"(the group's assignment covers {sorted(covered)})"
        )
    own = view.members.get(client_id)
    if own is not None and own != local:
        return f"the group assigned partitions {sorted(own)} to this consumer, which reads {sorted(local)}"
    busiest = max(view.members.values(), key=len, default=frozenset())
    if not own and not local and len(busiest) > 1:
        # Seen on a loaded host: a member left out of the generation the others formed (or handed nothing
        # by it) idles while another member reads several partitions, and kafka-python does not notice.
        where = "is not a member of the group" if own is None else "was assigned no partition"
        return f"this consumer {where} while another member reads partitions {sorted(busiest)}"
    return None


def describe(admin: Any, topic: str, group_id: str) -> GroupView:
    partitions = partition_count(admin, topic)
    group = admin.describe_groups([group_id]).get(group_id) or {}
    members: dict[str, frozenset[int]] = {}
    for member in group.get("members") or []:
        assignment = member.get("member_assignment")
        parts: set[int] = set()
        if isinstance(assignment, Mapping):  # undecodable or empty assignments arrive as bytes
            for entry in assignment.get("assigned_partitions") or []:
                if entry.get("topic") == topic:
                    parts.update(int(p) for p in entry.get("partitions") or [])
        members[str(member.get("client_id"))] = frozenset(parts)
    return GroupView(partitions, str(group.get("group_state") or ""), members)


class Watch:
    """Started once the consumer has subscribed; `tick()` from the consume loop after every poll."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group_id: str,
        client_id: str,
        note: Callable[[str], None] = log.warning,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap, self.topic, self.group_id, self.client_id = bootstrap, topic, group_id, client_id
        self.note = note
        self.clock = clock
        self.repairs = 0
        self._lock = threading.Lock()
        self._local: frozenset[int] = frozenset()  # what the consumer read at the last tick
        self._view: GroupView | None = None  # the broker's latest answer
        self._since: float | None = None  # when the current stall was first seen
        self._next_repair = 0.0
        self._refresh: Any = None  # the metadata refresh a pending rejoin waits for
        self._refresh_at = 0.0
        self._idle_repairs = 0  # repairs in a row that left this consumer reading nothing
        self._warned_unavailable = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="assignment-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # Briefly: mid-request while Kafka is away it would hold up shutdown for ADMIN_TIMEOUT_MS, and
            # a daemon thread with nothing to write loses nothing when the process exits.
            self._thread.join(timeout=1.0)

    # -- the consume loop's side ----------------------------------------------------------------------

    def tick(self, consumer: Any) -> bool:
        """Judge the latest group view against what `consumer` reads now, and repair a stall that
        outlived GRACE_S. True: the consume loop should replace its consumer with a new member, because
        rejoining twice left this one reading nothing while another member reads several partitions (a
        member that kafka-python believes joined but the group does not list never sends the JoinGroup
        a rejoin asks for)."""
        local = frozenset(tp.partition for tp in consumer.assignment() if tp.topic == self.topic)
        now = self.clock()
        with self._lock:
            self._local = local
            view, since = self._view, self._since
        # Judged against what the consumer reads now, not when the broker was asked: a rebalance that
        # ended in between is no stall.
        reason = diagnose(view, self.client_id, local) if view is not None else None
        if local:
            self._idle_repairs = 0
        if self._refresh is not None:
            if self._refresh.is_done or now - self._refresh_at >= REFRESH_WAIT_S:
                self._refresh = None
                if reason is not None:
                    kafka_seam.request_rejoin(consumer)
            return False
        if reason is None or since is None or now - since < GRACE_S or now < self._next_repair:
            return False
        self._next_repair = now + COOLDOWN_S
        with self._lock:
            self._since = None  # judge the repaired group afresh
        if not local and self._idle_repairs >= 2:
            self._idle_repairs = 0
            self.repairs += 1
            self.note(
                f"ingest stalled on {self.topic}: {reason}; rejoining did not help, so this consumer "
                "leaves and joins the group as a new member"
            )
            return True
        if not kafka_seam.available():
            if not self._warned_unavailable:
                self.note(
                    f"ingest stalled on {self.topic}: {reason}; kafka-python {kafka_seam.kafka.__version__} "
                    f"is not the version whose rejoin was checked ({kafka_seam.CHECKED_VERSION}), so "
                    "nothing is repaired: restart this consumer"
                )
                self._warned_unavailable = True
            return False
        self.repairs += 1
        if not local:
            self._idle_repairs += 1
        self.note(f"ingest stalled on {self.topic}: {reason}; refreshing metadata and rejoining the group")
        self._refresh = kafka_seam.request_metadata_refresh(consumer)
        self._refresh_at = now
        return False

    # -- the watch thread -----------------------------------------------------------------------------

    def observe(self, view: GroupView) -> None:
        """Record the broker's answer (the watch thread's, or a test's)."""
        with self._lock:
            if diagnose(view, self.client_id, self._local) is None:
                self._since = None
            elif self._since is None:
                self._since = self.clock()
            self._view = view

    def _run(self) -> None:
        admin = None
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                if admin is None:
                    admin = self._admin()
                view = describe(admin, self.topic, self.group_id)
            except Exception as exc:  # the broker away: the consume loop reports that; try again later
                log.debug("assignment watch: %s", exc)
                if admin is not None:
                    _close_quietly(admin)
                    admin = None
                continue
            self.observe(view)
        if admin is not None:
            _close_quietly(admin)

    def _admin(self) -> Any:
        from kafka import KafkaAdminClient

        return KafkaAdminClient(
            bootstrap_servers=self.bootstrap.split(","),
            client_id=f"{self.client_id}-watch",
            request_timeout_ms=ADMIN_TIMEOUT_MS,
            bootstrap_timeout_ms=ADMIN_TIMEOUT_MS,
        )


def _close_quietly(admin: Any) -> None:
    try:
        admin.close()
    except Exception as exc:
        log.debug("closing the watch's admin client: %s", exc)
