"""The cost of the spool path: events/s into the spool per fsync policy, read-back rate, and the replay
rate from spool to a real Kafka broker through DurablePublisher (acks=all, idempotent).

`python -m bench spool [--quick]` (recorded in RESULTS.md) or `python -m bench.spool [--quick]`.
Events are real encoded gateway events (~1 KB, as the gateway publishes them without payloads).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench import targets
from bench.report import Outcome, Table
from cohere_gateway import events
from cohere_gateway.addons.delivery import DeliveryConfig, DurablePublisher
from cohere_gateway.addons.spool import Spool
from tests.fixtures.kafka import dead_bootstrap
from tests.test_events import make_event

FULL = {"events": 50_000, "always": 2_000, "replay": 50_000}
QUICK = {"events": 2_000, "always": 200, "replay": 2_000}


def sample_events(n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        event = make_event(gateway_id=f"gw{i % 8}", metadata={"n": str(i)})
        out.append((f"{event.account_id}/{event.gateway_id}".encode(), events.encode(event)))
    return out


def append_rate(items: list[tuple[bytes, bytes]], fsync: str) -> tuple[float, float]:
    """(events/s, MB/s) appending `items` to a fresh spool with this fsync policy, until on disk."""
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        spool = Spool(Path(tmp), max_bytes=1 << 40, fsync=fsync)  # type: ignore[arg-type]
        began = time.perf_counter()
        for key, value in items:
            spool.append(key, value)
        spool.flush()
        took = time.perf_counter() - began
        size = spool.size_bytes
        spool.close()
    return len(items) / took, size / took / 1e6


def read_rate(items: list[tuple[bytes, bytes]]) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        spool = Spool(Path(tmp), max_bytes=1 << 40, fsync="never")
        for key, value in items:
            spool.append(key, value)
        spool.flush()
        pos, n = spool.start, 0
        began = time.perf_counter()
        while True:
            records, pos = spool.read(pos, 1000)
            if not records:
                break
            n += len(records)
        took = time.perf_counter() - began
        spool.close()
    assert n == len(items)
    return n / took


def replay_rate(items: list[tuple[bytes, bytes]], kafka: targets.Kafka) -> tuple[float, float]:
    """(events/s spooled by publish() while Kafka is unreachable, events/s replayed into Kafka)."""
    topic = kafka.topic("bench-spool")
    with tempfile.TemporaryDirectory(prefix="bench-spool-") as tmp:
        spool_dir = Path(tmp) / "spool"
        cfg = DeliveryConfig(dead_bootstrap(), topic, spool_dir, delivery_timeout_ms=1000)
        down = DurablePublisher(cfg)
        deadline = time.monotonic() + 30
        while not down.counters()["kafka_outages"] and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first connect attempt failed: publish() then writes to the spool
        began = time.perf_counter()
        for key, value in items:
            down.publish(key, value)
        spool_took = time.perf_counter() - began
        down.close(1.0)
        assert down.counters()["events_spooled"] == len(items), down.counters()

        began = time.perf_counter()
        up = DurablePublisher(DeliveryConfig(kafka.bootstrap, topic, spool_dir, delivery_timeout_ms=10_000))
        deadline = time.monotonic() + 600
        while up.counters()["events_replayed"] < len(items):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replay did not finish: {up.counters()}")
            time.sleep(0.02)
        replay_took = time.perf_counter() - began
        up.close(5.0)
    return len(items) / spool_took, len(items) / replay_took


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    items = sample_events(sizes["events"])
    size = sum(len(k) + len(v) for k, v in items) / len(items)
    disk = Table("Spool appends (one thread, until on disk)", ["fsync", "events", "events/s", "MB/s"])
    for fsync in ("never", "interval", "always"):
        batch = items[: sizes["always"]] if fsync == "always" else items
        rate, mbs = append_rate(batch, fsync)
        disk.add(fsync, len(batch), f"{rate:,.0f}", f"{mbs:.1f}")
    disk.add("(read back)", len(items), f"{read_rate(items):,.0f}", "")
    disk.notes.append(f"mean event {size:.0f} bytes; interval = 100 ms; `always` is one fsync per event")

    replay = Table("Spool path end to end (DurablePublisher, real broker)", ["step", "events", "events/s"])
    with targets.kafka() as kafka:
        into, out = replay_rate(items[: sizes["replay"]], kafka)
    replay.add("publish() while Kafka unreachable -> spool", sizes["replay"], f"{into:,.0f}")
    replay.add("restart -> replay to Kafka, acks=all", sizes["replay"], f"{out:,.0f}")
    replay.notes.append("replay time includes the producer's connect and the wait for the last ack")
    return Outcome([disk, replay], ["spool path: no budget stated by the issue; these are the costs"], None)


if __name__ == "__main__":
    outcome = run("--quick" in sys.argv[1:])
    for table in outcome.tables:
        print(table.text())
