"""Bad input, property-based: paths, headers and bodies sent as raw bytes to a real gateway.

Every response must be either a correct forward to the configured upstream (the emulator) or a clear JSON
error from the gateway; a canary server whose address the requests try to smuggle in must never be
contacted; and no secret a client sent may appear in Kafka or in the gateway's log.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fixtures.capture_upstream import CaptureUpstream, parse_request
from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.kafka import create_topic, dead_bootstrap

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


# --- against a capturing upstream (every byte the gateway sends, unparsed), HTTP/1.1 and HTTP/2 -----------

TOKEN = "gwtok-" + uuid.uuid4().hex
PREFIX = "/pfx"
# Header lines the gateway itself writes upstream (everything else must be one the client sent as a header).
GATEWAY_SET = frozenset({b"host", b"content-length", b"accept-encoding"})


@pytest.fixture(scope="module")
def capture() -> Iterator[CaptureUpstream]:
    up = CaptureUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def cap_topic(kafka_bootstrap: str) -> str:
    return create_topic(kafka_bootstrap, f"gw-props-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def gw_cap(capture: CaptureUpstream, kafka_bootstrap: str, cap_topic: str) -> Iterator[GatewayProcess]:
    """HTTP/1.1 side: a token, payload logging on, events to the real Kafka."""
    g = start_gateway(capture.url + PREFIX, kafka_bootstrap, cap_topic, transparent=False,
                      gateway_token=TOKEN, log_payloads=True, max_request_bytes=4096)  # fmt: skip
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_cap_h2(capture: CaptureUpstream) -> Iterator[GatewayProcess]:
    """HTTP/2 side: offered h2, payload logging on, Kafka unreachable so every event lands in the spool."""
    g = start_gateway(capture.url + PREFIX, dead_bootstrap(), "t", transparent=False, gateway_token=TOKEN,
                      log_payloads=True, allow_http2=True, max_request_bytes=4096,
                      delivery_timeout_ms=200)  # fmt: skip
    yield g
    g.stop()


def check_forwarded(raw: bytes, sent: list[tuple[bytes, bytes]]) -> None:
    """One well-formed HTTP/1.1 request inside the prefix whose every header line the client sent as a
    header (or the gateway set), and no cf-aig-* header."""
    line, headers, _ = parse_request(raw)
    target = line.split(b" ")[1]
    assert target.startswith(PREFIX.encode() + b"/"), line
    assert b".." not in target and b"//" not in target and b"%" not in target, line
    # as the lines the client wrote parse: "X:Colon: v" is the header "X" with the value "Colon: v", and a
    # value "a\r\nInjected: 1" sent raw over HTTP/1.1 is two header lines of the client's, "X-Note: a" and
    # "Injected: 1" (over HTTP/2 the same value is one field, which must be refused)
    lines = [line for n, v in sent for line in re.split(rb"\r?\n", n + b": " + v)]
    client = {(n.lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines)}
    for name, value in headers:
        lname = name.lower()
        assert not lname.startswith(b"cf-aig-"), name
        assert lname in GATEWAY_SET or (lname, value) in client, (name, value)


def check_refused(status: Any, body: bytes) -> None:
    assert isinstance(status, int) and 400 <= status < 600, status
    assert isinstance(json.loads(body)["message"], str)


_TOKENISH = st.sampled_from([f"Bearer {TOKEN}", f"Bearer {TOKEN}", "Bearer nope", "", f"bearer {TOKEN} "])
_VALUES = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "x",
            SECRET,
            f"Bearer {SECRET}",
            "a\r\nInjected: 1",
            "a\nX: 1",
            "a\x00b",
            "a\rb",
            "  padded  ",
            "é",
            "gzip",
            "bz2",
            "identity",
        ]
    ),
    st.text(max_size=20),
)
_NAMES = st.sampled_from(["X-Note", "Content-Type", "Content-Encoding", "User-Agent", "X-Api-Key", "Cookie",
                          "Transfer-Encoding", "Upgrade", "Connection", "Expect", "cf-aig-metadata",
                          "cf-aig-custom-cost", "cf-aig-event-id", "Host", "Bad Name", "X:Colon",
                          "X\r\nInjected"])  # fmt: skip
_BODIES = st.one_of(
    st.just(b'{"model": "command-r", "message": "hi"}'),
    st.just(f'{{"model": "command-r", "message": "{SECRET} and Bearer {SECRET}"}}'.encode()),
    st.just(b'{"model": "\\ud800", "message": "x"}'),
    st.binary(max_size=64),
    st.just(b"x" * 5000),
)
_PATHS = st.sampled_from(["/v1/acc/gw/cohere/v1/chat", "/v1/acc/gw/cohere/v2/chat",
                          "/v1/acc/gw/compat/chat/completions",
                          "/v1/acc/gw/cohere/v1/../../x", "/v1/acc/gw/cohere/v1/chat\r\nX: 1", "/healthz",
                          "/v1/acc/gw/cohere/%2e%2e/x", "/v1/acc/gw/cohere/v1/chat?x=1", "//evil/v1",
                          "/v1/acc\n/gw/cohere/v1/chat"])  # fmt: skip


def encode_latin1(text: str) -> bytes:
    return text.encode("utf-8") if any(ord(c) > 255 for c in text) else text.encode("latin-1")


def test_http1_requests_reach_the_upstream_only_well_formed_or_get_a_json_error(
    gw_cap: GatewayProcess, capture: CaptureUpstream
) -> None:
    seen = {"forwarded": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["POST", "GET", "PUT", "TRACE", "CONNECT"]), _PATHS, _TOKENISH,
           st.lists(st.tuples(_NAMES, _VALUES), max_size=5), _BODIES)  # fmt: skip
    # CI once drew this: raw over HTTP/1.1 it is two header lines, both the client's, both forwarded
    @example("POST", "/v1/acc/gw/cohere/v1/chat", f"Bearer {TOKEN}", [("X-Note", "a\r\nInjected: 1")],
             b'{"model": "command-r", "message": "hi"}')  # fmt: skip
    def check(method: str, path: str, token: str, extra: list[tuple[str, str]], body: bytes) -> None:
        capture.clear()
        sent = [(b"Host", b"gw"), (b"Authorization", f"Bearer {SECRET}".encode()), (b"Connection", b"close"),
                (b"Content-Length", str(len(body)).encode())]  # fmt: skip
        if token:
            sent.append((b"cf-aig-authorization", token.encode()))
        sent += [(encode_latin1(n), encode_latin1(v)) for n, v in extra]
        data = f"{method} ".encode() + encode_latin1(path) + b" HTTP/1.1\r\n"
        data += b"".join(n + b": " + v + b"\r\n" for n, v in sent) + b"\r\n" + body
        status, headers, resp = raw_request(gw_cap.url, data)
        forwarded = capture.requests()
        if forwarded:
            seen["forwarded"] += 1
            assert len(forwarded) == 1 and status == 200 and "cf-aig-log-id" in headers
            check_forwarded(forwarded[0], sent)
        else:
            seen["refused"] += 1
            if path != "/healthz":
                check_refused(status, resp)

    check()
    assert seen["forwarded"] and seen["refused"], seen
    time.sleep(0.3)  # anything sent after a request on its connection (smuggled) is in by now
    for raw in capture.requests():
        parse_request(raw)  # still one framed request per connection: nothing was smuggled after it


def test_http2_requests_reach_the_upstream_only_well_formed_or_are_refused(
    gw_cap_h2: GatewayProcess, capture: CaptureUpstream
) -> None:
    from tests.test_security import h2_request

    seen = {"forwarded": 0, "refused": 0, "reset": 0}
    h2_names = st.one_of(_NAMES.map(str.lower), st.sampled_from([":path", ":method", ":authority", ":scheme",
                                                                 "te", ":protocol", "X-Upper"]))  # fmt: skip

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["POST", "GET", "TRACE", "CONNECT"]), _PATHS, _TOKENISH,
           st.lists(st.tuples(h2_names, _VALUES), max_size=4), _BODIES)  # fmt: skip
    def check(method: str, path: str, token: str, extra: list[tuple[str, str]], body: bytes) -> None:
        capture.clear()
        sent = [(b":method", method.encode()), (b":scheme", b"https"), (b":authority", b"gw.test"),
                (b":path", encode_latin1(path)), (b"authorization", f"Bearer {SECRET}".encode())]  # fmt: skip
        if token:
            sent.append((b"cf-aig-authorization", token.encode()))
        sent += [(encode_latin1(n), encode_latin1(v)) for n, v in extra]
        outcome, resp = h2_request(gw_cap_h2, sent, body)
        forwarded = capture.requests()
        if forwarded:
            seen["forwarded"] += 1
            assert len(forwarded) == 1 and outcome == 200
            check_forwarded(forwarded[0], [(n, v) for n, v in sent if not n.startswith(b":")])
        elif isinstance(outcome, int):
            seen["refused"] += 1
            if path != "/healthz":
                check_refused(outcome, resp)
        else:
            seen["reset"] += 1  # refused by the HTTP/2 layer itself (RFC 9113 malformed): RST_STREAM

    check()
    assert seen["forwarded"] and (seen["refused"] or seen["reset"]), seen
    time.sleep(0.3)
    for raw in capture.requests():
        parse_request(raw)  # still one framed request per connection: nothing was smuggled after it


def test_no_secret_in_events_logs_or_spool_after_the_property_runs(
    gw_cap: GatewayProcess, gw_cap_h2: GatewayProcess, kafka_bootstrap: str, cap_topic: str
) -> None:
    """Runs after the two above (same module): whatever they sent, no client secret was stored."""
    cid = "props-final-" + uuid.uuid4().hex
    data = (
        f"POST /v1/acc/gw/cohere/v1/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n"
        f"cf-aig-authorization: Bearer {TOKEN}\r\ncf-aig-event-id: {cid}\r\nConnection: close\r\n"
        f"Content-Length: 2\r\n\r\n{{}}"
    ).encode()
    assert raw_request(gw_cap.url, data)[0] == 200
    reader = EventReader(kafka_bootstrap, cap_topic)
    try:
        reader.wait_until(lambda e: e.client_event_id == cid)
        raw = list(reader.raw)
    finally:
        reader.close()
    assert raw
    for secret in (SECRET, TOKEN):
        assert not [v for _, v in raw if secret.encode() in v]
        for g in (gw_cap, gw_cap_h2):
            assert secret not in g.log_text()
    spooled = b"".join(p.read_bytes() for p in (gw_cap_h2.data_dir / "spool").rglob("*") if p.is_file())
    assert spooled, "the HTTP/2 gateway's events are in its spool"
    assert SECRET.encode() not in spooled and TOKEN.encode() not in spooled
