"""The processes a benchmark measures, each a context manager that yields once the process serves.

The emulator and the gateway are started exactly as the test suite starts them (tests/fixtures), so a
benchmark measures the same command a user runs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import GATEWAY_PREFIX
from tests.fixtures.emulator import start_emulator
from tests.fixtures.gateway import free_port, listening_sockets, start_gateway
from tests.fixtures.kafka import create_topic, free_port_pair
from tests.fixtures.processes import stop

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base URL requests are sent to
    path_prefix: str  # prepended to the Cohere path (/v2/chat)
    pid: int | None  # the process whose CPU and memory is measured; None: nothing between client and upstream


def _find_pid_listening(port: int) -> int | None:
    """The pid holding a listening socket on `port`: looks the socket inode up in /proc (no psutil)."""
    inodes = listening_sockets(port)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(proc.name)
    return None


@contextlib.contextmanager
def emulator(*flags: str) -> Iterator[Target]:
    with start_emulator(*flags) as url:
        port = int(url.rsplit(":", 1)[1])
        yield Target("direct", url, "", _find_pid_listening(port))


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(
        f"{proc.args!r} not listening on {port} within {START_TIMEOUT_S} s:\n{log.read_text()}"
    )


@contextlib.contextmanager
def process(
    name: str,
    args: list[str],
    port: int,
    prefix: str = "",
    env: dict[str, str] | None = None,
    cpus: set[int] | None = None,
) -> Iterator[Target]:
    """Run `args` until the block ends; it must listen on `port`. `cpus` pins it to those cores."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        log = Path(tmp) / "out.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [a.replace("{tmp}", tmp) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        try:
            wait_listening(port, proc, log)
            yield Target(name, f"http://127.0.0.1:{port}", prefix, proc.pid)
        except BaseException:
            print(
                f"--- {name}'s output, last 3000 characters ---\n{log.read_text()[-3000:]}", file=sys.stderr
            )
            raise
        finally:
            stop(proc)


def bare_mitmdump(
    upstream: str, mitmdump: str | None = None, name: str = "bare mitmdump"
) -> contextlib.AbstractContextManager[Target]:
    """`mitmdump --mode reverse:UPSTREAM` without scripts: the baseline. Its per-flow printing is off
    (flow_detail=0) as in the gateway, so the baseline is not slowed by writing to a terminal.
    `mitmdump`: another installation's (default: this one's)."""
    port = free_port()
    mitmdump = mitmdump or str(Path(sys.executable).with_name("mitmdump"))
    args = [
        mitmdump,
        "--mode",
        f"reverse:{upstream}@127.0.0.1:{port}",
        "--set",
        "confdir={tmp}",
        "--set",
        "flow_detail=0",
    ]
    return process(name, args, port)


@contextlib.contextmanager
def gateway(
    name: str, upstream: str, bootstrap: str, topic: str, command: list[str] | None = None, **options: Any
) -> Iterator[Target]:
    gw = start_gateway(upstream, bootstrap, topic, transparent=False, command=command, **options)
    try:  # start_gateway returns once every --workers process listens
        yield Target(name, gw.url, GATEWAY_PREFIX, gw.proc.pid)
    finally:
        gw.stop()


@dataclass(frozen=True)
class Kafka:
    bootstrap: str
    pid: int | None

    def topic(self, prefix: str = "bench", partitions: int = 3) -> str:
        return create_topic(self.bootstrap, f"{prefix}-{uuid.uuid4().hex[:10]}", partitions)


@contextlib.contextmanager
def kafka() -> Iterator[Kafka]:
    """KAFKA_BOOTSTRAP_SERVERS when set, else the project's local broker in a temporary directory."""
    if servers := os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield Kafka(servers, None)
        return
    from cohere_gateway import localkafka

    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker = localkafka.start(Path(tmp), free_port_pair())
        try:
            yield Kafka(broker.bootstrap, broker.pid)
        finally:
            localkafka.stop(Path(tmp))


@dataclass(frozen=True)
class Consumer:
    pid: int
    api: str  # http://127.0.0.1:PORT of its read API

    def metrics(self, *names: str) -> dict[str, float]:
        """The consumer's unlabelled Prometheus samples named `names`, 0 for one not exposed yet."""
        import urllib.request

        found = dict.fromkeys(names, 0.0)
        with urllib.request.urlopen(self.api + "/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name in found:
                    found[name] = float(value)
        return found

    def inserted(self) -> int:
        """Events the consumer has inserted so far (its Prometheus counter)."""
        name = "cohere_gateway_consumer_events_inserted_total"
        return int(self.metrics(name)[name])


@contextlib.contextmanager
def consumer(bootstrap: str, topic: str, *flags: str, cpus: set[int] | None = None) -> Iterator[Consumer]:
    """`cohere-gateway consume` into the embedded engine in a temporary directory."""
    port = free_port()
    script = Path(sys.executable).with_name("cohere-gateway")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "cohere_gateway.cli"]
    args = [
        *cmd,
        "consume",
        "--kafka-bootstrap",
        bootstrap,
        "--topic",
        topic,
        "--group-id",
        f"bench-{uuid.uuid4().hex[:8]}",
        "--data-dir",
        "{tmp}/data",
        "--http-port",
        str(port),
        *flags,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHERE_GATEWAY_")}
    with process("consumer", args, port, env=env, cpus=cpus) as t:
        assert t.pid is not None
        yield Consumer(t.pid, t.url)


@contextlib.contextmanager
def lean_bare(name: str, upstream: str) -> Iterator[Target]:
    """bench/lean_gateway.py: the gateway's lean mitmproxy chain without the gateway addon."""
    port = free_port()
    args = [sys.executable, "-m", "bench.lean_gateway", "--port", str(port), "--upstream", upstream,
            "--data-dir", "{tmp}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("COHERE_GATEWAY_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    with process(name, args, port, "", env) as target:
        yield target
