"""A local single-node Apache Kafka broker (KRaft) without Docker.

The jars come from Maven Central through the pinned descriptor infra/kafka/pom.xml and are copied into
infra/kafka/lib (re-resolved only when the descriptor changes). Each broker lives in its own data
directory: `server.properties`, the KRaft log, `broker.pid` and `broker.out`, so several brokers (tests,
`up`, a developer's shell) can run side by side on different ports.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INFRA_DIR = Path(__file__).resolve().parent.parent / "infra" / "kafka"
POM = INFRA_DIR / "pom.xml"
LIB_DIR = INFRA_DIR / "lib"
LOG4J_CONFIG = INFRA_DIR / "log4j2.yaml"
PROPERTIES_TEMPLATE = INFRA_DIR / "server.properties.template"

MIN_JAVA = 17
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0

Progress = Callable[[str], None]


class KafkaSetupError(RuntimeError):
    """Something the user must fix (install Java/Maven, free a port, ...); the message says what."""


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    pid: int
    data_dir: Path


@dataclass(frozen=True)
class Status:
    pid: int | None
    running: bool
    ready: bool
    bootstrap: str

    def describe(self) -> str:
        if self.ready:
            return f"running: pid {self.pid}, bootstrap {self.bootstrap}, accepting requests"
        if self.running:
            return f"starting or unhealthy: pid {self.pid}, bootstrap {self.bootstrap} not answering yet"
        return "not running"


def _quiet(_: str) -> None:
    pass


# -- preconditions -----------------------------------------------------------------------------------


def java_major_version() -> int:
    java = shutil.which("java")
    if not java:
        raise KafkaSetupError(
            "Java is not installed: the local Kafka broker needs Java 17 or newer. "
            "Install it with `apt-get install openjdk-17-jre-headless` (or any JDK 17+), "
            "or point the gateway at an existing broker with --kafka-bootstrap."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False).stderr
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise KafkaSetupError(f"Could not read the Java version from `java -version`: {out.strip()!r}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise KafkaSetupError(
            f"Java {major} found, but Kafka 4 needs Java {MIN_JAVA}+. "
            "Install `openjdk-17-jre-headless` (or newer) and make it the default `java`."
        )
    return major


def _descriptor_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def ensure_jars(progress: Progress = _quiet) -> Path:
    """Resolve the broker's jars into LIB_DIR unless the descriptor is unchanged since last time."""
    stamp = LIB_DIR / ".descriptor"
    if stamp.exists() and stamp.read_text() == _descriptor_digest() and any(LIB_DIR.glob("kafka_2.13-*.jar")):
        return LIB_DIR
    mvn = shutil.which("mvn")
    if not mvn:
        raise KafkaSetupError(
            "Maven is not installed: it resolves the Kafka jars from Maven Central the first time. "
            "Install it with `apt-get install maven`, or point the gateway at an existing broker "
            "with --kafka-bootstrap."
        )
    progress(f"Resolving Apache Kafka jars from Maven Central into {LIB_DIR} (first run only)...")
    tmp = LIB_DIR.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mvn, "-B", "-q", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={tmp}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise KafkaSetupError(
            f"Maven could not resolve the Kafka jars (exit {proc.returncode}). Check that Maven Central "
            f"is reachable (proxy settings in ~/.m2/settings.xml). Maven said:\n{tail}"
        )
    shutil.rmtree(LIB_DIR, ignore_errors=True)
    tmp.rename(LIB_DIR)
    stamp.write_text(_descriptor_digest())
    progress(f"Resolved {sum(1 for _ in LIB_DIR.glob('*.jar'))} jars.")
    return LIB_DIR


# -- broker lifecycle --------------------------------------------------------------------------------


def _pid_file(data_dir: Path) -> Path:
    return data_dir / "broker.pid"


