"""Creating the event topics with a chosen partition count, shared by `consume` and `up`.

A topic created by the broker on first use gets the broker's default partition count, which caps how many
consumers of one group can share it; creating it explicitly, before the first event, makes that count a
setting (`--partitions`). An existing topic is never altered: adding partitions changes which partition a
key maps to, and Kafka cannot remove them.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


TIMEOUT_MS = 10_000  # per call; a caller that retries (the consumer at start) stays responsive to SIGTERM


def ensure_topic(bootstrap: str, name: str, partitions: int) -> int | None:
    """Create `name` with `partitions` partitions unless it exists; return its partition count (None when
    the broker did not say). A topic with fewer partitions than asked for is logged and left as it is."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    if partitions < 1:
        raise ValueError(f"--partitions must be at least 1, not {partitions}")
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap.split(","), bootstrap_timeout_ms=TIMEOUT_MS, request_timeout_ms=TIMEOUT_MS
    )
    try:
        try:
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=-1)])
            log.info("created topic %s with %d partitions", name, partitions)
            return partitions
        except TopicAlreadyExistsError:
            pass
        except KafkaError as exc:  # e.g. not authorised: the broker may still auto-create it
            log.warning("could not create topic %s: %s", name, exc)
            return None
        existing = partition_count(admin, name)
        if existing is not None and existing < partitions:
            log.warning(
                "topic %s exists with %d partitions, fewer than the %d asked for (--partitions); left as it "
                "is, so at most %d consumers of a group read it. Adding partitions moves keys to other "
                "partitions: if that is acceptable, `kafka-topics.sh --alter --topic %s --partitions %d`.",
                name,
                existing,
                partitions,
                existing,
                name,
                partitions,
            )
        return existing
    finally:
        admin.close()


def partition_count(admin: Any, name: str) -> int | None:
    """The topic's partition count as the broker reports it now; None if it does not know the topic."""
    from kafka.errors import KafkaError

    try:
        described = admin.describe_topics([name])
    except KafkaError as exc:
        log.debug("describing topic %s failed: %s", name, exc)
        return None
    for topic in described:
        if topic.get("name") == name and not topic.get("error_code") and topic.get("partitions"):
            return len(topic["partitions"])
    return None
