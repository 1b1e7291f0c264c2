"""The consumer end to end: a real Kafka broker, `cohere-gateway consume` as a real subprocess, real
ClickHouse, each test against both backends (embedded chdb, and a real server through clickhouse-connect;
the read API is the consumer's own). Fault seams, used where no real fault can be made here, are named
in the tests that use them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cohere_gateway.consumers.backends import FAULT_FILE_ENV, chdb_path
from cohere_gateway.consumers.consumer import CRASH_AFTER_INSERTS_ENV
from cohere_gateway.consumers.http_api import read_discovery
from cohere_gateway.events import SCHEMA_MAJOR, encode, to_builtins
from tests.fixtures.clickhouse import Storage, make_event

BASE = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def produce(
    bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]], partitions: int = 3
) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        # Round-robin over the partitions: the 4 account/gateway keys alone may hash to only two.
        for i, (key, value) in enumerate(messages):
            producer.send(topic, key=key, value=value, partition=i % partitions)
        producer.flush(timeout=30)
    finally:
        producer.close()


def event_messages(start: int, count: int) -> list[tuple[bytes | None, bytes | None]]:
    out = []
    for i in range(start, start + count):
        ev = make_event(i, BASE)
        out.append((f"{ev.account_id}/{ev.gateway_id}".encode(), encode(ev)))
    return out


class ConsumerProcess:
    def __init__(
        self,
        storage: Storage,
        bootstrap: str,
        topic: str,
        group: str,
        data_dir: Path,
        env: dict[str, str] | None = None,
        batch_wait_ms: int = 200,
    ) -> None:
        self.data_dir = data_dir
        self.embedded = storage.embedded
        args = [sys.executable, "-m", "cohere_gateway.cli", "consume", *storage.cli_args]
        args[args.index("--data-dir") + 1] = str(data_dir)
        args += [
            "--kafka-bootstrap",
            bootstrap,
            "--topic",
            topic,
            "--group-id",
            group,
            "--batch-wait-ms",
            str(batch_wait_ms),
            "--batch-size",
            "500",
            "--http-port",
            "0",
        ]
        self.log = data_dir.parent / f"consumer-{uuid.uuid4().hex[:6]}.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=os.environ | (env or {})
            )
        self.url = ""

    def api_url(self) -> str:
        if not self.url:
            if self.embedded:
                info = wait_for(
                    lambda: read_discovery(chdb_path(self.data_dir)) or self._check_alive(),
                    "the consumer's discovery file",
                )
                self.url = info["url"]
            else:  # a server's consumers write no discovery file (they own no directory): the log says
                self.url = wait_for(
                    lambda: self._logged_api_url() or self._check_alive(), "the consumer's read API"
                )
        return self.url

    def _logged_api_url(self) -> str | None:
        found = re.search(r"read API on (http://\S+)", self.log.read_text(errors="replace"))
        return found.group(1) if found else None

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"consumer exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.api_url() + path, timeout=10) as resp:
                body = resp.read()
                return resp.status, json.loads(body) if path.startswith(
                    ("/api", "/readyz")
                ) else body.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def landed(self) -> int:
        status, summary = self.get("/api/summary?since=30d&by=none")
        if status != 200:  # still starting: migrations not applied yet
            self._check_alive()
            return 0
        return summary["total"]["requests"] if summary["total"] else 0

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def group() -> str:
    return f"group-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def running(
    storage: Storage, kafka_bootstrap: str, kafka_topic: str, group: str
) -> Iterator[Callable[..., ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    storage.close()  # the consumer process owns the embedded data directory

    def start(data_dir: Path | None = None, **kwargs: Any) -> ConsumerProcess:
        proc = ConsumerProcess(
            storage, kafka_bootstrap, kafka_topic, group, data_dir or storage.data_dir, **kwargs
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
        print(f"--- {proc.log.name} (exit {proc.proc.returncode}) ---\n{proc.log.read_text()[-4000:]}")


def counts(storage: Storage) -> dict[str, int]:
    """Rows in raw (with and without FINAL) and in the aggregates, read directly from storage."""
    backend = storage.open()
    q = {
        "raw": "SELECT count() AS n FROM events",
        "raw_final": "SELECT count() AS n FROM events FINAL",
        "distinct_ids": "SELECT uniqExact(event_id) AS n FROM events",
        "agg_requests": "SELECT sum(requests) AS n FROM events_by_minute",
        "agg_errors": "SELECT sum(errors) AS n FROM errors_by_minute",
    }
    return {k: int(backend.query(sql)[0]["n"] or 0) for k, sql in q.items()}


def expected_errors(start: int, count: int) -> int:
    return sum(make_event(i, BASE).outcome != "ok" for i in range(start, start + count))


def committed(bootstrap: str, group: str, topic: str, partitions: int = 3) -> int:
    """Sum of the group's committed offsets over the topic's partitions (without joining the group)."""
    from kafka import KafkaConsumer, TopicPartition

    reader = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return sum(reader.committed(TopicPartition(topic, p)) or 0 for p in range(partitions))
    finally:
        reader.close(autocommit=False)


def test_events_land_and_poison_goes_to_the_dead_letter_topic(
    running: Callable[..., ConsumerProcess], storage: Storage, kafka_bootstrap: str, kafka_topic: str
) -> None:
    newer_minor = to_builtins(make_event(5, BASE, event_id="newer-minor")) | {
        "schema_version": f"{SCHEMA_MAJOR}.7",
        "field_from_the_future": {"x": 1},
    }
    poison = [
        (b"k", b"this is not json"),
        (b"k", json.dumps(to_builtins(make_event(6, BASE)) | {"schema_version": "2.0"}).encode()),
        (
            b"k",
            json.dumps(
                {k: v for k, v in to_builtins(make_event(7, BASE)).items() if k != "latency"}
            ).encode(),
        ),
        (b"k", None),
    ]
    produce(
        kafka_bootstrap,
        kafka_topic,
        event_messages(0, 300) + poison + [(b"k", json.dumps(newer_minor).encode())],
    )
    consumer = running()
    wait_for(lambda: consumer.landed() == 301, "301 events (300 + a newer minor) to land")
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_dead_letters_total") == 4, "4 dead letters")
    status, ready = consumer.get("/readyz")
    assert status == 200 and ready["ready"]

    letters = dead_letters(kafka_bootstrap, kafka_topic)[:4]
    reasons = sorted(letter["reason"] for letter in letters)
    assert any("not a JSON event" in r for r in reasons)
    assert any("major 2" in r and "upgrade" in r for r in reasons)
    assert any("latency" in r for r in reasons)
    assert any("tombstone" in r for r in reasons)
    assert all(letter["topic"] == kafka_topic and letter["offset"] >= 0 for letter in letters)
    assert next(x for x in letters if x["original"] == "this is not json")

    assert consumer.stop() == 0
    got = counts(storage)
    assert got["raw"] == got["agg_requests"] == got["distinct_ids"] == 301
    assert committed(kafka_bootstrap, f"{consumer_group(consumer)}", kafka_topic) == 305


def dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """Every letter in the topic's dead-letter topic (read until none came for 5 s)."""
    from kafka import KafkaConsumer

    dlq = KafkaConsumer(
        f"{topic}.dlq", bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5_000
    )
    try:
        return [json.loads(m.value) for m in dlq]
    finally:
        dlq.close()


