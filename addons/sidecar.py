"""Event delivery in a child process. The gateway hands each event over a local socket; the child runs the
durable publisher (addons/delivery.py: Kafka producer, spool, replay). kafka-python's threads then never
compete with the event loop for the GIL, which is what held the gateway's p99 above bare mitmproxy's
(bench/RESULTS.md).

Gateway side: `SidecarPublisher`, a Publisher. Child: `python -m cohere_gateway.addons.sidecar`, started
by it.

The socket is a SOCK_SEQPACKET pair, so messages keep their boundaries: a child that dies loses at most
the events it had read, never the framing. The gateway keeps the child's end open as well, so what a dead
child had not read stays queued for the child started next. The child stops when the gateway closes its
end, on a graceful stop or when the gateway dies: it delivers or spools everything queued before exiting.

Messages, gateway -> child: E<u16 key length><key><value> (an event), S<float64 grace seconds> (stop).
Child -> gateway: R (ready), X<text> (could not start), C<json> (its counters), D (delivery finished).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from cohere_gateway import settings
from cohere_gateway.addons.delivery import COUNTER_NAMES, DeliveryConfig, spool_late

log = logging.getLogger(__name__)

# Largest event handed over; the socket's send buffer is sized to hold several. Events carry at most two
# bodies truncated to payload_max_bytes, far below this.
MAX_EVENT_BYTES = 1 << 20
SOCKET_BUFFER_BYTES = 4 << 20
COUNTERS_MAX_BYTES = 64 << 10
START_TIMEOUT_S = 60.0
RESPAWN_BACKOFF_S = 2.0
CHECK_CHILD_EVERY_S = 0.5
COUNTERS_EVERY_S = 0.2
SPOOL_LOCK_WAIT_S = 30.0  # a child left over from a killed gateway may still be spooling
NICENESS = 10
READ_EVERY_S = 0.02
_GRACE = struct.Struct("!d")
_KEY_LEN = struct.Struct("!H")

# A message's first byte says what it is (the module docstring has the layout of each).
EVENT = b"E"  # gateway -> child
STOP = b"S"  # gateway -> child
READY = b"R"  # child -> gateway
CANNOT_START = b"X"  # child -> gateway
COUNTERS = b"C"  # child -> gateway
DELIVERED = b"D"  # child -> gateway: its publisher is closed, everything delivered or spooled


class SidecarError(RuntimeError):
    """The delivery process could not start; the message says why."""


# -- gateway side -------------------------------------------------------------------------------------


class SidecarPublisher:
    """publish() is one non-blocking send on a local socket; close(timeout) lets the child deliver."""

    def __init__(
        self,
        config: DeliveryConfig,
        *,
        log_level: str = "info",
        spool_lock_wait_s: float = SPOOL_LOCK_WAIT_S,
    ) -> None:
        config.check()
        self.config = config
        self._spool_lock_wait_s = spool_lock_wait_s
        self._log_level = log_level
        # The child's end stays open here too: what a dead child had not read waits for the next one.
        self._gateway_end, self._child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (self._gateway_end, self._child_end):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        self._lock = threading.Lock()
        # Events the socket had no room for (the child stalled or is being restarted), bounded.
        self._backlog: collections.deque[bytes] = collections.deque()
        self._child_counts: dict[str, int] = {}
        self._accepted = 0
        self._dropped = 0
        self._closing = False  # close() began: the child is told its grace period, events still go to it
        self._closed = False  # the child takes no more: they wait in _late_events, then go to disk
        self._child_done = False  # the child reported its publisher closed (DELIVERED)
        self._child_gone = False
        self._late_events: list[tuple[bytes, bytes]] = []
        self._next_check = 0.0
        self._last_spawn = 0.0
        self._proc = self._spawn()
        self._await_ready()
        self._gateway_end.setblocking(False)

    # -- the publisher protocol ---------------------------------------------------------------------------

    def publish(self, key: bytes, value: bytes) -> None:
        try:
            message = event_message(key, value)
            with self._lock:
                self._accepted += 1
                if self._closed:
                    if self._child_gone:
                        self._late(key, value)
                    else:  # the child may still hold the spool: to disk once it has exited
                        self._late_events.append((key, value))
                    return
                if len(message) > MAX_EVENT_BYTES:
                    self._drop(f"it is {len(message)} bytes, over the {MAX_EVENT_BYTES}-byte limit")
                    return
                now = time.monotonic()
                if now >= self._next_check:
                    self._next_check = now + CHECK_CHILD_EVERY_S
                    self._ensure_child(now)
                if self._backlog:
                    self._backlog.append(message)
                    self._send_backlog()
                else:
                    try:
                        self._gateway_end.send(message)
                    except BlockingIOError:
                        self._backlog.append(message)
                if len(self._backlog) > self.config.max_pending_events:
                    self._backlog.pop()  # the newest: what is queued keeps its order (and the stop message)
                    self._drop("the delivery process is not keeping up (is it stuck?)")
        except Exception:  # never let event delivery break the proxy
            log.exception("delivery: publish failed; event dropped")
            self._dropped += 1

    def close(self, timeout: float) -> None:
        """Tell the child how long it has, keep handing it events while it delivers (exchanges on open
        connections may still finish), then end the socket and wait for the child to exit."""
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._lock:
            if self._closing:
                return
            self._closing = True
            if self._proc.poll() is not None:  # died: a new child drains what is queued
                self._proc = self._spawn()
            self._backlog.append(STOP + _GRACE.pack(max(0.0, deadline - time.monotonic())))
        handed_over = self._flush_backlog(deadline + 5.0) and self._wait_child_done(deadline + 15.0)
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self._gateway_end.shutdown(socket.SHUT_WR)
        try:
            self._proc.wait(timeout=5.0 if handed_over else 0.0)
        except subprocess.TimeoutExpired:
            log.error("delivery: the delivery process did not finish in time; killing it")
            self._proc.kill()
            self._proc.wait()
            handed_over = False
        with self._lock:
            self._child_gone = True
            self._read_messages()
            if not handed_over:
                self._spool_unread()
            late, self._late_events = self._late_events, []
            for key, value in late:
                self._late(key, value)
        self._gateway_end.close()
        self._child_end.close()

    def _flush_backlog(self, until: float) -> bool:
        """Send the backlog (the stop message last) without holding the lock while the socket is full."""

        def sent() -> bool:
            self._send_backlog()
            return not self._backlog

        return self._wait_child(sent, until, writable=True, failure="takes no more events; spooling here")

    def _wait_child_done(self, until: float) -> bool:
        def done() -> bool:
            self._read_messages()
            return self._child_done

        return self._wait_child(done, until, writable=False, failure="did not report its delivery finished")

    def _wait_child(self, step: Callable[[], bool], until: float, *, writable: bool, failure: str) -> bool:
        """Run `step` under the lock until it returns True, waiting on the socket between tries; False
        (and logged) once `until` passes or the child exits first."""
        while True:
            with self._lock:
                if step():
                    return True
            if time.monotonic() >= until or self._proc.poll() is not None:
                log.error("delivery: the delivery process %s", failure)
                return False
            ready = ([], [self._gateway_end]) if writable else ([self._gateway_end], [])
            select.select(*ready, [], 0.2)

    def counters(self) -> dict[str, int]:
        with self._lock:
            if not self._closing:
                self._ensure_child(time.monotonic())
                self._send_backlog()
            if not self._child_gone:
                self._read_messages()
            out = dict.fromkeys(COUNTER_NAMES, 0) | self._child_counts
            in_transit = max(0, self._accepted - self._dropped - out["events_queued"])
            out["events_pending"] += in_transit
            out["events_queued"] = self._accepted
            out["events_dropped"] += self._dropped
        return out

    # -- helpers (lock held) ------------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._last_spawn = time.monotonic()
        # resolved: the child's working directory need not be the gateway's
        config = dataclasses.replace(self.config, spool_dir=self.config.spool_dir.resolve())
        fd = self._child_end.fileno()
        cmd = [
            sys.executable,
            # -P: not the working directory first on sys.path, where another checkout's cohere_gateway
            # would be imported in place of the installed one
            "-P",
            "-m",
            "cohere_gateway.addons.sidecar",
            "--fd",
            str(fd),
            "--config",
            settings.to_json(config),
            "--spool-lock-wait",
            str(self._spool_lock_wait_s),
            "--log-level",
            self._log_level,
        ]
        return subprocess.Popen(cmd, pass_fds=(fd,), stdin=subprocess.DEVNULL)

    def _await_ready(self) -> None:
        self._gateway_end.settimeout(START_TIMEOUT_S)
        try:
            while True:
                try:
                    message = self._gateway_end.recv(COUNTERS_MAX_BYTES)
                except TimeoutError:
                    self._proc.kill()
                    raise SidecarError(
                        f"the delivery process did not start within {START_TIMEOUT_S:.0f} s"
                    ) from None
                if message[:1] == READY:
                    return
                if message[:1] == CANNOT_START:
                    self._proc.wait()
                    raise SidecarError(message[1:].decode("utf-8", "replace"))
        finally:
            self._gateway_end.settimeout(None)

    @property
    def pid(self) -> int:
        """The delivery process's pid (tests kill it)."""
        return int(self._proc.pid)

    def _ensure_child(self, now: float) -> None:
        code = self._proc.poll()
        if code is None or now - self._last_spawn < RESPAWN_BACKOFF_S:
            return
        log.error(
            "delivery: the delivery process exited with %s; starting another (events it had not read wait "
            "in the socket)",
            code,
        )
        self._proc = self._spawn()

    def _send_backlog(self) -> None:
        while self._backlog:
            try:
                self._gateway_end.send(self._backlog[0])
            except BlockingIOError:
                return
            self._backlog.popleft()

    def _read_messages(self) -> None:
        """Take what the child sent: its counters, or that its delivery finished."""
        for message in _queued(self._gateway_end, COUNTERS_MAX_BYTES):
            if message[:1] == COUNTERS:
                self._child_counts = json.loads(message[1:])
            elif message[:1] == DELIVERED:
                self._child_done = True

    def _drop(self, why: str) -> None:
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            log.error("delivery: DROPPING events: %s; %d dropped so far", why, self._dropped)

    def _spool_unread(self) -> None:
        """Every event still queued for the child (we hold its end too), then the backlog, to disk."""
        for message in [*_queued(self._child_end, MAX_EVENT_BYTES), *self._backlog]:
            if message[:1] == EVENT:
                self._late(*split_event(message))
        self._backlog.clear()

    def _late(self, key: bytes, value: bytes) -> None:
        """After close the child has released the spool: an exchange finishing now goes to disk here."""
        if problem := spool_late(self.config, key, value):
            self._drop(problem)


