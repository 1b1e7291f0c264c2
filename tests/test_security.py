"""Issue 13, finding by finding: each test is a reproduction of the attack, against a real gateway process
in front of a capturing upstream (tests/fixtures/capture_upstream.py: a raw socket server keeping every
byte) with a real Kafka broker, unless it says otherwise.

The property-based suite over the same parts is tests/test_gateway_safety.py.
"""

from __future__ import annotations

import bz2
import gzip
import json
import math
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from kafka import KafkaProducer

from cohere_gateway import events
from cohere_gateway.addons.delivery import DeliveryConfig, DurablePublisher
from cohere_gateway.addons.headers import RouteError, parse_custom_cost, parse_request_options
from cohere_gateway.addons.pricing import DEFAULT_PRICING, compute_cost, load_pricing
from cohere_gateway.addons.routing import check_id
from cohere_gateway.addons.spool import Spool
from cohere_gateway.events import Usage
from tests.fixtures.capture_upstream import CaptureUpstream, parse_request
from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.kafka import create_topic
from tests.test_delivery import config as delivery_config
from tests.test_delivery import read_topic, wait_for
from tests.test_events import make_event

TOKEN = "gwtok-" + uuid.uuid4().hex
API_KEY = "key" + uuid.uuid4().hex
PREFIX = "/prefix"
ROUTE = "/v1/acct/gw/cohere/v1/chat"
CHAT = b'{"model": "command-r", "message": "hi"}'


# --- parts ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[CaptureUpstream]:
    up = CaptureUpstream()
    yield up
    up.close()