def consumer_group(consumer: ConsumerProcess) -> str:
    args = consumer.proc.args
    return args[args.index("--group-id") + 1]


def test_kill_9_between_insert_and_commit_leaves_counts_exact(
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
    group: str,
) -> None:
    produce(kafka_bootstrap, kafka_topic, event_messages(0, 600))
    crashing = running(env={CRASH_AFTER_INSERTS_ENV: "1"})
    assert crashing.proc.wait(timeout=90) == -signal.SIGKILL
    assert committed(kafka_bootstrap, group, kafka_topic) == 0  # it inserted but never committed
    # More events arrive while it is down, so a naive restart would cut different batches.
    produce(kafka_bootstrap, kafka_topic, event_messages(600, 300))
    restarted = running()
    wait_for(lambda: restarted.landed() >= 900, "900 events to land after the restart")
    assert restarted.stop() == 0
    got = counts(storage)
    assert got == {
        "raw": 900,
        "raw_final": 900,
        "distinct_ids": 900,
        "agg_requests": 900,
        "agg_errors": expected_errors(0, 900),
    }
    assert committed(kafka_bootstrap, group, kafka_topic) == 900


def test_clickhouse_unavailable_mid_run_loses_nothing(
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
    group: str,
    tmp_path: Path,
) -> None:
    """ClickHouse is made unavailable through the backend's fault seam (FaultInjectingBackend): the
    embedded engine lives inside the consumer process and cannot be stopped from outside it."""
    down = tmp_path / "clickhouse-down"
    consumer = running(env={FAULT_FILE_ENV: str(down)})
    produce(kafka_bootstrap, kafka_topic, event_messages(0, 200))
    wait_for(lambda: consumer.landed() == 200, "the first 200 events")
    wait_for(lambda: committed(kafka_bootstrap, group, kafka_topic) == 200, "the first commit")
    down.touch()
    produce(kafka_bootstrap, kafka_topic, event_messages(200, 200))
    wait_for(lambda: consumer.get("/readyz")[0] == 503, "readiness to fail")
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_insert_failures_total") >= 2, "retries")
    assert committed(kafka_bootstrap, group, kafka_topic) == 200  # nothing it did not write
    down.unlink()
    wait_for(lambda: consumer.get("/readyz")[0] == 200, "readiness to return")
    wait_for(lambda: consumer.landed() == 400, "all 400 events")
    assert consumer.stop() == 0
    assert counts(storage) == {
        "raw": 400,
        "raw_final": 400,
        "distinct_ids": 400,
        "agg_requests": 400,
        "agg_errors": expected_errors(0, 400),
    }


