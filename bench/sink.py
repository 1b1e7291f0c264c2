"""Sink benchmark: Kafka -> `cohere-gateway consume` -> embedded ClickHouse.

`python -m bench.sink [--quick] [--kafka-bootstrap HOST:PORT] [--no-record]`

1. Sustained: N events already in the topic, a fresh consumer drains them; events/s = N / time from the
   consumer's first insert to the last event visible through its read API, with the CPU the consumer
   used meanwhile. Run twice: free, and pinned to one core (sched_setaffinity).
2. Steady rate: events produced at R/s; each probe event's produce-to-visible latency is the time from
   its send until the read API counts it (polled every 20 ms), p50/p95 over the probes.
Without --kafka-bootstrap a local broker is started in a temporary directory (needs Java).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.procstat import cpu_seconds
from cohere_gateway.events import encode
from consumers.backends import chdb_path
from consumers.http_api import read_discovery
from tests.fixtures.clickhouse import make_event

RESULTS = Path(__file__).with_name("RESULTS.md")
BATCH_SIZE = 10_000


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _landed(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/summary?since=30d&by=none", timeout=10) as resp:
            total = json.loads(resp.read())["total"]
    except OSError:
        return 0
    return int(total["requests"]) if total else 0


def _wait(cond: Any, timeout: float, what: str, poll: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := cond():
            return result
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what}")


def _messages(start: int, count: int, base: datetime) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(start, start + count):
        ev = make_event(i % 500, base, event_id=f"bench-{i}")
        out.append((f"{ev.account_id}/{ev.gateway_id}".encode(), encode(ev)))
    return out


def _inserted(url: str) -> int:
    """The consumer's own count of events written (its /metrics), cheap enough to poll often."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("cohere_gateway_consumer_events_inserted_total "):
            return int(float(line.split()[1]))
    return 0


def _new_topic(bootstrap: str) -> str:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = f"bench-sink-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    return topic


def _start_consumer(bootstrap: str, topic: str, cpus: set[int] | None) -> tuple[subprocess.Popen, str]:
    data_dir = Path(tempfile.mkdtemp(prefix="bench-sink-"))
    cmd = [
        sys.executable,
        "-m",
        "cohere_gateway.cli",
        "consume",
        "--kafka-bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--group-id",
        topic,
        "--data-dir",
        str(data_dir),
        "--http-port",
        "0",
        "--batch-size",
        str(BATCH_SIZE),
        "--batch-wait-ms",
        "200",
        "--log-level",
        "warning",
    ]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
    try:
        url = _wait(lambda: read_discovery(chdb_path(data_dir)), 60, "consumer start")["url"]
    except BaseException:
        proc.kill()
        raise
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def drain(bootstrap: str, producer: Any, n: int, base: datetime, cpus: set[int] | None) -> dict[str, float]:
    """A fresh consumer drains `n` events already in a new topic: events/s from its first insert until
    all are visible through its read API, and the CPU it used meanwhile (every thread)."""
    topic = _new_topic(bootstrap)
    for key, value in _messages(0, n, base):
        producer.send(topic, key=key, value=value)
    producer.flush()
    proc, url = _start_consumer(bootstrap, topic, cpus)
    try:
        _wait(lambda: _inserted(url) > 0, 120, "first insert", poll=0.01)
        started, first, cpu0 = time.monotonic(), _inserted(url), cpu_seconds(proc.pid)
        _wait(lambda: _inserted(url) >= n, 600, "all events inserted", poll=0.02)
        _wait(lambda: _landed(url) >= n, 60, "all events visible")
        took, cpu = time.monotonic() - started, cpu_seconds(proc.pid) - cpu0
    finally:
        _stop(proc)
    done = n - first
    return {"events_per_s": done / took, "cores": cpu / took, "cpu_us_per_event": 1e6 * cpu / done}


def steady(bootstrap: str, producer: Any, rate: int, seconds: float, base: datetime) -> list[float]:
    """Produce at `rate` events/s in bursts of rate/10; each burst's send-to-visible time."""
    topic = _new_topic(bootstrap)
    proc, url = _start_consumer(bootstrap, topic, None)
    latencies = []
    try:
        sent = 0
        interval = 1.0 / rate
        next_send = time.monotonic()
        end = next_send + seconds
        while time.monotonic() < end:
            batch = _messages(sent, max(1, rate // 10), base)
            for key, value in batch:
                producer.send(topic, key=key, value=value)
            producer.flush()
            sent_at, sent = time.monotonic(), sent + len(batch)
            target = sent
            _wait(lambda t=target: _landed(url) >= t, 60, "steady batch", poll=0.02)
            latencies.append(time.monotonic() - sent_at)
            next_send += interval * len(batch)
            time.sleep(max(0.0, next_send - time.monotonic()))
    finally:
        _stop(proc)
    return latencies


def run_bench(bootstrap: str, quick: bool) -> dict[str, Any]:
    from kafka import KafkaProducer

    n = 20_000 if quick else 200_000
    rate, seconds = (500, 5) if quick else (2000, 20)
    base = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    try:
        free = drain(bootstrap, producer, n, base, None)
        one_core = drain(bootstrap, producer, n, base, {min(os.sched_getaffinity(0))})
        latencies = steady(bootstrap, producer, rate, seconds, base)
    finally:
        producer.close()
    return {
        "events": n,
        "sustained_events_per_s": round(free["events_per_s"]),
        "sustained_cores": round(free["cores"], 2),
        "sustained_cpu_us_per_event": round(free["cpu_us_per_event"], 1),
        "one_core_events_per_s": round(one_core["events_per_s"]),
        "one_core_cpu_us_per_event": round(one_core["cpu_us_per_event"], 1),
        "steady_rate": rate,
        "probes": len(latencies),
        "visible_p50_ms": round(1000 * percentile(latencies, 0.5)),
        "visible_p95_ms": round(1000 * percentile(latencies, 0.95)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    broker_dir = None
    bootstrap = args.kafka_bootstrap
    if not bootstrap:
        from cohere_gateway import localkafka
        from tests.fixtures.kafka import free_port_pair

        broker_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
        bootstrap = localkafka.start(broker_dir, free_port_pair()).bootstrap
    try:
        result = run_bench(bootstrap, args.quick)
    finally:
        if broker_dir is not None:
            from cohere_gateway import localkafka

            localkafka.stop(broker_dir)
    print(json.dumps(result, indent=2))
    if not args.no_record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n### sink — {stamp}\n\n- command: `python -m bench.sink{' --quick' if args.quick else ''}`\n"
            f"- Kafka (3 partitions) -> consume (batch {BATCH_SIZE} / 200 ms) -> embedded ClickHouse\n\n"
            "| events | drain events/s | cores used | CPU µs/event | drain on 1 core events/s | CPU µs/event "
            "| steady rate/s | produce-to-visible p50 ms | p95 ms |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {result['events']} | {result['sustained_events_per_s']:,} | {result['sustained_cores']} | "
            f"{result['sustained_cpu_us_per_event']} | {result['one_core_events_per_s']:,} | "
            f"{result['one_core_cpu_us_per_event']} | {result['steady_rate']} | "
            f"{result['visible_p50_ms']} | {result['visible_p95_ms']} |\n\n"
            "- drain: from the consumer's first insert until every event is visible through its read API; "
            "cores = the consumer process's CPU time over that wall time; '1 core' pins it with "
            "sched_setaffinity.\n"
            "- visible = counted by the consumer's read API (aggregates); latency is per produced burst of "
            "rate/10 events, so it includes the batch wait (200 ms) and the API poll (20 ms).\n"
        )
        with RESULTS.open("a") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