def _read_pid(data_dir: Path) -> int | None:
    try:
        pid = int(_pid_file(data_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_properties(data_dir: Path, port: int) -> Path:
    props = data_dir / "server.properties"
    text = PROPERTIES_TEMPLATE.read_text().format(
        port=port, controller_port=port + 1, log_dir=(data_dir / "kraft-logs").resolve()
    )
    props.write_text(text)
    return props


def _java_cmd(main_class: str, *args: str) -> list[str]:
    return [
        "java",
        "-Xms256m",
        "-Xmx1g",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
        "-cp",
        str(LIB_DIR / "*"),
        main_class,
        *args,
    ]


def new_cluster_id() -> str:
    """A KRaft cluster id as Kafka makes them: 16 random bytes, URL-safe base64. Like Kafka's own
    Uuid.randomUuid(), never one starting with '-', which the storage tool would read as an option."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(data_dir: Path, props: Path) -> None:
    if (data_dir / "kraft-logs" / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    proc = subprocess.run(
        _java_cmd("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise KafkaSetupError(f"Formatting KRaft storage in {data_dir} failed:\n{proc.stdout}{proc.stderr}")


def start(data_dir: Path, port: int, progress: Progress = _quiet) -> Broker:
    """Start (or find already running) the broker for `data_dir`; return once it serves produce/consume."""
    data_dir = Path(data_dir)
    bootstrap = f"127.0.0.1:{port}"
    pid = _read_pid(data_dir)
    if pid is not None:
        progress(f"Kafka already running for {data_dir} (pid {pid}); checking it answers...")
        wait_ready(bootstrap, START_TIMEOUT_S, pid=pid, log=data_dir / "broker.out")
        return Broker(bootstrap, pid, data_dir)
    java_major_version()
    for p in (port, port + 1):
        if not _port_free(p):
            raise KafkaSetupError(
                f"Port {p} is in use: Kafka needs {port} (clients) and {port + 1} (controller). "
                "Stop what uses it or choose another --port."
            )
    ensure_jars(progress)
    data_dir.mkdir(parents=True, exist_ok=True)
    props = _write_properties(data_dir, port)
    _format_storage(data_dir, props)
    progress(f"Starting Kafka on {bootstrap} (data in {data_dir})...")
    out = open(data_dir / "broker.out", "ab")  # noqa: SIM115 - handed to the child, which outlives us
    proc = subprocess.Popen(
        _java_cmd("kafka.Kafka", str(props)),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # survives the CLI that started it; `kafka stop` ends it
    )
    out.close()
    _pid_file(data_dir).write_text(str(proc.pid))
    try:
        wait_ready(bootstrap, START_TIMEOUT_S, pid=proc.pid, log=data_dir / "broker.out")
    except KafkaSetupError:
        stop(data_dir)
        raise
    return Broker(bootstrap, proc.pid, data_dir)


def stop(data_dir: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the broker for `data_dir` cleanly (controlled shutdown), killing it after `timeout`."""
    pid = _read_pid(Path(data_dir))
    if pid is None:
        _pid_file(Path(data_dir)).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    _pid_file(Path(data_dir)).unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def status(data_dir: Path, port: int) -> Status:
    bootstrap = f"127.0.0.1:{port}"
    pid = _read_pid(Path(data_dir))
    return Status(pid, pid is not None, pid is not None and probe(bootstrap), bootstrap)


# -- readiness ---------------------------------------------------------------------------------------


def probe(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True when the broker has an active controller and can create and list topics."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), client_id="cg-probe"
        )
    except (KafkaError, OSError, ValueError):
        return False
    try:
        admin.list_topics()
        return admin.describe_cluster().get("controller_id", -1) not in (-1, None)
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def wait_ready(bootstrap: str, timeout_s: float, *, pid: int | None = None, log: Path | None = None) -> None:
    """Wait until a produce with acks=all and a consume of it succeed, or raise with the broker's log tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise KafkaSetupError(f"Kafka exited during start-up.{_log_tail(log)}")
        if probe(bootstrap, timeout_s=3.0) and _produce_consume(bootstrap):
            return
        time.sleep(0.25)
    raise KafkaSetupError(
        f"Kafka on {bootstrap} did not become ready within {timeout_s:.0f}s.{_log_tail(log)}"
    )


def _produce_consume(bootstrap: str) -> bool:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError

    topic = "__cohere_gateway_readiness"
    marker = uuid.uuid4().bytes
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=5000)
        try:
            meta = producer.send(topic, marker).get(timeout=10)
        finally:
            producer.close(timeout=5)
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        try:
            tp = TopicPartition(topic, meta.partition)
            consumer.assign([tp])
            consumer.seek(tp, meta.offset)
            got = consumer.poll(timeout_ms=5000, max_records=1)
            return any(r.value == marker for recs in got.values() for r in recs)
        finally:
            consumer.close()
    except (KafkaError, OSError):
        return False


def _log_tail(log: Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return f"\nLast lines of {log}:\n" + "\n".join(tail)


if __name__ == "__main__":  # `python -m cohere_gateway.localkafka DIR PORT`: start and print bootstrap
    print(start(Path(sys.argv[1]), int(sys.argv[2]), progress=print).bootstrap)
