"""The upstream pool (`--upstream-pool`): requests on new client connections reuse warm upstream
connections of the relay's shared pool instead of a TCP+TLS handshake each.

Real processes: the emulator behind a TLS front (tests/fixtures/tls_front.py) that counts the
connections it accepts, so what the gateway opened upstream is counted where it arrives; gateways with
each policy trusting the front's CA (`--upstream-ca`); events read back from Kafka.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from cohere_gateway.events import encode
from tests.fixtures.emulator import EmulatorRequests, start_emulator
from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.tls_front import TlsFront, tls_front

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "command-r", "messages": [{"role": "user", "content": "hello"}]}
KEY = "key-" + uuid.uuid4().hex
RELAY_HEADER = "x-cohere-gateway-relay"


@pytest.fixture(scope="module")
def front(emulator_url: str) -> Iterator[TlsFront]:
    with tls_front(emulator_url) as f:
        yield f


@contextlib.contextmanager
def gateway(front: TlsFront, kafka_bootstrap: str, topic: str, mode: str, env: dict[str, str] | None = None,
            **options: object) -> Iterator[GatewayProcess]:  # fmt: skip
    options.setdefault("upstream_ca", str(front.ca_file))
    gw = start_gateway(
        front.url, kafka_bootstrap, topic, transparent=False, upstream_pool=mode, env=env, **options
    )
    try:
        yield gw
    finally:
        gw.stop()


def fresh_connections() -> httpx.Client:
    """A client that keeps no connection: every request on a new one, as a serverless function's."""
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30)


def chat(client: httpx.Client, gw: GatewayProcess, cid: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "cf-aig-event-id": cid}
    return client.post(gw.base() + "/cohere/v2/chat", json=CHAT, headers=headers)


def upstream_connections(gw: GatewayProcess) -> dict[str, int]:
    text = gw.get("/metrics").decode()
    pattern = r'cohere_gateway_upstream_connections_total\{path="(\w+)"\} ([\d.]+)'
    return {m[1]: int(float(m[2])) for m in re.finditer(pattern, text)}


@pytest.mark.parametrize("mode", ["new-connections", "always"])
def test_requests_on_new_client_connections_share_one_warm_upstream_connection(
    front: TlsFront,
    kafka_bootstrap: str,
    gateway_topic: str,
    gateway_events: EventReader,
    emulator_requests: EmulatorRequests,
    mode: str,
) -> None:
    run = uuid.uuid4().hex
    with gateway(front, kafka_bootstrap, gateway_topic, mode) as gw, fresh_connections() as client:
        before = front.connections
        for i in range(6):
            resp = chat(client, gw, f"{run}-{i}")
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-cohere-gateway-attempts"] == "1"
        opened = front.connections - before
        counted = upstream_connections(gw)
    assert opened == 1  # six requests on six client connections, one upstream handshake
    assert counted == {"mitmproxy": 0, "pool": 1}
    events = gateway_events.wait_until(lambda e: (e.client_event_id or "").startswith(run), 6)
    for event in events:
        assert (event.outcome, event.attempts, event.attempt_statuses) == ("ok", 1, [200])
        # the relay's ticket is the gateway's own: never in an event, never sent upstream
        assert RELAY_HEADER not in encode(event).decode().lower()
    assert all(RELAY_HEADER not in r["headers"] for r in emulator_requests.all())


def test_without_the_pool_each_new_client_connection_costs_an_upstream_handshake(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str
) -> None:
    with gateway(front, kafka_bootstrap, gateway_topic, "off") as gw, fresh_connections() as client:
        before = front.connections
        for i in range(6):
            assert chat(client, gw, f"off-{i}").status_code == 200
        opened = front.connections - before
        counted = upstream_connections(gw)
    assert opened == 6
    assert counted == {"mitmproxy": 6, "pool": 0}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("off", {"mitmproxy": 1, "pool": 0}), ("new-connections", {"mitmproxy": 1, "pool": 1}),
     ("always", {"mitmproxy": 0, "pool": 1})],
)  # fmt: skip
def test_a_kept_alive_client_connection(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, mode: str, expected: dict[str, int]
) -> None:
    """new-connections: the pool answers the connection's first request; its second opens mitmproxy's own
    upstream connection, which serves the rest without the loopback hop. always: the pool, every time,
    over the one loopback connection mitmproxy keeps to the relay."""
    with gateway(front, kafka_bootstrap, gateway_topic, mode) as gw, httpx.Client(timeout=30) as client:
        before = front.connections
        for i in range(5):
            assert chat(client, gw, f"kept-{i}").status_code == 200
        opened = front.connections - before
        counted = upstream_connections(gw)
        log = gw.log_text()
    assert counted == expected
    assert opened == sum(expected.values())
    assert "internal error in the upstream relay" not in log


