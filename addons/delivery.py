"""`DurablePublisher`: events reach Kafka acknowledged, in order per key, or wait in the disk spool.

Two modes, switched by one delivery thread:

* live: `publish()` queues in memory; the thread sends with acks=all and idempotence and counts an event
  delivered only on the broker's acknowledgement.
* spool: when an event is not acknowledged within `delivery_timeout_ms` (broker down or slow, a send
  error, or more than `max_pending_events` waiting), the producer is aborted and every unacknowledged event,
  then everything queued after it, is appended to the spool in publish order; from then on `publish()`
  appends to the spool directly. The thread probes Kafka, replays the spool in order (live events keep
  going to its tail meanwhile), and returns to live mode only when replay has caught up with the tail.

So one key's events never overtake each other: there is a single ordered path at any time. See
docs/durability.md for the guarantees and what a crash can lose.

A record Kafka refuses for good (a non-retriable error: too large, invalid) is not an outage: retrying it
would stop every later event behind it forever. It is set aside in `<spool-dir>/dead-letters.jsonl`
(counted in `events_dead_lettered`, logged) and delivery moves on.
"""

from __future__ import annotations

import base64
import collections
import enum
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cohere_gateway import settings
from cohere_gateway.addons.spool import FSYNC_MODES, FsyncMode, Position, Spool, SpoolInUseError
from cohere_gateway.events import KAFKA_MAX_MESSAGE_BYTES
from cohere_gateway.kafka_seam import abort_producer

log = logging.getLogger(__name__)

LIVE, SPOOL, CLOSED = "live", "spool", "closed"
PROBE_BACKOFF_MAX_S = 2.0
CURSOR_PERSIST_S = 1.0
# Last-resort memory bound when the delivery thread cannot keep up at all (see `publish`).
HARD_CAP_FACTOR = 2
# The delivery thread hands queued events to the producer this often, or as soon as this many wait.
IDLE_WAIT_S = 0.05
WAKE_AT_QUEUED = 512


# Names follow addons/metrics.py: `*_pending` are gauges, the rest counters.
EVENT_COUNTERS = (
    "events_queued",  # accepted by publish()
    "events_delivered",  # acknowledged by Kafka, live or replayed
    "events_spooled",  # written to the spool
    "events_replayed",  # acknowledged by Kafka after replay from the spool
    "events_dropped",  # lost on purpose: spool full, or publish after close
    "events_maybe_duplicated",  # acknowledged after being given up on (and spooled)
    "events_dead_lettered",  # refused by Kafka for good: kept in dead-letters.jsonl, delivery moved on
    "kafka_outages",
)
# What `counters()` reports: the above and the spool's state.
COUNTER_NAMES = (*EVENT_COUNTERS, "spool_corrupt_records", "events_pending", "spool_bytes_pending")


_DEFAULTS = settings.ProxySettings
# DeliveryConfig fields not named as the setting they come from.
_DERIVED = frozenset({"bootstrap", "spool_dir"})


@dataclass(frozen=True)
class DeliveryConfig:
    """What the publisher needs of the gateway's settings; defaults and meaning are ProxySettings'. The
    delivery child gets it as `settings.to_json`."""

    bootstrap: str
    topic: str
    spool_dir: Path
    spool_max_bytes: int = _DEFAULTS.spool_max_bytes
    spool_fsync: FsyncMode = _DEFAULTS.spool_fsync
    spool_fsync_interval_ms: int = _DEFAULTS.spool_fsync_interval_ms
    delivery_timeout_ms: int = _DEFAULTS.delivery_timeout_ms
    max_pending_events: int = _DEFAULTS.max_pending_events
    dead_letter_max_bytes: int = _DEFAULTS.dead_letter_max_bytes
    # how long the delivery child keeps delivering when the gateway vanishes without telling it
    shutdown_grace_s: float = _DEFAULTS.shutdown_grace_s

    @classmethod
    def from_options(cls, options: Any, data_dir: Path) -> DeliveryConfig:
        """From anything with the ProxySettings field names: the settings dataclass or mitmproxy options."""
        same_name = {f.name: getattr(options, f.name) for f in fields(cls) if f.name not in _DERIVED}
        return cls(
            bootstrap=options.kafka_bootstrap.strip(),
            spool_dir=settings.spool_dir(data_dir, options.spool_dir),
            **same_name,
        )

    def check(self) -> None:
        if self.spool_fsync not in FSYNC_MODES:
            raise ValueError(f"spool_fsync must be one of {', '.join(FSYNC_MODES)}, got {self.spool_fsync!r}")
        if self.delivery_timeout_ms < 100:
            raise ValueError(f"delivery_timeout_ms must be at least 100, got {self.delivery_timeout_ms}")
        if self.max_pending_events < 1:
            raise ValueError(f"max_pending_events must be at least 1, got {self.max_pending_events}")