def test_a_retried_flush_sends_its_dead_letters_once(
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    """ClickHouse fails between the intent log and the events insert (fault seam, as above), so the
    same batch, with a poison message in it, is flushed again and again until it recovers."""
    down = tmp_path / "clickhouse-down"
    down.write_text("events")
    consumer = running(env={FAULT_FILE_ENV: str(down)})
    produce(kafka_bootstrap, kafka_topic, [*event_messages(0, 50), (b"k", b"this is not json")])
    failures = "cohere_gateway_consumer_insert_failures_total"
    wait_for(lambda: consumer.metric(failures) >= 3, "3 failed flushes")
    assert consumer.metric("cohere_gateway_consumer_dead_letters_total") == 0
    down.unlink()
    wait_for(lambda: consumer.landed() == 50, "the 50 events")
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_dead_letters_total") == 1, "the dead letter")
    assert consumer.stop() == 0

    letters = dead_letters(kafka_bootstrap, kafka_topic)
    assert [letter["original"] for letter in letters] == ["this is not json"]
    assert counts(storage)["raw"] == 50


def test_sigterm_finishes_the_batch_in_hand(
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
    group: str,
) -> None:
    consumer = running(batch_wait_ms=600_000)  # nothing is written until the batch is full or we stop
    consumer.api_url()
    produce(kafka_bootstrap, kafka_topic, event_messages(0, 120))
    wait_for(lambda: consumer.metric("cohere_gateway_consumer_buffered") == 120, "120 buffered events")
    assert consumer.landed() == 0
    assert consumer.stop() == 0
    assert counts(storage)["raw"] == 120
    assert committed(kafka_bootstrap, group, kafka_topic) == 120


def test_two_consumers_split_partitions_and_land_every_event_once(
    running: Callable[..., ConsumerProcess],
    storage: Storage,
    kafka_bootstrap: str,
    kafka_topic: str,
    tmp_path: Path,
) -> None:
    # chdb: one process per directory, so each consumer gets its own; a server is shared.
    def assigned(c: ConsumerProcess) -> set[int]:
        return set(c.get("/readyz")[1]["partitions"])

    produce(kafka_bootstrap, kafka_topic, event_messages(0, 150))
    a = running(data_dir=tmp_path / "a")
    wait_for(lambda: assigned(a) == {0, 1, 2}, "the first consumer to own all partitions")
    wait_for(lambda: a.landed() == 150, "the first 150 events")
    b = running(data_dir=tmp_path / "b")  # joining forces a rebalance: a gives partitions up
    wait_for(lambda: assigned(a) and assigned(b) and len(assigned(a) | assigned(b)) == 3, "a split", 90)
    assert not assigned(a) & assigned(b)
    produce(kafka_bootstrap, kafka_topic, event_messages(150, 450))
    if storage.embedded:
        wait_for(lambda: a.landed() + b.landed() == 600, "600 events across both consumers")
        assert a.landed() > 150 and b.landed() > 0
        assert a.stop() == 0 and b.stop() == 0
        ids = []
        for d in (tmp_path / "a", tmp_path / "b"):
            st = Storage(data_dir=d)
            ids += [r["event_id"] for r in st.open().query("SELECT event_id FROM events")]
            st.close()
        assert len(ids) == len(set(ids)) == 600
    else:
        wait_for(lambda: a.landed() == 600, "600 events")
        assert a.stop() == 0 and b.stop() == 0
        assert counts(storage)["raw"] == 600