@pytest.fixture(scope="module")
def topic(kafka_bootstrap: str) -> str:
    return create_topic(kafka_bootstrap, f"security-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def gw(upstream: CaptureUpstream, kafka_bootstrap: str, topic: str) -> Iterator[GatewayProcess]:
    """Token set, forward proxy on, 64 KiB body limit, payload logging off (the default)."""
    g = start_gateway(upstream.url + PREFIX, kafka_bootstrap, topic, gateway_token=TOKEN,
                      max_request_bytes=65_536)  # fmt: skip
    yield g
    g.stop()


@pytest.fixture(scope="module")
def gw_events(kafka_bootstrap: str, topic: str) -> Iterator[EventReader]:
    reader = EventReader(kafka_bootstrap, topic)
    yield reader
    reader.close()


@pytest.fixture()
def up(upstream: CaptureUpstream) -> CaptureUpstream:
    upstream.clear()
    return upstream


def raw_http(url: str, data: bytes, timeout: float = 10.0) -> tuple[int | None, dict[str, str], bytes]:
    """Send bytes, read until the gateway closes (or `timeout`); (status, headers, body), status None if
    the connection closed without an answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    raw = b"".join(chunks)
    if not raw:
        return None, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def post(gw: GatewayProcess, extra: bytes = b"", body: bytes = CHAT, path: str = ROUTE,
         token: bool = True) -> tuple[int | None, dict[str, str], bytes]:  # fmt: skip
    auth = b"cf-aig-authorization: Bearer " + TOKEN.encode() + b"\r\n" if token else b""
    data = (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nConnection: close\r\n" + auth + extra
        + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    return raw_http(gw.url, data)


def marker(gw: GatewayProcess, reader: EventReader) -> events.Event:
    """A good request after the ones under test: its event arriving means theirs (same key, same
    partition, published before it) would have arrived too."""
    cid = "marker-" + uuid.uuid4().hex
    status, _, _ = post(gw, f"cf-aig-event-id: {cid}\r\n".encode())
    assert status == 200
    return reader.wait_until(lambda e: e.client_event_id == cid)[0]


def json_error(status: int | None, headers: dict[str, str], body: bytes) -> str:
    assert status is not None and status >= 400, (status, body)
    assert headers.get("content-type") == "application/json", headers
    return json.loads(body)["message"]


def assert_well_formed_inside_prefix(up: CaptureUpstream) -> None:
    for raw in up.requests():
        line, headers, _ = parse_request(raw)
        assert line.split(b" ")[1].startswith(PREFIX.encode() + b"/"), line
        assert not [n for n, _ in headers if n.lower().startswith(b"cf-aig-")], headers


# --- 2: hooks fail closed ----------------------------------------------------------------------------


def test_a_non_utf8_gateway_token_is_refused_not_forwarded(gw: GatewayProcess, up: CaptureUpstream,
                                                          gw_events: EventReader) -> None:  # fmt: skip
    status, headers, body = post(gw, b"cf-aig-authorization: Bearer \xff\xfe\r\n", token=False)
    assert status == 401 and "cf-aig-authorization" in json_error(status, headers, body)
    marker(gw, gw_events)
    assert len(up.requests()) == 1  # the marker only
    assert "Addon error" not in gw.log_text()


def test_a_non_utf8_api_key_is_fingerprinted_and_forwarded_inside_the_prefix(
    gw: GatewayProcess, up: CaptureUpstream, gw_events: EventReader
) -> None:
    cid = "latin1-" + uuid.uuid4().hex
    data = (
        (
            f"POST {ROUTE} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"cf-aig-authorization: Bearer {TOKEN}\r\ncf-aig-event-id: {cid}\r\n"
        ).encode()
        + b"Authorization: Bearer k\xff\xfe\r\n"
        + f"Content-Length: {len(CHAT)}\r\n\r\n".encode()
        + CHAT
    )
    status, _, _ = raw_http(gw.url, data)
    assert status == 200
    event = gw_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.api_key_fingerprint == events.api_key_fingerprint(b"k\xff\xfe")
    assert_well_formed_inside_prefix(up)
    assert "Addon error" not in gw.log_text()


def test_an_unexpected_exception_in_any_hook_answers_json_500_and_is_recorded() -> None:
    """In-process, with mitmproxy's own test flows: a bug cannot be provoked from outside once fixed, so
    one is injected (the routing step made to raise); a publisher that keeps the events in a list stands
    in for Kafka here."""
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import taddons, tflow

    import cohere_gateway.addons.gateway as gateway_module

    class Kept:
        def __init__(self) -> None:
            self.values: list[bytes] = []

        def publish(self, key: bytes, value: bytes) -> None:
            self.values.append(value)

        def close(self, timeout: float) -> None: ...

        def counters(self) -> dict[str, int]:
            return {}

    gw = gateway_module.Gateway()
    with taddons.context(gw) as tctx:
        tctx.configure(gw, kafka_bootstrap="", upstream="http://127.0.0.1:9/prefix")
        kept = Kept()
        gw.publisher = kept
        for broken in ("check_singletons", "request_fields"):
            flow = tflow.tflow()
            flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
            flow.request.path = ROUTE
            flow.request.headers["cf-aig-metadata"] = '{"team": "x"}'
            flow.request.content = CHAT
            original = getattr(gateway_module, broken)

            def boom(*_: Any) -> Any:
                raise RuntimeError("injected")

            setattr(gateway_module, broken, boom)
            try:
                gw.requestheaders(flow)
                if flow.response is None:
                    gw.request(flow)
            finally:
                setattr(gateway_module, broken, original)
            assert flow.response is not None and flow.response.status_code == 500, broken
            assert "not forwarded" in json.loads(flow.response.content)["message"]
            assert flow.request.path == ROUTE or broken == "request_fields"
            gw.response(flow)  # mitmproxy then runs the response hook on the gateway's own answer
            event = events.decode(kept.values[-1])
            assert (event.status_code, event.outcome, event.error_type) == (
                500,
                "gateway_error",
                "gateway_internal_error",
            )
            assert event.metadata == {} and event.cost_source != "custom", "no claims of a failed request"
        # response side: the upstream answered, then the gateway's own step failed; the client gets the
        # 500, not a response the gateway did not finish handling
        for broken in ("is_stream_response", "extract_body"):
            flow = tflow.tflow()
            flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
            flow.request.path = ROUTE
            flow.request.content = CHAT
            gw.requestheaders(flow)
            gw.request(flow)
            assert flow.response is None
            flow.response = tflow.tresp(content=b'{"text": "upstream"}')
            original = getattr(gateway_module, broken)

            def boom2(*_: Any) -> Any:
                raise RuntimeError("injected")

            setattr(gateway_module, broken, boom2)
            try:
                gw.responseheaders(flow)
                gw.response(flow)
            finally:
                setattr(gateway_module, broken, original)
            assert flow.response.status_code == 500 and b"upstream" not in flow.response.content, broken
            event = events.decode(kept.values[-1])
            assert (event.status_code, event.error_type) == (500, "gateway_internal_error"), broken
        assert gw.metrics.hook_errors == {
            "requestheaders": 1,
            "request": 1,
            "responseheaders": 1,
            "response": 2,
        }


# --- 1: HTTP/2 header injection -----------------------------------------------------------------------


def tls_socket(gw: GatewayProcess, alpn: list[str]) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(gw.ca_cert))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(alpn)
    host, port = gw.url.removeprefix("http://").split(":")
    return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=10), server_hostname="gw.test")


def h2_request(
    gw: GatewayProcess, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[Any, bytes]:
    """One request over real HTTP/2, the client's header validation off (it would refuse what we send).
    Returns (status or the h2 event that ended the stream/connection, body)."""
    sock = tls_socket(gw, ["h2"])
    assert sock.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            header_encoding=None,
        )
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=not body)
    if body:
        conn.send_data(1, body, end_stream=True)
    sock.sendall(conn.data_to_send())
    status: Any = None
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return status, data
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    return status, data
                elif isinstance(ev, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return status or ev, data
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()


def h2_headers(**extra: bytes) -> list[tuple[bytes, bytes]]:
    base = [(b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"gw.test"),
            (b":path", ROUTE.encode()), (b"content-type", b"application/json"),
            (b"authorization", b"Bearer " + API_KEY.encode()),
            (b"cf-aig-authorization", b"Bearer " + TOKEN.encode())]  # fmt: skip
    overrides = {k.replace("_", "-").encode() if not k.startswith("p_") else b":" + k[2:].encode(): v
                 for k, v in extra.items()}  # fmt: skip
    return [(k, overrides.pop(k, v)) for k, v in base] + list(overrides.items())


def test_the_gateway_listener_offers_http1_only_unless_asked(gw: GatewayProcess) -> None:
    sock = tls_socket(gw, ["h2", "http/1.1"])
    try:
        assert sock.selected_alpn_protocol() in (None, "http/1.1")
    finally:
        sock.close()


@pytest.fixture(scope="module")
def gw_h2(upstream: CaptureUpstream, kafka_bootstrap: str, topic: str) -> Iterator[GatewayProcess]:
    g = start_gateway(upstream.url + PREFIX, kafka_bootstrap, topic, transparent=False, gateway_token=TOKEN,
                      allow_http2=True)  # fmt: skip
    yield g
    g.stop()


INJECTIONS = [
    {"x_note": b"a\r\nInjected: yes"},
    {"x_note": b"a\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x"},
    {"x_note": b"a\nInjected: yes"},
    {"x_note": b"a\x00b"},
    {"user_agent": b"ua\rInjected: yes"},
    {"p_path": ROUTE.encode() + b" HTTP/1.1\r\nInjected: yes\r\nX:"},
    {"p_method": b"POST /smuggled HTTP/1.1\r\nX:"},
    {"p_authority": b"gw.test\r\nInjected: yes"},
]


@pytest.mark.parametrize("extra", INJECTIONS, ids=lambda e: repr(next(iter(e.values())))[:40])
def test_cr_lf_nul_in_http2_headers_never_reach_the_upstream(gw_h2: GatewayProcess, up: CaptureUpstream,
                                                             extra: dict[str, bytes]) -> None:  # fmt: skip
    """Closed on today's platform already (h2 4.4 refuses these inbound, as RFC 9113 says); the gateway's
    own check (check_request_head) stands behind it. Either way: nothing injected reaches the upstream."""
    outcome, body = h2_request(gw_h2, h2_headers(**extra), CHAT)
    assert outcome != 200, body
    if isinstance(outcome, int):
        assert json.loads(body)["message"]
    time.sleep(0.3)  # nothing to wait for: the upstream must stay silent; give a forward time to show
    for raw in up.requests():
        assert b"Injected" not in raw and b"smuggled" not in raw
    assert_well_formed_inside_prefix(up)


def test_a_clean_http2_request_is_forwarded_as_one_well_formed_http1_request(
    gw_h2: GatewayProcess, up: CaptureUpstream
) -> None:
    status, body = h2_request(gw_h2, h2_headers(x_note=b"fine"), CHAT)
    assert status == 200 and json.loads(body)["text"] == "hi"
    (raw,) = up.wait_requests(1)
    assert_well_formed_inside_prefix(up)
    assert b"\r\nx-note: fine\r\n" in raw


def test_cr_lf_nul_are_refused_by_the_gateways_own_check_too() -> None:
    from cohere_gateway.addons.headers import check_request_head

    fields = [(b"content-type", b"application/json")]
    check_request_head(b"POST", b"/v1/a", b"", fields, 100)
    for bad in (b"a\rb", b"a\nb", b"a\x00b"):
        for args in ((bad, b"/p", b"", fields), (b"POST", bad, b"", fields), (b"POST", b"/p", bad, fields),
                     (b"POST", b"/p", b"", [(b"x", bad)]), (b"POST", b"/p", b"", [(bad, b"v")])):  # fmt: skip
            with pytest.raises(RouteError) as exc:
                check_request_head(*args, 100)
            assert exc.value.status == 400
    with pytest.raises(RouteError) as exc:
        check_request_head(b"GET", b"/p", b"", [(b"Upgrade", b"websocket")], 100)
    assert exc.value.status == 400


# --- 3: decompression bombs ---------------------------------------------------------------------------


def test_bz2_and_other_codecs_are_refused_415(gw: GatewayProcess, up: CaptureUpstream) -> None:
    bomb = bz2.compress(b"\0" * (64 << 20))
    assert len(bomb) < 1000
    for coding, body in (("bz2", bomb), ("x-foo", CHAT), ("zlib", zlib.compress(CHAT)), ("gzip, gzip", CHAT)):
        status, headers, resp = post(gw, f"Content-Encoding: {coding}\r\n".encode(), body)
        assert status == 415 and "Content-Encoding" in json_error(status, headers, resp)
    assert up.requests() == []


def test_a_gzip_bomb_is_refused_413_by_its_decoded_size(gw: GatewayProcess, up: CaptureUpstream) -> None:
    bomb = gzip.compress(b'{"model": "command-r", "message": "' + b"a" * (8 << 20) + b'"}')
    assert len(bomb) < 65_536  # under the limit compressed
    started = time.monotonic()
    status, headers, body = post(gw, b"Content-Encoding: gzip\r\n", bomb)
    assert status == 413 and "65536" in json_error(status, headers, body)
    assert time.monotonic() - started < 5
    assert up.requests() == []
    assert b'"ok"' in gw.get("/healthz")


def test_a_small_gzip_body_is_decoded_for_the_event_and_forwarded_as_sent(
    gw: GatewayProcess, up: CaptureUpstream, gw_events: EventReader
) -> None:
    cid = "gz-" + uuid.uuid4().hex
    status, _, _ = post(
        gw, f"Content-Encoding: gzip\r\ncf-aig-event-id: {cid}\r\n".encode(), gzip.compress(CHAT)
    )
    assert status == 200
    event = gw_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.model == "command-r" and event.cost_usd is not None
    (raw,) = up.wait_requests(1)
    assert gzip.decompress(parse_request(raw)[2]) == CHAT


def test_decode_body_is_bounded_incremental_and_strict() -> None:
    from cohere_gateway.addons import bodies

    limit = 1000
    assert bodies.decode_body(gzip.compress(b"x" * 1000), "gzip", limit) == b"x" * 1000
    assert bodies.decode_body(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", limit) == b"ab"
    assert bodies.decode_body(zlib.compress(b"y" * 10), "deflate", limit) == b"y" * 10
    for raw, coding, status in ((gzip.compress(b"x" * 1001), "gzip", 413),
                                (gzip.compress(b"x" * 600) * 2, "gzip", 413),
                                (gzip.compress(b"x" * 100)[:-5], "gzip", 400),
                                (b"not gzip", "gzip", 400),
                                (b"x" * 1001, "identity", 413),
                                (b"x", "br", 415)):  # fmt: skip
        with pytest.raises(RouteError) as exc:
            bodies.decode_body(raw, coding, limit)
        assert exc.value.status == status, (coding, raw[:20])


# --- 5: events survive any client bytes ---------------------------------------------------------------


def test_events_survive_non_utf8_headers_and_lone_surrogates(
    gw: GatewayProcess, gw_events: EventReader
) -> None:
    cid = "bytes-" + uuid.uuid4().hex
    body = b'{"model": "command-r", "message": "\\ud800 and \\udfff"}'
    status, _, _ = post(
        gw, b"User-Agent: ua\xff\x80\x01end\r\ncf-aig-event-id: " + cid.encode() + b"\r\n", body
    )
    assert status == 200
    event = gw_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.model == "command-r" and event.cost_usd is not None and event.cost_source == "pricing"
    assert (
        event.user_agent is not None and event.user_agent.startswith("ua") and "\x01" not in event.user_agent
    )


def test_request_derived_strings_are_bounded(gw: GatewayProcess, gw_events: EventReader) -> None:
    cid = "long-" + uuid.uuid4().hex
    body = json.dumps({"model": "m" * 60_000, "message": "x"}).encode()
    status, _, _ = post(
        gw, b"User-Agent: " + b"u" * 20_000 + b"\r\ncf-aig-event-id: " + cid.encode() + b"\r\n", body
    )
    assert status == 200
    event = gw_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert event.model is not None and len(event.model) == 256
    assert event.user_agent is not None and len(event.user_agent) <= 256


def test_clean_and_fit_event() -> None:
    from cohere_gateway.addons.capture import clean, fit_event

    assert clean("a\x00b\x1b[31m\ud800", 100) == "a\ufffdb\ufffd[31m\ufffd"
    assert clean("x" * 10, 5) == "xxxx…"
    event = make_event(request_body="b" * 400_000, response_body="r" * 400_000)
    value = fit_event(event, limit=100_000)
    assert value is not None and len(value) < 100_000
    decoded = events.decode(value)
    assert decoded.request_body is None and decoded.response_body is None


def test_no_response_body_in_an_error_message_with_payload_logging_off(
    gw: GatewayProcess, up: CaptureUpstream, gw_events: EventReader
) -> None:
    cid = "xfoo-" + uuid.uuid4().hex
    status, _, _ = post(gw, f"Content-Encoding: x-foo\r\ncf-aig-event-id: {cid}\r\n".encode())
    assert status == 415
    ev = marker(gw, gw_events)
    mine = [e for e in gw_events.all() if e.status_code == 415 and e.start_time <= ev.start_time]
    assert mine and all("Content-Encoding" in (e.error_message or "") for e in mine)
    assert all(e.response_body is None and e.request_body is None for e in gw_events.all())
    assert len(up.requests()) == 1  # the marker


# --- 6: one oversize event must not stop delivery --------------------------------------------------------


def test_a_record_kafka_refuses_is_set_aside_and_delivery_moves_on(kafka_bootstrap: str, kafka_topic: str,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """Live and replayed from the spool (as after a restart): the refused record goes to the dead-letter
    file, counted, and the events behind it are delivered."""
    spool_dir = tmp_path / "spool"
    huge = make_event(model="m" * (2 << 20))
    small = [make_event(metadata={"n": str(i)}) for i in range(3)]
    pub = DurablePublisher(delivery_config(kafka_bootstrap, kafka_topic, spool_dir))
    pub.publish(b"a/g", events.encode(small[0]))
    pub.publish(b"a/g", events.encode(huge))
    pub.publish(b"a/g", events.encode(small[1]))
    wait_for(lambda: pub.counters()["events_delivered"] == 2, 20, "the events behind the refused one")
    pub.close(5.0)
    # a spool holding a refused record, as a gateway restarted behind one would find it
    spool = Spool(spool_dir, max_bytes=1 << 30)
    spool.append(b"a/g", events.encode(huge))
    spool.append(b"a/g", events.encode(small[2]))
    spool.close()
    pub = DurablePublisher(delivery_config(kafka_bootstrap, kafka_topic, spool_dir))
    wait_for(lambda: pub.counters()["events_delivered"] == 1, 20, "the spooled event behind the refused one")
    counts = pub.counters()
    pub.close(5.0)
    assert counts["events_dead_lettered"] == 1 and counts["events_dropped"] == 0
    assert sorted(e["event_id"] for _, e in read_topic(kafka_bootstrap, kafka_topic)) == sorted(
        e.event_id for e in small
    )
    dead_file = spool_dir / "dead-letters.jsonl"
    dead = dead_file.read_text().splitlines()
    assert len(dead) == 2 and all("MessageSizeTooLarge" in json.loads(line)["error"] for line in dead)
    assert stat.S_IMODE(dead_file.stat().st_mode) == 0o600


def test_the_event_bound_is_below_what_the_producer_and_broker_take(kafka_bootstrap: str,
                                                                   kafka_topic: str) -> None:  # fmt: skip
    """The largest event the gateway builds (events.MAX_EVENT_BYTES) with the longest key is accepted."""
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, max_request_size=events.KAFKA_MAX_MESSAGE_BYTES
    )
    try:
        producer.send(kafka_topic, key=b"k" * 129, value=b"v" * events.MAX_EVENT_BYTES).get(timeout=20)
    finally:
        producer.close()
    assert events.KAFKA_MAX_MESSAGE_BYTES == 1 << 20
    assert DeliveryConfig(bootstrap="", topic="t", spool_dir=Path("x")).dead_letter_max_bytes > 0


# --- 7: no unauthenticated cost or metadata -------------------------------------------------------------


def test_an_unauthenticated_request_leaves_no_event(gw: GatewayProcess, up: CaptureUpstream,
                                                    gw_events: EventReader) -> None:  # fmt: skip
    cid = "unauth-" + uuid.uuid4().hex
    extra = (f"cf-aig-event-id: {cid}\r\ncf-aig-metadata: {{\"team\": \"x\"}}\r\n"
             'cf-aig-custom-cost: {"total_cost": 1e308}\r\n').encode()  # fmt: skip
    status, headers, body = post(gw, extra, token=False)
    assert status == 401 and json_error(status, headers, body)
    marker(gw, gw_events)
    assert not [e for e in gw_events.all() if e.client_event_id == cid or e.metadata]
    assert len(up.requests()) == 1
    assert 'cohere_gateway_rejected_total{status="401"}' in local(gw, "/metrics", TOKEN)[1].decode()


def local(gw: GatewayProcess, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = {"cf-aig-authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(gw.url + path, headers=headers), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_with_a_token_metrics_and_health_details_need_it(gw: GatewayProcess) -> None:
    assert local(gw, "/metrics")[0] == 401
    status, body = local(gw, "/healthz")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, body = local(gw, "/healthz", TOKEN)
    assert status == 200 and "publisher" in json.loads(body)


def test_custom_cost_is_finite_bounded_and_for_2xx_only(gw: GatewayProcess, gw_events: EventReader) -> None:
    for value in ("1e308", "1e400", "1001", "NaN"):
        status, headers, body = post(gw, f'cf-aig-custom-cost: {{"total_cost": {value}}}\r\n'.encode())
        assert status == 400 and "cf-aig-custom-cost" in json_error(status, headers, body), value
    ids = {}
    for name, extra in (("ok", ""), ("err", "x-test-status: 429\r\n"),
                        ("nousage", "x-test-body: empty\r\n")):  # fmt: skip
        ids[name] = cid = f"cost-{name}-" + uuid.uuid4().hex
        cost = '{"total_cost": 2.5}' if name != "nousage" else '{"per_token_in": 0.1, "per_token_out": 0.2}'
        post(gw, f"cf-aig-custom-cost: {cost}\r\ncf-aig-event-id: {cid}\r\n{extra}".encode())
    got = {n: gw_events.wait_until(lambda e, c=c: e.client_event_id == c)[0] for n, c in ids.items()}
    assert (got["ok"].cost_usd, got["ok"].cost_source) == (2.5, "custom")
    assert got["err"].status_code == 429 and got["err"].cost_source != "custom"
    assert got["nousage"].cost_usd is None, "per-token prices times no reported usage are unknown, not 0"


def test_custom_cost_parsing_and_per_token_prices_without_usage() -> None:
    with pytest.raises(RouteError):
        parse_custom_cost('{"total_cost": 5}', max_cost=1.0)
    assert parse_custom_cost('{"total_cost": 1}', max_cost=1.0).total_cost == 1
    opts = parse_request_options([(b"cf-aig-custom-cost", b'{"per_token_in": 1e-6}')], max_custom_cost=1.0)
    pricing = load_pricing(DEFAULT_PRICING)
    assert compute_cost(pricing, "chat", "x", Usage(), opts.custom_cost) == (None, "custom")
    assert compute_cost(pricing, "chat", "x", Usage(input_tokens=10), opts.custom_cost)[0] == pytest.approx(
        1e-5
    )
    assert math.isinf(float("1e400")) and parse_request_options(
        [(b"cf-aig-metadata", '{"é": 1}'.encode())]
    ).metadata == {"é": "1"}


# --- 4: bounds before authentication -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gw_small(upstream: CaptureUpstream) -> Iterator[GatewayProcess]:
    g = start_gateway(upstream.url + PREFIX, "", "t", transparent=False, max_connections=4,
                      idle_timeout_s=1, max_header_bytes=8192, max_headers=20,
                      header_timeout_s=1)  # fmt: skip
    yield g
    g.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_endless_header_line_gets_431_and_costs_no_memory(gw_small: GatewayProcess) -> None:
    host, port = gw_small.url.removeprefix("http://").split(":")
    before = rss_bytes(gw_small.proc.pid)
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\nX-Long: ")
        got = b""
        try:
            for _ in range(1000):  # up to 64 MiB, never ending the line
                sock.sendall(b"a" * 65_536)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the gateway stopped reading: what is not read costs it nothing
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert got.startswith(b"HTTP/1.1 431"), got[:200]
    assert b"8192" in got
    assert rss_bytes(gw_small.proc.pid) - before < 20 << 20


def test_a_trickled_request_head_gets_408(gw_small: GatewayProcess) -> None:
    """Slowloris: a byte every 0.2 s keeps the idle timeout (1 s here) from ever firing."""
    host, port = gw_small.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST " + ROUTE.encode() + b" HTTP/1.1\r\n")
        got = b""
        started = time.monotonic()
        try:
            for byte in b"X-Slow: " + b"a" * 40:
                time.sleep(0.2)  # the attack is the pace itself
                sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert time.monotonic() - started < 6


def test_too_many_headers_get_431(gw_small: GatewayProcess) -> None:
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    status, headers, body = post(gw_small, extra)
    assert status == 431 and json_error(status, headers, body)


def test_connections_are_capped_and_idle_ones_closed(gw_small: GatewayProcess) -> None:
    host, port = gw_small.url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(4)]
    try:
        time.sleep(0.2)  # let the gateway count them (nothing to await from outside)
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            try:
                extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = extra.recv(100)
            except ConnectionResetError:
                answer = b""
            assert answer == b"", "the fifth connection is closed at once"
        # idle_timeout_s=1: the idle ones are closed by the gateway, well before mitmproxy's 600 s
        started = time.monotonic()
        for sock in idle:
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 4
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while b'"ok"' not in gw_small.get("/healthz"):  # room again once they are gone
        assert time.monotonic() < deadline
        time.sleep(0.05)


# --- 9: smaller ones -----------------------------------------------------------------------------------


def test_non_http_bytes_in_a_connect_tunnel_are_refused(gw: GatewayProcess) -> None:
    assert gw.proxy_url is not None
    host, port = gw.proxy_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"CONNECT api.cohere.ai:443 HTTP/1.1\r\nHost: api.cohere.ai:443\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.sendall(b"\x00\x01\x02 raw bytes for the real host\r\n\r\n")
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    assert got.startswith(b"HTTP/1.1 400"), got[:200]
    assert b"application/json" in got


def test_spool_and_its_files_are_owner_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    spool.append(b"k", b"v" * 10)
    spool.flush()
    spool.commit(spool.start, persist=True)
    spool.close()
    assert stat.S_IMODE((tmp_path / "spool").stat().st_mode) == 0o700
    files = list((tmp_path / "spool").iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files


def test_routing_patterns_match_whole_values() -> None:
    for value in ("acct\n", "acct\r\n"):
        with pytest.raises(RouteError):
            check_id("account_id", value)
    with pytest.raises(RouteError):
        parse_request_options([("cf-aig-event-id", "id\n")])


# --- 8: the read side ----------------------------------------------------------------------------------


def read_api_get(url: str, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_read_api_beyond_loopback_needs_a_token_and_checks_the_host() -> None:
    """The consumer's real HTTP server; no storage behind it (the refusals come first, and the one
    authorised request asks for a dashboard file), so no backend is opened."""
    import base64

    from cohere_gateway.consumers.http_api import ReadApi, allowed_host_set
    from cohere_gateway.consumers.metrics import Metrics

    with pytest.raises(ValueError, match="api-token"):
        ReadApi(None, Metrics(), "0.0.0.0", 0)  # type: ignore[arg-type]
    api = ReadApi(None, Metrics(), "0.0.0.0", 0, token="rt", allowed_hosts=allowed_host_set("", "0.0.0.0"))  # type: ignore[arg-type]
    api.start()
    try:
        port = api.url.rsplit(":", 1)[1]
        local_url = f"http://127.0.0.1:{port}"
        assert read_api_get(local_url, "/healthz")[0] == 200  # health checks need no token
        status, headers, _ = read_api_get(local_url, "/api/summary")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        assert read_api_get(local_url, "/metrics")[0] == 401
        assert read_api_get(local_url, "/api/summary", Authorization="Bearer wrong")[0] == 401
        basic = "Basic " + base64.b64encode(b"anyone:rt").decode()
        assert read_api_get(local_url, "/static/none.js", Authorization=basic)[0] == 404  # past the guard
        assert read_api_get(local_url, "/static/none.js", Authorization="Bearer rt")[0] == 404
        # DNS rebinding: a page on evil.example resolving to this address sends its own Host
        status, _, body = read_api_get(
            local_url, "/static/none.js", Host="evil.example", Authorization="Bearer rt"
        )
        assert status == 421 and b"allowed-hosts" in body
    finally:
        api.stop()


def test_report_and_api_survive_hostile_names_null_costs_and_huge_windows(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cohere_gateway.consumers import queries, report

    row = {"key": "[/x]", "requests": 1, "errors": 0, "error_rate": 0.0, "input_tokens": 1,
           "output_tokens": 1, "cost_usd": None}  # fmt: skip
    report.render({"since": "2026-01-01T00:00:00", "until": "2026-01-01T01:00:00", "by": "model",
                   "groups": [row], "total": {**row, "key": "TOTAL"}})  # fmt: skip
    out = capsys.readouterr().out
    assert "[/x]" in out and "unknown" in out
    for bad in ("99999999999d", "1e9w", "100000000w"):
        with pytest.raises(queries.QueryError):
            queries.parse_duration(bad)
    assert queries.parse_duration("3650d").days == 3650


def test_logged_payloads_have_credentials_redacted(upstream: CaptureUpstream, kafka_bootstrap: str) -> None:
    topic = create_topic(kafka_bootstrap, f"redact-{uuid.uuid4().hex[:8]}")
    g = start_gateway(upstream.url + PREFIX, kafka_bootstrap, topic, transparent=False, gateway_token=TOKEN,
                      log_payloads=True)  # fmt: skip
    reader = EventReader(kafka_bootstrap, topic)
    try:
        cohere_key = "A" * 20 + "b1" * 10
        message = f"my key is {cohere_key}, {API_KEY}, {TOKEN}"
        tool = {"api_key": "hunter2", "auth": "Bearer sk-live-0123456789"}
        body = json.dumps({"model": "command-r", "message": message, "tool": tool}).encode()
        cid = "redact-" + uuid.uuid4().hex
        status, _, _ = post(g, f"cf-aig-event-id: {cid}\r\n".encode(), body)
        assert status == 200
        event = reader.wait_until(lambda e: e.client_event_id == cid)[0]
        assert event.request_body is not None and "[REDACTED]" in event.request_body
        for secret in (cohere_key, API_KEY, TOKEN, "hunter2", "sk-live-0123456789"):
            assert secret not in event.request_body, secret
        assert event.response_body is not None and "hi" in event.response_body
    finally:
        reader.close()
        g.stop()


def test_a_credential_a_client_repeats_in_its_user_agent_or_metadata_is_not_stored(
    upstream: CaptureUpstream, kafka_bootstrap: str
) -> None:
    """Payload logging off: the strings an event always takes from the request are redacted of the request's
    own credentials too (found by the property suite: a User-Agent carrying the API key)."""
    topic = create_topic(kafka_bootstrap, f"redact-ua-{uuid.uuid4().hex[:8]}")
    g = start_gateway(upstream.url + PREFIX, kafka_bootstrap, topic, transparent=False, gateway_token=TOKEN)
    reader = EventReader(kafka_bootstrap, topic)
    try:
        cid = "redact-ua-" + uuid.uuid4().hex
        extra = (
            f"cf-aig-event-id: {cid}\r\nUser-Agent: app/1.0 (key {API_KEY}; gw {TOKEN})\r\n"
            f'cf-aig-metadata: {{"note": "{API_KEY}", "{TOKEN}": "x"}}\r\n'
        ).encode()
        status, _, _ = post(g, extra)
        assert status == 200
        event = reader.wait_until(lambda e: e.client_event_id == cid)[0]
        assert event.user_agent is not None and event.user_agent.startswith("app/1.0 (key ")
        (stored,) = [v for _, v in reader.raw if cid.encode() in v]  # the event's bytes, as in Kafka
        for secret in (API_KEY, TOKEN):
            assert secret.encode() not in stored, secret
        assert "[REDACTED]" in event.user_agent and "[REDACTED]" in event.metadata["note"]
    finally:
        reader.close()
        g.stop()


def test_compose_has_no_default_passwords_and_keeps_the_read_side_local() -> None:
    """Without Docker: the compose file's own text (tests/test_deploy.py starts it when Docker is there)."""
    import re
    import xml.etree.ElementTree as ET

    import yaml

    root = Path(__file__).resolve().parent.parent
    text = (root / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{[A-Z_]*(PASSWORD|TOKEN)[A-Z_]*:-", text), "a secret with a default value"
    assert "admin / admin" not in text
    compose = yaml.safe_load(text)
    for service in ("consumer", "grafana"):
        (port,) = compose["services"][service]["ports"]
        assert port.startswith("${PUBLISH_HOST:-127.0.0.1}:"), port
    consumer = compose["services"]["consumer"]
    assert any(flag.startswith("--read-clickhouse=http://reader:") for flag in consumer["command"])
    assert "COHERE_GATEWAY_API_TOKEN" in consumer["environment"]
    datasource = yaml.safe_load((root / "infra/grafana/provisioning/datasources/clickhouse.yaml").read_text())
    assert datasource["datasources"][0]["jsonData"]["username"] == "reader"
    reader = ET.parse(root / "infra/clickhouse/users.d/reader.xml").getroot()
    assert reader.find("profiles/reader/readonly").text == "2"  # type: ignore[union-attr]
    grants = [q.text for q in reader.findall("users/reader/grants/query")]
    assert grants == ["GRANT SELECT ON cohere_gateway.*"]
    assert reader.find("users/reader/password").get("from_env") == "CLICKHOUSE_READER_PASSWORD"  # type: ignore[union-attr]


def test_only_record_level_refusals_set_a_record_aside() -> None:
    """A producer aborted under its sends fails them with IllegalStateError (non-retriable, but about
    the producer, not the record): those events must be spooled and replayed, never dead-lettered."""
    from kafka import errors

    from cohere_gateway.addons.delivery import is_permanent

    assert is_permanent(errors.MessageSizeTooLargeError("x")) and is_permanent(errors.InvalidRecordError())
    closed = errors.IllegalStateError("Producer is closed forcefully.")
    others = (errors.KafkaTimeoutError(), errors.KafkaConnectionError(), errors.NotLeaderForPartitionError())
    for exc in (closed, *others, RuntimeError()):
        assert not is_permanent(exc), exc
