"""Sink benchmark: Kafka -> `cohere-gateway consume` -> embedded ClickHouse.

`python -m bench.sink [--quick] [--kafka-bootstrap HOST:PORT] [--no-record]`

1. Sustained: N events already in the topic, a fresh consumer drains them; events/s = N / time from the
   consumer's first insert to the last event visible through its read API, with the CPU the consumer
   used meanwhile. Run twice: free, and pinned to one core (sched_setaffinity).
2. Steady rate: events produced at R/s in bursts every 100 ms, open loop; each burst's produce-to-visible
   latency is the time from its send until the consumer's insert of it returned (its events_inserted
   counter, polled every 10 ms: the materialized views are written within the insert, so every query
   sees the events from then on), p50/p95; at the end the read API must count every event. With them,
   the inserts during the phase and their mean time (the consumer's insert-time histogram).
Without --kafka-bootstrap a local broker is started in a temporary directory (needs Java).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench import targets
from bench.procstat import cpu_seconds
from bench.stats import percentile
from cohere_gateway.events import encode
from tests.fixtures.clickhouse import make_event
from tests.fixtures.kafka import temporary_topic

RESULTS = Path(__file__).with_name("RESULTS.md")
BATCH_SIZE = 10_000
# Raw rows every 100 ms, the hour/day rollups at most every second (migration 0016: each insert writes a
# part per view, so the rollups' insert serves ten flushes).
BATCH_WAIT_MS = 100
ROLLUP_WAIT_MS = 1000


def _landed(url: str) -> int:
    try:
        with urllib.request.urlopen(f"{url}/api/summary?since=30d&by=none", timeout=10) as resp:
            total = json.loads(resp.read())["total"]
    except OSError:
        return 0
    return int(total["requests"]) if total else 0


INSERT_COUNT = "cohere_gateway_consumer_insert_seconds_count"
INSERT_SUM = "cohere_gateway_consumer_insert_seconds_sum"
INSERTED = "cohere_gateway_consumer_events_inserted_total"
ROLLED_UP = "cohere_gateway_consumer_rollup_events_total"
ROLLUP_COUNT = "cohere_gateway_consumer_rollup_inserts_total"
ROLLUP_SUM = "cohere_gateway_consumer_rollup_seconds_total"
STEADY_COUNTERS = (INSERT_COUNT, INSERT_SUM, ROLLUP_COUNT, ROLLUP_SUM)


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


def _consumer(bootstrap: str, topic: str, cpus: set[int] | None, server_url: str = "") -> Any:
    flags = (
        *("--batch-size", str(BATCH_SIZE), "--batch-wait-ms", str(BATCH_WAIT_MS)),
        *("--rollup-wait-ms", str(ROLLUP_WAIT_MS), "--log-level", "warning"),
    )
    if server_url:
        flags += ("--clickhouse", server_url)
    return targets.consumer(bootstrap, topic, *flags, cpus=cpus)


def drain(
    bootstrap: str,
    producer: Any,
    n: int,
    base: datetime,
    cpus: set[int] | None,
    server: tuple[str, int] | None = None,
) -> dict[str, float]:
    """A fresh consumer drains `n` events already in a new topic: events/s from its first insert until
    all are visible through its read API, and the CPU it used meanwhile (every thread). `server`: (URL,
    pid) of a ClickHouse server to write to instead of the embedded engine; its CPU is counted apart."""
    server_url, server_pid = server or ("", 0)
    with temporary_topic(bootstrap, "bench-sink") as topic:
        for key, value in _messages(0, n, base):
            producer.send(topic, key=key, value=value)
        producer.flush()
        with _consumer(bootstrap, topic, cpus, server_url) as cons:
            _wait(lambda: cons.inserted() > 0, 120, "first insert", poll=0.01)
            started, first, cpu0 = time.monotonic(), cons.inserted(), cpu_seconds(cons.pid)
            engine0 = cpu_seconds(server_pid) if server_pid else 0.0
            _wait(lambda: cons.inserted() >= n, 600, "all events inserted", poll=0.02)
            _wait(lambda: _landed(cons.api) >= n, 60, "all events visible")
            took, cpu = time.monotonic() - started, cpu_seconds(cons.pid) - cpu0
            engine = cpu_seconds(server_pid) - engine0 if server_pid else 0.0
    done = n - first
    return {
        "events_per_s": done / took,
        "cores": cpu / took,
        "cpu_us_per_event": 1e6 * cpu / done,
        "server_cpu_us_per_event": 1e6 * engine / done,
    }


def drain_into_a_server(bootstrap: str, producer: Any, n: int, base: datetime) -> dict[str, float]:
    """The same drain into a local ClickHouse server (clickhouse-connect), a fresh database: the storage
    work leaves the consumer's process for the server's."""
    from cohere_gateway import localclickhouse
    from tests.fixtures.clickhouse import LocalServer, server_database
    from tests.fixtures.kafka import free_port_pair

    with tempfile.TemporaryDirectory(prefix="bench-sink-server-") as tmp:
        port = free_port_pair()
        local = LocalServer(Path(tmp), port, port + 1)
        running = local.start()
        try:
            with server_database(local.url()) as url:
                return drain(bootstrap, producer, n, base, None, (url, running.pid))
        finally:
            localclickhouse.stop(Path(tmp))


def steady(
    bootstrap: str, producer: Any, rate: int, seconds: float, base: datetime
) -> tuple[list[float], list[float], dict[str, float]]:
    """Produce at `rate` events/s in bursts of rate/10, open loop (a burst goes out on time whether or
    not the ones before it are visible yet); each burst's time from sent to inserted in the raw table,
    and to fed to the hour/day rollups. The probe reads the consumer's counters, not a query: a query
    every 10 ms would load the engine it measures. Also the raw inserts meanwhile and their mean time,
    the part of the latency the batch wait does not set (on this shared host it swings from run to run,
    and the p95 with it)."""
    bursts: list[tuple[int, float]] = []  # (events sent up to and including this burst, sent at)
    with temporary_topic(bootstrap, "bench-sink") as topic, _consumer(bootstrap, topic, None) as cons:
        # Not timed: the consumer joins its group and writes a first insert (seconds, once per start).
        warmup = _messages(0, max(1, rate // 10), base)
        for key, value in warmup:
            producer.send(topic, key=key, value=value)
        producer.flush()
        _wait(lambda: cons.metrics(ROLLED_UP)[ROLLED_UP] >= len(warmup), 120, "the warm-up burst")
        before = cons.metrics(*STEADY_COUNTERS)

        def send() -> None:
            sent, next_send = len(warmup), time.monotonic()
            end = next_send + seconds
            while next_send < end:
                time.sleep(max(0.0, next_send - time.monotonic()))
                batch = _messages(sent, max(1, rate // 10), base)
                for key, value in batch:
                    producer.send(topic, key=key, value=value)
                producer.flush()
                sent += len(batch)
                bursts.append((sent, time.monotonic()))
                next_send += len(batch) / rate

        sender = threading.Thread(target=send, name="steady-producer")
        sender.start()
        latencies: list[float] = []
        rolled: list[float] = []
        while sender.is_alive() or len(rolled) < len(bursts):
            counts = cons.metrics(INSERTED, ROLLED_UP)
            now = time.monotonic()
            for probe, name in ((latencies, INSERTED), (rolled, ROLLED_UP)):
                while len(probe) < len(bursts) and bursts[len(probe)][0] <= counts[name]:
                    probe.append(now - bursts[len(probe)][1])
            if len(rolled) < len(bursts) and now - bursts[len(rolled)][1] > 60:
                raise TimeoutError("a steady burst was not in the rollups within 60 s")
            time.sleep(0.01)
        sender.join()
        after = cons.metrics(*STEADY_COUNTERS)
        _wait(lambda: _landed(cons.api) >= bursts[-1][0], 10, "the read API to count every event")

    def mean_ms(count: str, total: str) -> tuple[float, float]:
        n = after[count] - before[count]
        return n, 1000 * (after[total] - before[total]) / n if n else math.nan

    inserts, insert_mean = mean_ms(INSERT_COUNT, INSERT_SUM)
    rollups, rollup_mean = mean_ms(ROLLUP_COUNT, ROLLUP_SUM)
    return (
        latencies,
        rolled,
        {
            "inserts": inserts,
            "insert_mean_ms": insert_mean,
            "rollups": rollups,
            "rollup_mean_ms": rollup_mean,
        },
    )


def run_bench(bootstrap: str, quick: bool) -> dict[str, Any]:
    from kafka import KafkaProducer

    n = 20_000 if quick else 200_000
    rate, seconds = (500, 5) if quick else (2000, 20)
    base = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    try:
        free = drain(bootstrap, producer, n, base, None)
        one_core = drain(bootstrap, producer, n, base, {min(os.sched_getaffinity(0))})
        server = drain_into_a_server(bootstrap, producer, n, base)
        latencies, rolled, inserts = steady(bootstrap, producer, rate, seconds, base)
    finally:
        producer.close()
    return {
        "events": n,
        "sustained_events_per_s": round(free["events_per_s"]),
        "sustained_cores": round(free["cores"], 2),
        "sustained_cpu_us_per_event": round(free["cpu_us_per_event"], 1),
        "one_core_events_per_s": round(one_core["events_per_s"]),
        "one_core_cpu_us_per_event": round(one_core["cpu_us_per_event"], 1),
        "server_events_per_s": round(server["events_per_s"]),
        "server_consumer_cpu_us_per_event": round(server["cpu_us_per_event"], 1),
        "server_engine_cpu_us_per_event": round(server["server_cpu_us_per_event"], 1),
        "steady_rate": rate,
        "probes": len(latencies),
        "visible_p50_ms": round(1000 * percentile(latencies, 50)),
        "visible_p95_ms": round(1000 * percentile(latencies, 95)),
        "rollups_p50_ms": round(1000 * percentile(rolled, 50)),
        "rollups_p95_ms": round(1000 * percentile(rolled, 95)),
        "steady_inserts": int(inserts["inserts"]),
        "steady_insert_mean_ms": round(inserts["insert_mean_ms"], 1),
        "steady_rollup_inserts": int(inserts["rollups"]),
        "steady_rollup_mean_ms": round(inserts["rollup_mean_ms"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kafka-bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", ""))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.kafka_bootstrap:
        result = run_bench(args.kafka_bootstrap, args.quick)
    else:
        with targets.kafka() as kafka:
            result = run_bench(kafka.bootstrap, args.quick)
    print(json.dumps(result, indent=2))
    if not args.no_record:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n### sink — {stamp}\n\n- command: `python -m bench.sink{' --quick' if args.quick else ''}`\n"
            f"- Kafka (3 partitions) -> consume (batch {BATCH_SIZE} / {BATCH_WAIT_MS} ms, rollups every "
            f"{ROLLUP_WAIT_MS} ms) -> embedded ClickHouse\n\n"
            "| events | drain events/s | cores used | CPU µs/event | drain on 1 core events/s | CPU µs/event "
            "| steady rate/s | produce-to-visible p50 ms | p95 ms | to rollups p50 ms | p95 ms |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {result['events']} | {result['sustained_events_per_s']:,} | {result['sustained_cores']} | "
            f"{result['sustained_cpu_us_per_event']} | {result['one_core_events_per_s']:,} | "
            f"{result['one_core_cpu_us_per_event']} | {result['steady_rate']} | "
            f"{result['visible_p50_ms']} | {result['visible_p95_ms']} | "
            f"{result['rollups_p50_ms']} | {result['rollups_p95_ms']} |\n\n"
            "- drain: from the consumer's first insert until every event is visible through its read API; "
            "cores = the consumer process's CPU time over that wall time; '1 core' pins it with "
            "sched_setaffinity.\n"
            "- visible = the consumer's insert of the event into the raw table returned (its per-minute "
            "views are written within the insert; the read API is checked to count every event at the "
            "end); to rollups = its hour/day rollups' insert returned. Latency is per produced burst of "
            "rate/10 events sent every 100 ms whether or not earlier ones are visible (open loop), so it "
            f"includes the batch wait ({BATCH_WAIT_MS} ms), the rollup wait ({ROLLUP_WAIT_MS} ms) for "
            "the second, and the probe's poll (10 ms).\n"
            f"- steady raw inserts: {result['steady_inserts']}, mean {result['steady_insert_mean_ms']} ms; "
            f"server drain: {result['server_events_per_s']:,} events/s, consumer "
            f"{result['server_consumer_cpu_us_per_event']} µs/event, server "
            f"{result['server_engine_cpu_us_per_event']} µs/event.\n"
        )
        with RESULTS.open("a") as fh:
            fh.write(section)


if __name__ == "__main__":
    main()
