"""The real Kafka broker: events round-trip through it, and the `kafka` CLI manages a local broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from cohere_gateway import events, localkafka
from tests.fixtures.kafka import free_port_pair
from tests.test_events import make_event


def test_events_round_trip_through_kafka(kafka_bootstrap: str, kafka_topic: str) -> None:
    sent = [make_event(gateway_id=f"gw{i % 3}", metadata={"n": str(i)}) for i in range(30)]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for event in sent:
        producer.send(
            kafka_topic, key=f"{event.account_id}/{event.gateway_id}".encode(), value=events.encode(event)
        )
    producer.flush(timeout=30)
    producer.close()

    consumer = KafkaConsumer(
        kafka_topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=20_000,
    )
    received = []
    by_key: dict[bytes, list[int]] = {}
    for record in consumer:
        event = events.decode(record.value)
        received.append(event)
        by_key.setdefault(record.key, []).append(int(event.metadata["n"]))
        if len(received) == len(sent):
            break
    consumer.close()

    assert sorted(received, key=lambda e: e.event_id) == sorted(sent, key=lambda e: e.event_id)
    # Keyed by account/gateway, so each gateway's events keep their order within its partition.
    for ns in by_key.values():
        assert ns == sorted(ns)


def test_kafka_uses_the_c_crc32c_accelerator() -> None:
    from kafka.record import util

    assert util.crc32c_c is not None and util._crc32c is util.crc32c_c, "install the `crc32c` package"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohere_gateway.cli", "kafka", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")), reason="external broker configured")
def test_kafka_cli_start_status_stop(tmp_path: Path) -> None:
    port = free_port_pair()
    data_dir = tmp_path / "broker"
    common = ["--port", str(port), "--data-dir", str(data_dir)]

    assert _cli("status", *common).returncode == 1
    started = _cli("start", *common)
    try:
        assert started.returncode == 0, started.stderr
        assert f"127.0.0.1:{port}" in started.stdout
        status = _cli("status", *common)
        assert status.returncode == 0 and "accepting requests" in status.stdout
        # Starting again finds the running broker instead of failing on the port.
        assert _cli("start", *common).returncode == 0
    finally:
        stopped = _cli("stop", *common)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _cli("status", *common).returncode == 1
    assert localkafka.probe(f"127.0.0.1:{port}", timeout_s=2) is False


def test_missing_java_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    """No way to uninstall Java for a test: PATH is emptied so `java` cannot be found."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(localkafka.KafkaSetupError, match="apt-get install openjdk-17"):
        localkafka.java_major_version()


def test_port_in_use_is_explained(kafka_bootstrap: str, tmp_path: Path) -> None:
    host, port = kafka_bootstrap.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        pytest.skip("external broker: its port is not on this machine")
    with pytest.raises(localkafka.KafkaSetupError, match="in use"):
        localkafka.start(tmp_path / "other", int(port))


def test_cluster_ids_never_look_like_an_option() -> None:
    """One id in 64 would start with '-' and make the storage tool fail to parse its arguments."""
    ids = [localkafka.new_cluster_id() for _ in range(2000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
