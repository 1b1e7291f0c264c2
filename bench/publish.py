"""Publish cost: CPU per event of the gateway's publishing path, live to Kafka and into the spool.

Two views:
1. The publisher alone (`addons.delivery.DurablePublisher`, as the gateway runs it) in this process:
   N events published back to back, timed until Kafka acknowledged (or the spool took) every one; CPU is
   this process's user+system time over all threads (kafka-python's I/O thread included).
2. Inside the gateway: the gateway's CPU per request with publishing off (no --kafka-bootstrap), live to
   Kafka, and with Kafka unreachable (every event goes to the spool). The differences are what publishing
   costs per event on the proxy's cores.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import overhead, targets
from bench.report import Outcome, Table
from bench.stats import us
from cohere_gateway.addons.delivery import DeliveryConfig, DurablePublisher
from cohere_gateway.events import encode
from tests.fixtures.clickhouse import make_event
from tests.fixtures.kafka import dead_bootstrap


@dataclass(frozen=True)
class Sizes:
    events: int
    gateway: overhead.Sizes


FULL = Sizes(events=30_000, gateway=overhead.Sizes(3000, 20.0, 2, 200, concurrencies=(32,)))
QUICK = Sizes(events=300, gateway=overhead.Sizes(100, 5.0, 1, 10, concurrencies=(32,)))


IN_FLIGHT = 5000


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.005)


def publisher_cost(bootstrap: str, topic: str, n: int, counter: str) -> tuple[float, float]:
    """(CPU seconds per event, events/s) for `n` events until `counter` reaches n.

    Events go in bursts of at most IN_FLIGHT unconfirmed ones, as a busy gateway would hand them over;
    one unbounded burst would hit the publisher's memory cap (max_pending_events) and measure the spool.
    """
    values = [encode(make_event(i)) for i in range(min(n, 1000))]
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        pub = DurablePublisher(DeliveryConfig(bootstrap, topic, Path(tmp)))
        try:
            # Let the delivery thread settle into its mode (connected, or spooling) before timing.
            pub.publish(b"bench/warm", values[0])
            wait_until(lambda: pub.counters()[counter] >= 1, 30, f"the first event to be {counter}")
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for i in range(n):
                if i % 500 == 0:
                    wait_until(lambda i=i: i + 1 - pub.counters()[counter] <= IN_FLIGHT, 60, "the publisher")
                pub.publish(b"bench/bench", values[i % len(values)])
            wait_until(lambda: pub.counters()[counter] >= n + 1, 120, f"{n} events {counter}")
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            if dropped := pub.counters()["events_dropped"]:
                raise RuntimeError(f"the publisher dropped {dropped} events; the measurement is void")
        finally:
            pub.close(5.0)
    return cpu / n, n / wall


def encode_cost(n: int) -> float:
    events = [make_event(i) for i in range(min(n, 1000))]
    cpu0 = time.process_time()
    for i in range(n):
        encode(events[i % len(events)])
    return (time.process_time() - cpu0) / n


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    alone = Table(
        f"Publisher alone: {sizes.events} events (≈{len(encode(make_event(1)))} B each), back to back",
        ["path", "CPU µs/event", "events/s"],
    )
    gw_table = Table(
        "Inside the gateway: CPU per request at concurrency 32",
        ["publishing", "requests", "req/s", "gateway CPU µs/req", "Δ vs off µs/req"],
    )
    with targets.kafka() as kafka:
        topic = kafka.topic("bench-publish")
        alone.add("msgspec encode only", us(encode_cost(sizes.events)), "—")
        cpu, rate = publisher_cost(kafka.bootstrap, topic, sizes.events, "events_delivered")
        alone.add("live: Kafka acks=all, idempotent", us(cpu), f"{rate:.0f}")
        cpu, rate = publisher_cost(dead_bootstrap(), topic, sizes.events, "events_spooled")
        alone.add("spool: Kafka down, fsync interval", us(cpu), f"{rate:.0f}")
        with targets.emulator() as direct, contextlib.ExitStack() as stack:
            gws = [
                stack.enter_context(targets.gateway("off", direct.url, "", topic)),
                stack.enter_context(targets.gateway("live", direct.url, kafka.bootstrap, topic)),
                stack.enter_context(targets.gateway("spool", direct.url, dead_bootstrap(), topic)),
            ]
            pooled = overhead.run_rounds(gws, sizes.gateway)
    base = pooled[("off", 32)].cpu_per_request
    for gw in gws:
        m = pooled[(gw.name, 32)]
        delta = "—" if gw.name == "off" else us(m.cpu_per_request - base)
        gw_table.add(gw.name, m.load.completed, f"{m.load.rps:.0f}", us(m.cpu_per_request), delta)
    gw_table.notes.append(
        "off: no --kafka-bootstrap (events built and counted, not published); spool: --kafka-bootstrap "
        "points at a closed port, so every event is appended to the disk spool."
    )
    return Outcome([alone, gw_table], [f"kafka-python with crc32c: {_crc32c_accelerated()}"])


def _crc32c_accelerated() -> bool:
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return False
    return True