def event_message(key: bytes, value: bytes) -> bytes:
    return EVENT + _KEY_LEN.pack(len(key)) + key + value


def split_event(message: bytes | memoryview) -> tuple[bytes, bytes]:
    """(key, value) of an event message, copied out of `message`."""
    (key_len,) = _KEY_LEN.unpack_from(message, 1)
    start = 1 + _KEY_LEN.size
    return bytes(message[start : start + key_len]), bytes(message[start + key_len :])


def _queued(sock: socket.socket, size: int) -> list[bytes]:
    """The messages waiting on `sock`, without blocking."""
    out = []
    while True:
        try:
            message = sock.recv(size, socket.MSG_DONTWAIT)
        except OSError:
            return out
        if not message:
            return out
        out.append(message)


# -- child side ---------------------------------------------------------------------------------------


def _open_publisher(config: DeliveryConfig, lock_wait_s: float) -> Any:
    from cohere_gateway.addons.delivery import DurablePublisher
    from cohere_gateway.addons.spool import SpoolInUseError

    deadline = time.monotonic() + lock_wait_s
    while True:
        try:
            return DurablePublisher(config)
        except SpoolInUseError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _report(sock: socket.socket, publisher: Any, stop: threading.Event) -> None:
    last: dict[str, int] | None = None
    while not stop.wait(COUNTERS_EVERY_S):
        counts = publisher.counters()
        if counts != last:
            try:
                sock.send(COUNTERS + json.dumps(counts).encode(), socket.MSG_DONTWAIT)
                last = counts
            except OSError:
                pass  # the gateway reads when it needs them; a skipped update is replaced by the next


