"""The delivery process (addons/sidecar.py) against the real Kafka broker: events handed over a local
socket reach Kafka; a killed delivery process is replaced without losing what was queued for it; a gateway
that dies leaves its delivery process to finish the job; start-up errors and limits are reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cohere_gateway import events
from cohere_gateway.addons.delivery import DeliveryConfig, DurablePublisher
from cohere_gateway.addons.sidecar import MAX_EVENT_BYTES, SidecarError, SidecarPublisher
from cohere_gateway.addons.spool import Spool
from tests.fixtures.kafka import dead_bootstrap
from tests.test_delivery import read_topic, wait_for
from tests.test_events import make_event


def event_bytes(i: int) -> tuple[bytes, bytes]:
    event = make_event(client_event_id=f"e-{i}")
    return f"{event.account_id}/{event.gateway_id}".encode(), events.encode(event)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def ids(records: list[tuple[bytes, dict]]) -> list[str]:
    return [event["client_event_id"] for _, event in records]


def test_events_reach_kafka_through_the_delivery_process_in_order(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    pub = SidecarPublisher(DeliveryConfig(kafka_bootstrap, kafka_topic, tmp_path / "spool"))
    for i in range(300):
        pub.publish(*event_bytes(i))
    wait_for(lambda: pub.counters()["events_delivered"] == 300, 60, "300 events acknowledged")
    pub.close(10.0)
    counts = pub.counters()
    assert (counts["events_queued"], counts["events_dropped"], counts["events_spooled"]) == (300, 0, 0)
    assert ids(read_topic(kafka_bootstrap, kafka_topic)) == [f"e-{i}" for i in range(300)]  # one key


def test_a_killed_delivery_process_is_replaced_and_what_was_queued_for_it_is_delivered(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    pub = SidecarPublisher(DeliveryConfig(kafka_bootstrap, kafka_topic, tmp_path / "spool"))
    for i in range(50):
        pub.publish(*event_bytes(i))
    wait_for(lambda: pub.counters()["events_delivered"] == 50, 60, "the first 50 acknowledged")
    first = pub.pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), 10, "the delivery process to die")
    for i in range(50, 150):  # queued in the socket while no process reads it
        pub.publish(*event_bytes(i))
    wait_for(lambda: pub.counters()["events_delivered"] >= 100, 60, "a new process delivering the rest")
    assert pub.pid != first
    pub.close(10.0)
    assert ids(read_topic(kafka_bootstrap, kafka_topic)) == [f"e-{i}" for i in range(150)]


def test_a_gateway_that_dies_leaves_its_delivery_process_to_finish(
    kafka_bootstrap: str, kafka_topic: str, tmp_path: Path
) -> None:
    # The "gateway" is a process that hands over 400 events and kills itself without closing anything.
    script = textwrap.dedent(
        f"""
        import os, select, signal
        from pathlib import Path
        from cohere_gateway.addons.delivery import DeliveryConfig
        from cohere_gateway.addons.sidecar import SidecarPublisher
        from tests.test_sidecar import event_bytes
        pub = SidecarPublisher(DeliveryConfig({kafka_bootstrap!r}, {kafka_topic!r}, Path({str(tmp_path)!r})))
        for i in range(200):
            pub.publish(*event_bytes(i))
        # Die with the delivery process's counters unread, as a gateway between /metrics scrapes does,
        # and events queued behind them: its next read fails with ECONNRESET before those events.
        select.select([pub._gateway_end], [], [], 10)
        for i in range(200, 400):
            pub.publish(*event_bytes(i))
        print(pub.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    wait_for(lambda: not alive(child), 60, "the orphaned delivery process to finish")
    assert ids(read_topic(kafka_bootstrap, kafka_topic)) == [f"e-{i}" for i in range(400)]


def test_a_spool_held_by_another_publisher_fails_start_with_the_reason(tmp_path: Path) -> None:
    config = DeliveryConfig(dead_bootstrap(), "t", tmp_path / "spool")
    holder = DurablePublisher(config)
    try:
        with pytest.raises(SidecarError, match=r"cannot start event delivery: .*in use by another process"):
            SidecarPublisher(config, spool_lock_wait_s=0.5)
    finally:
        holder.close(0)


def test_oversized_events_are_dropped_and_counted_and_late_events_are_spooled(tmp_path: Path) -> None:
    config = DeliveryConfig(dead_bootstrap(), "t", tmp_path / "spool")
    pub = SidecarPublisher(config)
    key, value = event_bytes(0)
    pub.publish(key, b"x" * MAX_EVENT_BYTES)
    pub.publish(key, value)
    wait_for(lambda: pub.counters()["events_spooled"] == 1, 30, "the event spooled (Kafka is down)")
    pub.close(0.5)
    pub.publish(*event_bytes(1))  # an exchange that finished after shutdown
    counts = pub.counters()
    assert (counts["events_queued"], counts["events_dropped"]) == (3, 1)
    spool = Spool(config.spool_dir, max_bytes=config.spool_max_bytes)
    try:
        records, _ = spool.read(spool.start, 10)
    finally:
        spool.close()
    assert [events.decode(r.value).client_event_id for r in records] == ["e-0", "e-1"]