# The gateway options a publisher is built from: a change to any of them replaces it.
PUBLISHER_OPTIONS = frozenset(
    {f.name for f in fields(DeliveryConfig)} - _DERIVED | {"kafka_bootstrap", "spool_dir"}
)

DEAD_LETTER_FILE = "dead-letters.jsonl"


def is_permanent(exc: BaseException) -> bool:
    """Kafka refused this record itself, and would refuse it again: too large, or invalid. Only these:
    other non-retriable errors (a producer closed under its sends, IllegalStateError) say nothing about
    the record, and setting it aside for them would lose events a working Kafka would take."""
    from kafka import errors

    refusals = (
        errors.MessageSizeTooLargeError,
        errors.RecordListTooLargeError,
        errors.InvalidRecordError,
        errors.UnsupportedForMessageFormatError,
    )
    return isinstance(exc, refusals)


class DeadLetters:
    """`<spool-dir>/dead-letters.jsonl`: one JSON line per record Kafka refused for good, with its key,
    value (base64: kept exactly) and the error; owner-only, like the spool. Bounded by `max_bytes`."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / DEAD_LETTER_FILE
        self.max_bytes = max_bytes

    def add(self, key: bytes, value: bytes, why: str) -> bool:
        line = (
            json.dumps(
                {
                    "at": time.time(),
                    "error": why[:1000],
                    "key": base64.b64encode(key).decode(),
                    "value": base64.b64encode(value).decode(),
                }
            ).encode()
            + b"\n"
        )
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size + len(line) > self.max_bytes:
            return False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return True


PRODUCER_BATCH_BYTES = 512 * 1024


def make_producer(bootstrap: str, delivery_timeout_ms: int) -> Any:
    """A producer that waits for all in-sync replicas and lets the broker drop retried duplicates."""
    from kafka import KafkaProducer

    connect_ms = min(delivery_timeout_ms, 5000)
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="cohere-gateway",
        acks="all",
        enable_idempotence=True,
        # Events are for analytics, not for the client: waiting up to 50 ms fills batches, and one produce
        # request per batch instead of per event is most of what publishing costs the gateway in CPU.
        linger_ms=50,
        # Our own deadline (delivery_timeout_ms) decides when to spool; the producer's is a backstop.
        delivery_timeout_ms=delivery_timeout_ms + 1000,
        request_timeout_ms=min(30_000, delivery_timeout_ms),
        max_block_ms=connect_ms,
        bootstrap_timeout_ms=connect_ms,
        reconnect_backoff_max_ms=1000,
        # The broker's default message.max.bytes; events are built at most half of it (events.py).
        max_request_size=KAFKA_MAX_MESSAGE_BYTES,
        # kafka-python's default batch (16 KiB, about ten events) closed batches long before the linger
        # did, so each produce request carried a few events; this holds 50 ms of events at thousands a
        # second and is half the broker's per-batch limit (an event larger than what is left of a batch
        # starts the next one, so no batch grows past the larger of this and one event).
        batch_size=PRODUCER_BATCH_BYTES,
        # The producer's own metrics sensors run on every record; nothing reads them (the publisher
        # counts delivery itself).
        metrics_enabled=False,
    )


def open_spool(config: DeliveryConfig) -> Spool:
    return Spool(
        config.spool_dir,
        max_bytes=config.spool_max_bytes,
        fsync=config.spool_fsync,
        fsync_interval_ms=config.spool_fsync_interval_ms,
    )


def spool_late(config: DeliveryConfig, key: bytes, value: bytes) -> str | None:
    """Append one event to the spool of a publisher that has closed (it released the spool, which a
    successor may own by now); None when it is on disk, else why it could not be."""
    try:
        spool = open_spool(config)
    except (OSError, SpoolInUseError) as exc:
        return f"it arrived after shutdown and the spool is unavailable ({exc})"
    try:
        if not spool.append(key, value):
            return f"the spool is full ({config.spool_max_bytes} bytes cap)"
        spool.flush()
        return None
    finally:
        spool.close()


class _State(enum.IntEnum):
    """Where an event handed to the producer stands."""

    WAITING = 0  # sent, no answer yet
    ACKED = 1  # Kafka acknowledged it
    FAILED = 2  # the send failed and may succeed later: the event goes to the spool
    DEAD_LETTERED = 3  # Kafka refused it for good: kept in the dead-letter file


_SETTLED = (_State.ACKED, _State.DEAD_LETTERED)  # nothing more to do for it
_UNSETTLED = (_State.WAITING, _State.FAILED)  # still Kafka's or the spool's to take


class _Pending:
    """One event handed to the producer. `state` is set from the producer's I/O thread."""

    __slots__ = ("end", "key", "sent_at", "spooled", "state", "value")

    def __init__(self, key: bytes, value: bytes, end: Position | None) -> None:
        self.key = key
        self.value = value
        self.end = end  # position after it in the spool when replayed; None when sent live
        self.sent_at = 0.0
        self.state = _State.WAITING
        self.spooled = False  # written to the spool after giving up on it