def _finish(publisher: Any, grace: float, sock: socket.socket, stop: threading.Event) -> None:
    publisher.close(grace)
    stop.set()
    with contextlib.suppress(OSError):  # the gateway is gone; close() logged the counters
        sock.send(COUNTERS + json.dumps(publisher.counters()).encode())
        sock.send(DELIVERED)


def _serve(
    sock: socket.socket, publisher: Any, stop: threading.Event, closers: list[threading.Thread]
) -> None:
    """Hand every event to the publisher until the gateway's end of the socket closes."""
    buffer = bytearray(MAX_EVENT_BYTES)
    view = memoryview(buffer)
    resets = 0
    while True:
        flags = 0  # block for the first message of a round, then take what else is queued
        while True:
            try:
                size = sock.recv_into(buffer, 0, flags)
            except BlockingIOError:
                break
            except ConnectionResetError:
                # The gateway died with our counters unread: Linux reports that once, then hands over
                # the events still queued, then end-of-file.
                resets += 1
                if resets > 3:
                    return
                continue
            if size == 0:
                return  # the gateway closed its end, or died
            flags = socket.MSG_DONTWAIT
            kind = buffer[0]
            if kind == EVENT[0]:
                publisher.publish(*split_event(view[:size]))
            elif kind == STOP[0] and not closers:
                # Deliver for the grace period while events keep arriving (exchanges still finishing
                # on open connections); after it, the publisher appends them to the spool itself.
                (grace,) = _GRACE.unpack_from(buffer, 1)
                closers.append(threading.Thread(target=_finish, args=(publisher, grace, sock, stop)))
                closers[0].start()
        # Waking per event would cost more than delivering it; the producer batches for 50 ms anyway.
        time.sleep(READ_EVERY_S)


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cohere_gateway.addons.sidecar", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--fd", type=int, required=True, help="the SOCK_SEQPACKET socket from the gateway")
    parser.add_argument("--config", required=True, help="DeliveryConfig as settings.to_json")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--spool-lock-wait", type=float, default=SPOOL_LOCK_WAIT_S, help="how long to wait for the spool lock"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="[%(asctime)s] %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.WARNING if args.log_level != "debug" else logging.DEBUG)
    # Delivery is background work: where cores are short, the proxy's requests go first. Events wait in
    # the socket and the producer's batches meanwhile; nice 10 still gets ~10 % of a contended core.
    os.nice(NICENESS)
    # Ctrl-C in a terminal reaches the whole process group; the gateway decides when delivery stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=args.fd)
    try:
        config: DeliveryConfig = settings.from_json(DeliveryConfig, args.config)
        publisher = _open_publisher(config, args.spool_lock_wait)
    except Exception as exc:
        sock.send(CANNOT_START + f"cannot start event delivery: {exc}".encode())
        return 1
    sock.send(READY)
    stop = threading.Event()
    reporter = threading.Thread(target=_report, args=(sock, publisher, stop), daemon=True)
    reporter.start()
    closers: list[threading.Thread] = []  # the one started by the stop message
    try:
        _serve(sock, publisher, stop, closers)
    except Exception:  # deliver or spool what we hold, whatever went wrong with the socket
        log.exception("delivery: reading events from the gateway failed; finishing")
    if not closers:  # the gateway died without a word: deliver what we have within our grace
        _finish(publisher, config.shutdown_grace_s, sock, stop)
    else:
        closers[0].join()
    reporter.join()
    return 0


if __name__ == "__main__":
    code = child_main()
    # Everything is delivered or spooled by now; kafka-python may leave a non-daemon thread behind (an
    # aborted producer's), which would hold a normal exit until it gives up.
    logging.shutdown()
    os._exit(code)