def test_a_kept_alive_connection_keeps_its_relay_connection_between_retried_requests(
    emulator_url: str, kafka_bootstrap: str, gateway_topic: str
) -> None:
    """The relay used to fail every second request of a kept-alive loopback connection (a cancelled read
    still waiting on it): logged with its traceback, and mitmproxy reconnected for each request."""
    gw = start_gateway(emulator_url, kafka_bootstrap, gateway_topic, transparent=False)
    try:
        with httpx.Client(timeout=30) as client:
            headers = {"Authorization": f"Bearer {KEY}", "cf-aig-max-attempts": "2"}
            for _ in range(4):
                resp = client.post(gw.base() + "/cohere/v2/chat", json=CHAT, headers=headers)
                assert resp.status_code == 200
        log = gw.log_text()
    finally:
        gw.stop()
    assert "internal error in the upstream relay" not in log


def test_with_pool_streams_a_stream_streams_through_the_pool(
    kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    delay_ms = 100
    cid = "pool-stream-" + uuid.uuid4().hex
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "emulator:reply-tokens=12"}]}
    with (
        start_emulator("--chunk-delay-ms", str(delay_ms)) as upstream,
        tls_front(upstream) as slow_front,
        gateway(slow_front, kafka_bootstrap, gateway_topic, "new-connections", pool_streams=True) as gw,
    ):
        arrivals: list[float] = []
        headers = {"Authorization": f"Bearer {KEY}", "cf-aig-event-id": cid}
        url = gw.base() + "/cohere/v2/chat"
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as resp:
            assert resp.status_code == 200, resp.read()
            start = time.monotonic()
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - start)
        counted = upstream_connections(gw)
    assert counted == {"mitmproxy": 0, "pool": 1}  # it went through the pool
    # each event passed on as it came, never held until the stream ended
    assert len(arrivals) > 10
    assert arrivals[-1] - arrivals[0] >= (len(arrivals) - 2) * delay_ms / 1000 * 0.8
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.stream, event.attempts) == ("ok", True, 1)
    assert event.usage.output_tokens == 12


def test_by_default_a_stream_goes_on_mitmproxys_own_connection_and_others_keep_the_pool(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    cid = "own-stream-" + uuid.uuid4().hex
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "emulator:reply-tokens=12"}]}
    headers = {"Authorization": f"Bearer {KEY}", "cf-aig-event-id": cid}
    with (
        gateway(front, kafka_bootstrap, gateway_topic, "new-connections") as gw,
        fresh_connections() as client,
    ):
        with client.stream("POST", gw.base() + "/cohere/v2/chat", json=body, headers=headers) as resp:
            assert resp.status_code == 200, resp.read()
            events = [line for line in resp.iter_lines() if line.startswith("data:")]
        after_stream = upstream_connections(gw)
        for i in range(3):
            assert chat(client, gw, f"own-stream-plain-{i}").status_code == 200
        after_plain = upstream_connections(gw)
    assert len(events) > 10
    assert after_stream == {"mitmproxy": 1, "pool": 0}  # the stream: its own upstream connection
    assert after_plain == {"mitmproxy": 1, "pool": 1}  # requests without a stream: the pool, as before
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.stream, event.attempts) == ("ok", True, 1)
    assert event.usage.output_tokens == 12 and event.cost_usd is not None


