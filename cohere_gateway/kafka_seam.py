"""The kafka-python internals the project needs, in one guarded place (the version pinned in pyproject).

Producer (the gateway's delivery process): kafka-python's `close(timeout)` first flushes and raises
KafkaTimeoutError when that times out, so it can never force-close while a broker is down. Forcing the
producer's sender thread first (`_sender.force_close()`) is the only bounded way; `abort_producer`
does that.

Consumer (the assignment watch, consumers/assignment.py): KafkaConsumer has no public call that asks for
a metadata refresh without blocking until it arrives (`topics()` waits without a timeout, forever while
the broker is away), nor one that rejoins the group without leaving it (`unsubscribe()` drops the
assignment without telling the rebalance listener and gives up the member id). Both exist one level
down: the cluster's `request_update()`, which only flags the refresh for kafka-python's own IO thread,
and the coordinator's `request_rejoin()`, which makes the next `poll()` run an ordinary rebalance
(listener included).

They are used only with the kafka-python version they were read in; with another version
`available()` is False: the producer is closed without forcing (bounded by the broker's answer), and the
watch still reports a stall (log, /readyz last_error) and repairs nothing. tests/test_kafka_seam.py
fails loudly when any of them moves.
"""

from __future__ import annotations

import logging
from typing import Any

import kafka

log = logging.getLogger(__name__)

CHECKED_VERSION = "3.0.12"


class InternalsMoved(RuntimeError):
    """kafka-python no longer has the internal this module calls."""


def available() -> bool:
    return kafka.__version__ == CHECKED_VERSION


def check_producer(producer: Any) -> None:
    """Raise InternalsMoved unless `producer` has the sender thread `abort_producer` forces."""
    sender = getattr(producer, "_sender", None)
    if not callable(getattr(sender, "force_close", None)) or not callable(getattr(sender, "join", None)):
        raise InternalsMoved("KafkaProducer._sender.force_close() / join() is gone")


def abort_producer(producer: Any) -> None:
    """Close without waiting for unacknowledged batches; their futures fail."""
    if available():
        producer._sender.force_close()
        producer._sender.join(2.0)
    try:
        producer.close(timeout=0)
    except Exception:  # closing a broken producer must not take the gateway down
        log.debug("kafka: error while aborting the producer", exc_info=True)


def check(consumer: Any) -> None:
    """Raise InternalsMoved unless `consumer` has both internals, callable, where they were read."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    coordinator = getattr(consumer, "_coordinator", None)
    if not callable(getattr(cluster, "request_update", None)):
        raise InternalsMoved("KafkaConsumer._client.cluster.request_update() is gone")
    if not callable(getattr(coordinator, "request_rejoin", None)):
        raise InternalsMoved("KafkaConsumer._coordinator.request_rejoin() is gone")
    if not hasattr(coordinator, "rejoin_needed"):
        raise InternalsMoved("KafkaConsumer._coordinator.rejoin_needed is gone")


def request_metadata_refresh(consumer: Any) -> Any:
    """Ask for fresh topic metadata now instead of after metadata_max_age_ms; returns kafka-python's
    Future (`.is_done`), completed by its IO thread when the response is applied."""
    return consumer._client.cluster.request_update()


def request_rejoin(consumer: Any) -> None:
    """Make the next poll() rejoin the group: revoke through the listener, JoinGroup with the same member
    id, and (as leader) assign from the metadata the consumer holds by then."""
    consumer._coordinator.request_rejoin()
