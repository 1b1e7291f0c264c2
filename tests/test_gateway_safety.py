"""Bad input, property-based: paths, headers and bodies sent as raw bytes to a real gateway.

Every response must be either a correct forward to the configured upstream (the emulator) or a clear JSON
error from the gateway; a canary server whose address the requests try to smuggle in must never be
contacted; and no secret a client sent may appear in Kafka or in the gateway's log.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.kafka import create_topic

SECRET = "sk-secret-" + uuid.uuid4().hex


class Canary:
    """A TCP listener that counts connections: the host requests try to reach instead of the upstream."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.sock.close()


@pytest.fixture(scope="module")
def topic(kafka_bootstrap: str) -> str:
    return create_topic(kafka_bootstrap, f"gw-safety-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def gw(emulator_url: str, kafka_bootstrap: str, topic: str) -> Iterator[GatewayProcess]:
    g = start_gateway(emulator_url, kafka_bootstrap, topic, transparent=False, log_payloads=True,
                      max_request_bytes=2048)  # fmt: skip
    yield g
    g.stop()


def raw_request(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def targets(canary_port: int) -> st.SearchStrategy[str]:
    evil = f"127.0.0.1:{canary_port}"
    pieces = st.sampled_from([
        "v1", "v2", "chat", "embed", "..", ".", "", "%2F", "%2e%2e", "%252F", "\\", "cohere", "compat",
        f"http:{evil}", f"@{evil}", evil, "v1?x=/..", "chat#frag", "~", "a b", "ä", ";", "compatibility",
    ])  # fmt: skip
    prefix = st.sampled_from(
        [
            "/v1/acc/gw/cohere/",
            "/v1/acc/gw/compat/",
            "/v1/acc/gw/",
            "/",
            f"http://{evil}/",
            f"//{evil}/",
            "/v1/acc/gw/cohere/v1/",
            f"http://user@{evil}/v1/acc/gw/cohere/",
        ]
    )
    valid = st.sampled_from(
        [
            "/v1/acc/gw/cohere/v1/chat",
            "/v1/acc/gw/cohere/v2/chat",
            "/v1/a.b/g-1/cohere/v1/embed",
            "/v1/acc/gw/compat/chat/completions",
            "/v1/acc/gw/cohere/v1/v1/tokenize",
        ]
    )
    weird = st.builds(lambda p, segs: p + "/".join(segs), prefix, st.lists(pieces, max_size=5))
    return st.one_of(valid, weird)  # fmt: skip


def requests(canary_port: int) -> st.SearchStrategy[bytes]:
    evil = f"127.0.0.1:{canary_port}"
    method = st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "CONNECT"])
    host = st.sampled_from(["localhost", evil, "api.cohere.ai", f"{evil}@localhost", "", "localhost:1"])
    extra = st.lists(st.sampled_from([
        ("X-Forwarded-Host", evil), ("Forwarded", f"host={evil}"), ("cf-aig-metadata", '{"a": 1}'),
        ("cf-aig-metadata", "{bad"), ("cf-aig-collect-log", "false"),
        ("cf-aig-custom-cost", '{"total_cost": 1}'),
        ("cf-aig-event-id", "x y"), ("X-Api-Key", SECRET), ("Cookie", f"session={SECRET}"),
        ("cf-aig-authorization", f"Bearer {SECRET}"), ("Content-Type", "application/json"),
    ]), max_size=4)  # fmt: skip
    body = st.one_of(
        st.just(b""),
        st.binary(max_size=64),
        st.just(b'{"message": "hi", "model": "command-r"}'),
        st.just(b'{"model": "openai/gpt-4", "messages": []}'),
        st.just(b'{"model": "cohere/command-r", "messages": [{"role": "user", "content": "x"}]}'),
        st.just(b'{"message": "' + b"x" * 3000 + b'"}'),
    )
    auth = st.sampled_from([f"Bearer {SECRET}", f"Token {SECRET}", SECRET])

    def build(m: str, t: str, h: str, ex: list[tuple[str, str]], b: bytes, a: str) -> bytes:
        lines = [f"{m} {t} HTTP/1.1", f"Host: {h}", f"Authorization: {a}", "Connection: close",
                 f"Content-Length: {len(b)}"] + [f"{k}: {v}" for k, v in ex]  # fmt: skip
        return "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + b

    return st.builds(build, method, targets(canary_port), host, extra, body, auth)


def refused_by_http_layer(data: bytes) -> bool:
    """Requests that are not valid HTTP/1.1 (request line, Host) or CONNECT on the reverse listener."""
    first = data.split(b"\r\n", 1)[0]
    return (
        data.startswith(b"CONNECT")
        or b"Host: \r\n" in data
        or len(first.split(b" ")) != 3
        or any(c > 127 for c in first)
        or (b"://" in first and b"@" in first)  # userinfo in an absolute-form target
    )


def test_bad_input_is_refused_or_forwarded_correctly(gw: GatewayProcess, canary: Canary,
                                                     emulator_requests: Any) -> None:  # fmt: skip
    seen = {"forwarded": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(requests(canary.port))
    def check(data: bytes) -> None:
        emulator_requests.clear()
        status, headers, body = raw_request(gw.url, data)
        forwarded = emulator_requests.all()
        seen["forwarded" if forwarded else "refused"] += 1
        if forwarded:
            assert len(forwarded) == 1
            path = forwarded[0]["path"]
            # `/cohere/{rest}` forwards any rest to the one upstream (the emulator recorded it, so it got
            # there); what must never pass is a path that could be read as another place.
            assert path.startswith("/") and ".." not in path and "//" not in path and "%" not in path
            assert not [h for h in forwarded[0]["headers"] if h.startswith("cf-aig-")]
            assert "cf-aig-log-id" in headers  # the upstream's answer, passed through
        else:
            if refused_by_http_layer(data):
                assert 400 <= status < 500  # refused by mitmproxy's HTTP layer before the addon sees it
            else:
                assert status in (400, 401, 403, 404, 405, 413), (status, body[:200])
            assert isinstance(json.loads(body)["message"], str)
        assert canary.hits == 0

    check()
    assert seen["forwarded"] and seen["refused"], seen  # the suite exercised both kinds


def test_no_secret_in_kafka_or_logs(gw: GatewayProcess, kafka_bootstrap: str, topic: str) -> None:
    for auth in (f"Bearer {SECRET}", f"Token {SECRET}"):
        data = (
            f"POST /v1/acc/gw/cohere/v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
            f"Cookie: s={SECRET}\r\nX-Api-Key: {SECRET}\r\ncf-aig-authorization: Bearer {SECRET}\r\n"
            f"cf-aig-event-id: final\r\nConnection: close\r\nContent-Length: 16\r\n\r\n"
            '{"message": "x"}'
        ).encode()
        assert raw_request(gw.url, data)[0] == 200
    reader = EventReader(kafka_bootstrap, topic)
    try:
        reader.wait_until(lambda e: e.client_event_id == "final", n=2)
        raw = list(reader.raw)
    finally:
        reader.close()
    assert len(raw) >= 2
    leaked = [v for k, v in raw if SECRET.encode() in v or SECRET.encode() in (k or b"")]
    assert not leaked, leaked[0][:300]
    assert SECRET not in gw.log_text()