def _relay_port(gw: GatewayProcess) -> int:
    """The loopback port the gateway's relay listens on: its process's other listening socket."""
    pid = gw.proc.pid
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    gateway_port = int(gw.url.rsplit(":", 1)[1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        port = int(cols[1].rsplit(":", 1)[1], 16)
        if cols[3] == "0A" and cols[9] in inodes and port != gateway_port:
            ports.add(port)
    assert len(ports) == 1, ports
    return ports.pop()


@pytest.mark.parametrize("ticket", [None, "forged-" + uuid.uuid4().hex])
def test_the_relay_answers_only_the_gateway_with_a_ticket(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, ticket: str | None
) -> None:
    with gateway(front, kafka_bootstrap, gateway_topic, "always") as gw, fresh_connections() as client:
        assert chat(client, gw, "warm").status_code == 200  # the relay starts with its first request
        port = _relay_port(gw)
        before = front.connections
        extra = f"{RELAY_HEADER}: {ticket}\r\n" if ticket else ""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                f"POST /v2/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
                f"Authorization: Bearer {KEY}\r\nContent-Length: 2\r\n\r\n{{}}".encode()
            )
            answer = b""
            while chunk := sock.recv(65536):  # the relay closes the connection after refusing
                answer += chunk
        assert front.connections == before  # nothing went upstream
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"not a request of this gateway" in answer


@pytest.mark.parametrize("mode", ["off", "always"])
def test_an_upstream_certificate_the_gateway_does_not_trust_is_refused_on_either_path(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, mode: str
) -> None:
    # Without --upstream-ca the front's private CA is not trusted (certifi's bundle only): not even when
    # the environment's SSL_CERT_FILE / SSL_CERT_DIR name it, and the upstream is reached directly, not
    # through the environment's proxy (a dead port: a client taking it never reaches the front).
    env = {"SSL_CERT_FILE": str(front.ca_file), "SSL_CERT_DIR": str(front.ca_file.parent)}
    env |= dict.fromkeys(
        ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"), f"http://127.0.0.1:{dead_port()}"
    )
    with (
        gateway(front, kafka_bootstrap, gateway_topic, mode, upstream_ca="", env=env) as gw,
        fresh_connections() as client,
    ):
        before = front.hellos
        resp = chat(client, gw, "untrusted-" + mode)
        reached = front.hellos - before
    assert resp.status_code == 502
    assert "could not reach the upstream" in resp.json()["message"]
    assert reached >= 1  # it went to the front itself, whose certificate was refused


def dead_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreadable_upstream_ca_stops_the_start_naming_it(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, tmp_path: Path
) -> None:
    bad = tmp_path / "not-a-bundle.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(RuntimeError, match="upstream_ca"):
        start_gateway(front.url, kafka_bootstrap, gateway_topic, transparent=False, upstream_ca=str(bad))


def test_the_setting_is_in_help_and_docs() -> None:
    from cohere_gateway.cli import main

    done = CliRunner().invoke(main, ["proxy", "--help"], terminal_width=200)
    assert done.exit_code == 0
    text = " ".join(done.output.split())
    for needle in ("--upstream-pool", "[new-connections|always|off]", "COHERE_GATEWAY_UPSTREAM_POOL",
                   "--upstream-ca", "COHERE_GATEWAY_UPSTREAM_CA"):  # fmt: skip
        assert needle in text, needle
    refused = CliRunner().invoke(main, ["proxy", "--upstream-pool", "sometimes"])
    assert refused.exit_code == 2 and "--upstream-pool" in refused.output
    guide = (ROOT / "docs" / "gateway.md").read_text()
    assert "## Upstream connections" in guide and "`--upstream-pool`" in guide
    assert "cohere_gateway_upstream_connections_total" in guide


def relay_connections(port: int) -> int:
    """Connections to the relay established now (its own ends: local port `port`)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
            count += 1
    return count


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_a_kept_alive_client_connection_leaves_no_loopback_connection_open_under_new_connections(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str
) -> None:
    """Its first request comes from the pool; the relay's answer ends mitmproxy's connection to it (the
    rest go on mitmproxy's own upstream connection), so the client connection holds no loopback pair for
    its life. The client's own connection stays open: the relay's `Connection: close` is not passed on."""
    with (
        gateway(front, kafka_bootstrap, gateway_topic, "new-connections") as gw,
        httpx.Client(timeout=30) as client,
    ):
        for i in range(3):
            resp = chat(client, gw, f"leave-{i}")
            assert resp.status_code == 200
            assert "connection" not in resp.headers
        port = _relay_port(gw)
        wait_for(lambda: relay_connections(port) == 0, "mitmproxy closes its connection to the relay")
        assert chat(client, gw, "leave-last").status_code == 200
        counted = upstream_connections(gw)
    assert counted == {"mitmproxy": 1, "pool": 1}  # one client connection all along


def test_a_ticketless_request_is_refused_before_its_body_is_read(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str
) -> None:
    with gateway(front, kafka_bootstrap, gateway_topic, "always") as gw, fresh_connections() as client:
        assert chat(client, gw, "warm").status_code == 200
        port = _relay_port(gw)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # a head announcing a large body, and none of the body: the answer must not wait for it
            sock.sendall(b"POST /v2/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            answer = _read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"x-cohere-gateway-relay-answer: 1" in answer.lower()


def _read_to_end(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_the_relay_bounds_its_open_connections_and_a_head_and_its_refusal_is_the_gateways(
    front: TlsFront, kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    """--max-connections 1: the relay takes 2 connections; a third is answered 503 at once, and when it
    is the gateway's own request the event is the gateway's error, not the upstream's. A connection that
    shows no request head within --header-timeout-s is closed."""
    cid = "relay-full-" + uuid.uuid4().hex
    with (
        gateway(front, kafka_bootstrap, gateway_topic, "always", max_connections=1, header_timeout_s=5) as gw,
        fresh_connections() as client,
    ):
        assert chat(client, gw, "warm").status_code == 200
        port = _relay_port(gw)
        wait_for(lambda: relay_connections(port) == 0, "the warm request's relay connection closes")
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            wait_for(lambda: relay_connections(port) == 2, "the relay accepts both")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
                third.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                refused = _read_to_end(third)
            resp = chat(client, gw, cid)
            # silent connections are closed after the head timeout, and the relay serves again
            started = time.monotonic()
            assert [_read_to_end(sock) for sock in held] == [b"", b""]
            assert time.monotonic() - started < 15
        finally:
            for sock in held:
                sock.close()
        assert chat(client, gw, "after").status_code == 200
    assert refused.startswith(b"HTTP/1.1 503 ")
    assert resp.status_code == 503, resp.text
    assert "x-cohere-gateway-relay-answer" not in resp.headers
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.outcome, event.error_type, event.status_code) == ("gateway_error", "relay_refused", 503)


def test_a_non_stream_answers_upstream_ttfb_is_its_headers_not_its_last_byte_through_the_pool(
    kafka_bootstrap: str, gateway_topic: str, gateway_events: EventReader
) -> None:
    """The relay passes a non-stream answer on only once whole; the event's upstream_ttfb_ms is still the
    time to the upstream's response headers."""
    body_delay_s = 0.6
    cid = "pool-ttfb-" + uuid.uuid4().hex
    with slow_body_upstream(body_delay_s) as url:
        gw = start_gateway(url, kafka_bootstrap, gateway_topic, transparent=False, upstream_pool="always")
        try:
            with fresh_connections() as client:
                assert chat(client, gw, cid).status_code == 200
        finally:
            gw.stop()
    latency = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0].latency
    assert latency.total_ms >= body_delay_s * 1000
    assert latency.upstream_ttfb_ms is not None and latency.upstream_ttfb_ms < body_delay_s * 1000 / 2


@contextlib.contextmanager
def slow_body_upstream(delay_s: float) -> Iterator[str]:
    """An upstream that sends a chat answer's headers at once and its body `delay_s` later."""
    answer = b'{"id": "x", "finish_reason": "COMPLETE", "message": {"role": "assistant", "content": []}}'

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(delay_s)  # the upstream being slow, not the test waiting
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None: ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