class DurablePublisher:
    """publish(key, value) never blocks on Kafka and never raises; close(timeout) flushes or spools."""

    def __init__(
        self,
        config: DeliveryConfig,
        *,
        producer_factory: Callable[[str, int], Any] = make_producer,
    ) -> None:
        config.check()
        self.config = config
        self._factory = producer_factory
        self._spool = open_spool(config)
        self._dead_letters = DeadLetters(config.spool_dir, config.dead_letter_max_bytes)
        self._timeout_s = config.delivery_timeout_ms / 1000
        self._hard_cap = HARD_CAP_FACTOR * config.max_pending_events
        self._cond = threading.Condition(threading.RLock())  # RLock: futures may call back synchronously
        self._inbox: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._inflight: collections.deque[_Pending] = collections.deque()
        self._producer: Any = None
        self._closing = False
        self._deadline = 0.0
        self._next_probe = 0.0
        self._backoff = 0.2
        # Replay state (delivery thread only).
        self._read_pos = self._spool.start
        self._committed = self._spool.start
        self._acked_ahead: set[Position] = set()
        self._last_persist = 0.0
        self._replay_started = 0
        self._counts = dict.fromkeys(EVENT_COUNTERS, 0)
        self._last_drop_log = 0.0
        self._drops_logged = 0
        # Events left from an earlier run go first, so new ones queue behind them.
        self._mode = SPOOL if not self._spool.is_drained(self._spool.start) else LIVE
        if self._mode == SPOOL:
            log.warning(
                "delivery: %d bytes of events spooled by an earlier run in %s; replaying once Kafka answers",
                self._spool.pending_bytes(),
                config.spool_dir,
            )
        self._thread = threading.Thread(target=self._run, name="cohere-gateway-delivery", daemon=True)
        self._thread.start()

    # -- the publisher protocol ----------------------------------------------------------------------

    def publish(self, key: bytes, value: bytes) -> None:
        try:
            with self._cond:
                self._counts["events_queued"] += 1
                if self._mode == CLOSED:
                    self._late_spool(key, value)
                elif self._mode == SPOOL and not self._inbox:
                    self._append_to_spool(key, value)
                elif len(self._inbox) + len(self._inflight) >= self._hard_cap:
                    # Only if the delivery thread is stuck (it spools long before this); memory stays bounded.
                    self._drop("the in-memory queue is full")
                else:
                    self._inbox.append((key, value))
                    # The thread wakes on its own every IDLE_WAIT_S and sends what queued meanwhile, in
                    # one go: waking it per event costs more CPU than the sends themselves.
                    if len(self._inbox) >= WAKE_AT_QUEUED:
                        self._cond.notify_all()
        except Exception:  # never let event delivery break the proxy
            log.exception("delivery: publish failed; event dropped")
            self._counts["events_dropped"] += 1

    def close(self, timeout: float) -> None:
        """Keep delivering for up to `timeout` seconds, then spool whatever is left and stop."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + max(timeout, 0.0)
            self._cond.notify_all()
        self._thread.join(timeout + 10.0)
        if self._thread.is_alive():
            log.error("delivery: thread did not stop within %.1fs of the grace period", timeout)

    def counters(self) -> dict[str, int]:
        with self._cond:
            out = dict(self._counts)
            out["spool_corrupt_records"] = self._spool.corrupt_records
            out["events_pending"] = len(self._inbox) + sum(1 for p in self._inflight if p.state in _UNSETTLED)
            out["spool_bytes_pending"] = self._spool.size_bytes
        return out

    # -- helpers called with the lock held -----------------------------------------------------------

    def _late_spool(self, key: bytes, value: bytes) -> None:
        """An exchange that finished after close(): straight to disk, so a shutdown loses nothing."""
        if problem := spool_late(self.config, key, value):
            self._drop(problem)
        else:
            self._counts["events_spooled"] += 1

    def _append_to_spool(self, key: bytes, value: bytes) -> None:
        try:
            ok = self._spool.append(key, value)
        except (OSError, ValueError) as exc:
            self._drop(f"the spool refused it ({exc})")
            return
        if ok:
            self._counts["events_spooled"] += 1
        else:
            self._drop(f"the spool is full ({self.config.spool_max_bytes} bytes cap)")

    def _drop(self, why: str) -> None:
        self._counts["events_dropped"] += 1
        now = time.monotonic()
        # Loud but not a log flood: the first drop, then at most one line every 5 s with the running total.
        if self._drops_logged == 0 or now - self._last_drop_log >= 5.0:
            log.error(
                "delivery: DROPPING events: %s; %d dropped so far. Raise --spool-max-bytes or restore Kafka.",
                why,
                self._counts["events_dropped"],
            )
            self._last_drop_log = now
            self._drops_logged += 1

    # -- the delivery thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._closing and self._should_stop():
                    break
                if self._mode == LIVE:
                    self._live_step()
                else:
                    self._spool_step()
            except Exception:
                log.exception("delivery: unexpected error; spooling and retrying")
                self._to_spool_mode("unexpected error")
                time.sleep(0.1)
        self._finish()

    def _should_stop(self) -> bool:
        if time.monotonic() >= self._deadline:
            return True
        with self._cond:
            if self._mode == LIVE:
                return not self._inbox and not self._inflight
            # Spooling: worth waiting only while Kafka answers and there is replay left to do.
            return self._producer is None

    def _connect(self) -> Any:
        try:
            producer = self._factory(self.config.bootstrap, self.config.delivery_timeout_ms)
        except Exception as exc:
            log.debug("delivery: cannot connect to Kafka at %s: %s", self.config.bootstrap, exc)
            return None
        try:
            if not producer.partitions_for(self.config.topic):
                raise RuntimeError(f"topic {self.config.topic} has no partitions")
        except Exception as exc:
            log.debug("delivery: topic %s not available: %s", self.config.topic, exc)
            abort_producer(producer)
            return None
        return producer

    def _set_aside(self, pending: _Pending, exc: BaseException) -> None:
        """Called with the lock held: Kafka will never take this record; keep it and move on."""
        pending.state = _State.DEAD_LETTERED
        why = f"{type(exc).__name__}: {exc}"
        try:
            kept = self._dead_letters.add(pending.key, pending.value, why)
        except OSError as err:
            kept = False
            why += f"; the dead-letter file is not writable ({err})"
        if kept:
            self._counts["events_dead_lettered"] += 1
            log.error(
                "delivery: Kafka refused an event for good (%s); kept in %s, delivery goes on",
                why,
                self._dead_letters.path,
            )
        else:
            self._drop(f"Kafka refused it for good ({why}) and the dead-letter file is full or unwritable")

    def _send(self, pending: _Pending) -> None:
        def on_ok(_: Any) -> None:
            with self._cond:
                pending.state = _State.ACKED
                if pending.spooled:  # given up on and spooled already: its replay will be a duplicate
                    self._counts["events_maybe_duplicated"] += 1
                if self._closing:  # otherwise the thread collects acknowledgements when it next wakes
                    self._cond.notify_all()

        def on_error(exc: Any) -> None:
            with self._cond:
                if isinstance(exc, BaseException) and is_permanent(exc):
                    self._set_aside(pending, exc)
                else:
                    pending.state = _State.FAILED
                self._cond.notify_all()

        pending.sent_at = time.monotonic()
        self._inflight.append(pending)
        try:
            future = self._producer.send(self.config.topic, key=pending.key, value=pending.value)
        except Exception as exc:
            if not is_permanent(exc):
                raise
            with self._cond:
                self._set_aside(pending, exc)
            return
        future.add_callback(on_ok)
        future.add_errback(on_error)

    def _trouble(self) -> str | None:
        """Why the in-flight window is stuck, if it is."""
        now = time.monotonic()
        for pending in self._inflight:
            if pending.state == _State.FAILED:
                return "Kafka refused or failed a send"
            if pending.state == _State.WAITING:
                if now - pending.sent_at > self._timeout_s:
                    return f"no acknowledgement within {self.config.delivery_timeout_ms} ms"
                break
        return None

    def _live_step(self) -> None:
        if self._producer is None:
            self._producer = self._connect()
            if self._producer is None:
                self._to_spool_mode(f"cannot reach Kafka at {self.config.bootstrap}")
                return
        with self._cond:
            room = self.config.max_pending_events - len(self._inflight)
            batch = [self._inbox.popleft() for _ in range(min(room, len(self._inbox)))]
            overflow = room <= 0 and bool(self._inbox)
        for i, (key, value) in enumerate(batch):
            try:
                self._send(_Pending(key, value, None))
            except Exception as exc:
                with self._cond:
                    self._inbox.extendleft(reversed(batch[i + 1 :]))
                self._to_spool_mode(f"send failed: {exc}")
                return
        with self._cond:
            while self._inflight and self._inflight[0].state in _SETTLED:
                if self._inflight.popleft().state == _State.ACKED:
                    self._counts["events_delivered"] += 1
            why = self._trouble()
            if why is None and overflow:
                why = f"more than {self.config.max_pending_events} events waiting for Kafka"
            if why is None:
                if not self._inbox:
                    self._cond.wait(IDLE_WAIT_S)
                return
        self._to_spool_mode(why)

    def _to_spool_mode(self, why: str) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            abort_producer(producer)
        with self._cond:
            replaying = self._mode == SPOOL
            if replaying:
                self._rewind()
            else:
                for pending in self._inflight:
                    if pending.state == _State.ACKED:
                        self._counts["events_delivered"] += 1
                    elif pending.state != _State.DEAD_LETTERED:
                        pending.spooled = True
                        self._append_to_spool(pending.key, pending.value)
                self._inflight.clear()
                while self._inbox:
                    self._append_to_spool(*self._inbox.popleft())
                self._mode = SPOOL
                self._counts["kafka_outages"] += 1
                self._read_pos = self._committed = self._spool.start
            self._next_probe = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, PROBE_BACKOFF_MAX_S)
        log.warning(
            "delivery: Kafka unavailable (%s): spooling events to %s (%d bytes waiting)",
            why,
            self.config.spool_dir,
            self._spool.pending_bytes(self._committed),
        )

    def _rewind(self) -> None:
        """After a failed replay, resume from the first unacknowledged record (acked ones are skipped)."""
        self._advance_commit()
        self._acked_ahead |= {p.end for p in self._inflight if p.state in _SETTLED and p.end is not None}
        self._inflight.clear()
        self._read_pos = self._committed

    def _advance_commit(self) -> None:
        committed = self._committed
        while self._inflight and self._inflight[0].state in _SETTLED:
            pending = self._inflight.popleft()
            if pending.state == _State.ACKED:
                self._counts["events_delivered"] += 1
                self._counts["events_replayed"] += 1
            assert pending.end is not None
            committed = pending.end
        if committed != self._committed:
            now = time.monotonic()
            persist = (
                committed.segment != self._committed.segment or now - self._last_persist >= CURSOR_PERSIST_S
            )
            self._spool.commit(committed, persist=persist)
            if persist:
                self._last_persist = now
            self._committed = committed
            self._acked_ahead = {p for p in self._acked_ahead if p > committed}

    def _spool_step(self) -> None:
        with self._cond:
            while self._inbox:  # queued before the switch; publish() appends directly once this is empty
                self._append_to_spool(*self._inbox.popleft())
        self._spool.tick()
        if self._producer is None:
            now = time.monotonic()
            if now < self._next_probe:
                with self._cond:
                    self._cond.wait(min(self._next_probe - now, 0.1))
                return
            self._producer = self._connect()
            if self._producer is None:
                self._next_probe = time.monotonic() + self._backoff
                self._backoff = min(self._backoff * 2, PROBE_BACKOFF_MAX_S)
                return
            self._backoff = 0.2
            self._replay_started = self._counts["events_replayed"]
            log.warning(
                "delivery: Kafka is back at %s: replaying %d spooled bytes",
                self.config.bootstrap,
                self._spool.pending_bytes(self._committed),
            )
        room = self.config.max_pending_events - len(self._inflight)
        if room > 0:
            records, self._read_pos = self._spool.read(self._read_pos, min(room, 1000))
            for record in records:
                if record.end in self._acked_ahead:
                    self._inflight.append(_Pending(record.key, record.value, record.end))
                    self._inflight[-1].state = _State.ACKED
                    continue
                try:
                    self._send(_Pending(record.key, record.value, record.end))
                except Exception as exc:
                    self._inflight[-1].state = _State.FAILED
                    log.debug("delivery: replay send failed: %s", exc)
                    break
        with self._cond:
            self._advance_commit()
            why = self._trouble()
            if why is None and not self._inflight and self._spool.is_drained(self._read_pos):
                if self._spool.reset_if_drained(self._read_pos):
                    self._mode = LIVE
                    self._read_pos = self._committed = self._spool.start
                    self._acked_ahead.clear()
                    log.warning(
                        "delivery: spool drained (%d events replayed): delivering live again",
                        self._counts["events_replayed"] - self._replay_started,
                    )
                return
            if why is None:
                if (self._inflight and room <= 0) or self._spool.is_drained(self._read_pos):
                    self._cond.wait(0.05)
                return
        self._to_spool_mode(why)

    def _finish(self) -> None:
        """Grace period over (or nothing left to do): spool what Kafka has not acknowledged, then stop."""
        producer, self._producer = self._producer, None
        with self._cond:
            idle = self._mode == LIVE and not self._inbox and not self._inflight
        if producer is not None:
            if idle:
                try:
                    producer.close(timeout=1.0)
                except Exception:
                    abort_producer(producer)
            else:
                abort_producer(producer)
        with self._cond:
            if self._mode == LIVE:
                left = [p for p in self._inflight if p.state in _UNSETTLED]
                self._counts["events_delivered"] += sum(1 for p in self._inflight if p.state == _State.ACKED)
                for pending in left:
                    pending.spooled = True
                    self._append_to_spool(pending.key, pending.value)
            else:
                self._rewind()
                self._spool.commit(self._committed)
            self._inflight.clear()
            while self._inbox:
                self._append_to_spool(*self._inbox.popleft())
            self._mode = CLOSED
            self._spool.close()
        counts = self.counters()
        if counts["spool_bytes_pending"]:
            log.warning(
                "delivery: stopped with %d bytes spooled in %s; the next start delivers them",
                counts["spool_bytes_pending"],
                self.config.spool_dir,
            )
        log.info("delivery: stopped: %s", counts)
