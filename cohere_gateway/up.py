"""`cohere-gateway up`: the whole pipeline on one machine, in the foreground, stopped by one Ctrl-C.

Each part runs as its own process (the same `cohere-gateway` subcommands an operator would run), started
in its own session so a terminal's Ctrl-C reaches only this supervisor, which then stops them in an order
that loses nothing: traffic first, then the gateway (it flushes its events to Kafka), then the consumer
(it writes what it holds), and Kafka last.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cohere_gateway import localkafka
from cohere_gateway.kafka_topics import ensure_topic
from cohere_gateway.settings import UpSettings, kafka_dir

Say = Callable[[str], None]
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


class UpError(RuntimeError):
    """A part failed to start; the message says which and what it printed."""


@dataclass
class Part:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    settings: UpSettings
    say: Say
    parts: list[Part] = field(default_factory=list)
    kafka_dir: Path | None = None  # set when this process started the local broker
    gateway_url: str = ""
    dashboard_url: str = ""
    upstream: str = ""
    kafka_bootstrap: str = ""

    # -- start ----------------------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        data_dir = s.data_dir.resolve()
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)

        if s.kafka:
            self.kafka_bootstrap = s.kafka
            self.say(f"Kafka: using {s.kafka}")
        else:
            self.kafka_dir = kafka_dir(data_dir)
            broker = localkafka.start(self.kafka_dir, s.kafka_port, progress=self.say)
            self.kafka_bootstrap = broker.bootstrap
            self.say(f"Kafka: local broker on {broker.bootstrap}")
        # Up front, so neither the gateway's first event nor a broker default decides the partition count.
        from kafka.errors import KafkaError

        try:
            count = ensure_topic(self.kafka_bootstrap, s.topic, s.partitions)
        except (KafkaError, ValueError) as exc:
            raise UpError(f"could not create topic {s.topic} on {self.kafka_bootstrap}: {exc}") from exc
        self.say(f"Kafka: topic {s.topic}, {count if count is not None else 'unknown'} partitions")

        self.upstream = s.upstream
        if s.demo:
            port = s.emulator_port or _free_port()
            self._spawn("emulator", "emulator", "--host", "127.0.0.1", "--port", str(port))
            self.upstream = f"http://127.0.0.1:{port}"
            _wait_http(f"{self.upstream}/__emulator/health", self.parts[-1])

        storage = ["--clickhouse", s.clickhouse] if s.clickhouse else ["--data-dir", str(data_dir)]
        self._spawn(
            "consumer",
            "consume",
            "--kafka-bootstrap",
            self.kafka_bootstrap,
            "--topic",
            s.topic,
            "--partitions",
            str(s.partitions),
            "--http-host",
            s.host,
            "--http-port",
            str(s.dashboard_port),
            *storage,
        )
        self.dashboard_url = f"http://{s.host}:{s.dashboard_port}"
        _wait_http(f"{self.dashboard_url}/readyz", self.parts[-1])

        self._spawn(
            "gateway",
            "proxy",
            "--host",
            s.host,
            "--port",
            str(s.port),
            "--upstream",
            self.upstream,
            "--kafka-bootstrap",
            self.kafka_bootstrap,
            "--topic",
            s.topic,
            "--data-dir",
            str(data_dir),
        )
        self.gateway_url = f"http://{s.host}:{s.port}"
        _wait_http(f"{self.gateway_url}/healthz", self.parts[-1])

    def _spawn(self, name: str, *args: str) -> None:
        log = self.settings.data_dir.resolve() / "logs" / f"{name}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child writes to it for its whole life
        proc = subprocess.Popen(
            [sys.executable, "-m", "cohere_gateway.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops parts in order
        )
        out.close()
        self.parts.append(Part(name, proc, log))
        self.say(f"{name}: starting (pid {proc.pid}, log {log})")

    # -- run and stop ---------------------------------------------------------------------------------

    def failed_part(self) -> Part | None:
        return next((p for p in self.parts if p.proc.poll() is not None), None)

    def stop(self) -> None:
        for part in reversed(self.parts):
            if part.proc.poll() is None:
                self.say(f"{part.name}: stopping")
                part.proc.send_signal(signal.SIGTERM)
                try:
                    part.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.say(f"{part.name}: did not stop within {STOP_TIMEOUT_S:.0f}s; killing it")
                    part.proc.kill()
                    part.proc.wait()
        if self.kafka_dir is not None:
            self.say("kafka: stopping")
            localkafka.stop(self.kafka_dir)


def run(settings: UpSettings, say: Say) -> int:
    stack = Stack(settings, say)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
    except (UpError, localkafka.KafkaSetupError) as exc:
        say(f"error: {exc}")
        stack.stop()
        return 1

    say("")
    say(f"Gateway:    {stack.gateway_url}")
    say(f"  SDK base URL: {stack.gateway_url}/v1/<account_id>/<gateway_id>/cohere")
    say(f"  upstream:     {stack.upstream}")
    say(f"Dashboard:  {stack.dashboard_url}/")
    say(f"Kafka:      {stack.kafka_bootstrap} (topic {settings.topic})")
    say(f"Data:       {settings.data_dir.resolve()} (logs in logs/)")
    say("Press Ctrl-C to stop everything.")

    demo_thread = None
    if settings.demo:
        from cohere_gateway import demo

        def drive() -> None:
            stats = demo.drive(
                stack.gateway_url,
                requests=settings.demo_requests or None,
                rate_per_s=settings.demo_rate,
                stop=stop,
            )
            say(f"demo: sent {stats.total} calls ({stats.ok} ok, {dict(stats.errors)} errors)")

        demo_thread = threading.Thread(target=drive, name="demo", daemon=True)
        demo_thread.start()
        say(f"demo: sending ~{settings.demo_rate:g} calls/s through the gateway with the cohere SDK")

    code = 0
    while not stop.wait(0.5):
        if (part := stack.failed_part()) is not None:
            say(f"error: {part.name} exited with code {part.proc.returncode}; see {part.log}")
            code = 1
            stop.set()
    say("Stopping...")
    if demo_thread is not None:
        demo_thread.join(timeout=35)
    stack.stop()
    say("Stopped.")
    return code


# -- helpers --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, part: Part, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if part.proc.poll() is not None:
            raise UpError(f"{part.name} exited with code {part.proc.returncode}.{_tail(part.log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise UpError(f"{part.name} did not answer {url} within {timeout_s:.0f}s.{_tail(part.log)}")


def _tail(log: Path, lines: int = 15) -> str:
    if not log.exists():
        return ""
    return f"\nLast lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
