"""Kafka goes away under a running consumer and comes back: a real broker this test starts, stops and
restarts on the same directory and port, a real `cohere-gateway consume` subprocess, real ClickHouse."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cohere_gateway import localkafka
from cohere_gateway.consumers.backends import FAULT_FILE_ENV
from tests.fixtures.clickhouse import Storage
from tests.fixtures.kafka import create_topic, free_port_pair
from tests.test_consumer import (
    ConsumerProcess,
    committed,
    counts,
    event_messages,
    expected_errors,
    produce,
    wait_for,
)


@pytest.fixture
def own_kafka(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    data_dir, port = tmp_path / "kafka", free_port_pair()
    broker = localkafka.start(data_dir, port)
    try:
        yield data_dir, broker.bootstrap
    finally:
        localkafka.stop(data_dir)


# Kafka's outage is the subject here, not storage: one backend keeps the suite's wall time
# (tests/test_scale_out.py stops a real ClickHouse server under running consumers).
@pytest.mark.parametrize("storage", ["chdb"], indirect=True)
@pytest.mark.timeout(150)
def test_kafka_stopped_mid_run_consumer_waits_and_resumes_exactly_once(
    own_kafka: tuple[Path, str], storage: Storage, tmp_path: Path
) -> None:
    """The broker is stopped while the consumer holds a batch it could not write yet; ClickHouse is held
    down through the backend's fault seam (FaultInjectingBackend: the embedded engine lives inside the
    consumer process) only to make that moment deterministic. When storage returns, the batch is inserted
    but its commit fails because Kafka is down: the one case where only the deduplication token keeps
    the count exact once the broker is back."""
    kafka_dir, bootstrap = own_kafka
    port = int(bootstrap.rsplit(":", 1)[1])
    topic = create_topic(bootstrap, f"outage-{uuid.uuid4().hex[:8]}")
    group = f"group-{uuid.uuid4().hex[:8]}"
    down = tmp_path / "clickhouse-down"
    storage.close()  # the consumer process owns the embedded data directory
    consumer = ConsumerProcess(
        storage, bootstrap, topic, group, storage.data_dir, env={FAULT_FILE_ENV: str(down)}
    )
    try:
        produce(bootstrap, topic, event_messages(0, 150))
        wait_for(lambda: consumer.landed() == 150, "the first 150 events")
        wait_for(lambda: committed(bootstrap, group, topic) == 150, "their commit")

        down.touch()
        produce(bootstrap, topic, event_messages(150, 100))
        wait_for(
            lambda: consumer.metric("cohere_gateway_consumer_insert_failures_total") >= 1,
            "an insert to fail",
        )
        assert consumer.metric("cohere_gateway_consumer_buffered") > 0  # held, not dropped

        localkafka.stop(kafka_dir)
        _, ready = wait_for(
            lambda: (r := consumer.get("/readyz"))[0] == 503 and not r[1]["kafka"] and r,
            "readiness to report Kafka down",
            30,
        )
        assert "Kafka" in ready["last_error"]
        down.unlink()
        wait_for(
            lambda: consumer.metric("cohere_gateway_consumer_commit_failures_total") >= 1,
            "the held batch to be written and its commit to fail",
            45,
        )
        assert consumer.proc.poll() is None  # it waits; it does not exit
        assert consumer.get("/readyz")[0] == 503

        localkafka.start(kafka_dir, port)
        produce(bootstrap, topic, event_messages(250, 50))
        wait_for(lambda: committed(bootstrap, group, topic) == 300, "the commit of all 300", 60)
        wait_for(lambda: consumer.get("/readyz")[0] == 200, "readiness to return")
        assert consumer.landed() == 300
        assert consumer.stop() == 0
    finally:
        if consumer.proc.poll() is None:
            consumer.proc.kill()
            consumer.proc.wait()
        print(consumer.log.read_text()[-4000:])
    assert counts(storage) == {
        "raw": 300,
        "raw_final": 300,
        "distinct_ids": 300,
        "agg_requests": 300,
        "agg_errors": expected_errors(0, 300),
    }
