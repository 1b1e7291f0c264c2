"""What the security checks (issue 13) cost per request, for the overhead scenario's budget row.

The checks cannot be switched off in the gateway (that is the point of them), so a gateway without them
is not a target the overhead scenario could run. Instead every check the gateway runs on a request is
timed here, in this process, on the very request the overhead load sends, parsed by mitmproxy itself:
each check is the gateway's own function, called as the gateway calls it. The total is compared with
the gateway's CPU per request measured in the same run.

Per-connection limits (connection cap, idle timeout) run once per connection, not per request, and the
size bound of an event (`fit_event`) compares the length of bytes the gateway encodes anyway: neither
is counted here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mitmproxy.connection import Client
from mitmproxy.options import Options
from mitmproxy.proxy import events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import _http1

from bench.workload import MODEL
from cohere_gateway.addons import mitmproxy_seam
from cohere_gateway.addons.bodies import check_content_encoding, is_identity
from cohere_gateway.addons.capture import MAX_MODEL, MAX_PATH, MAX_USER_AGENT, clean
from cohere_gateway.addons.gateway import HotOptions, json_error_page
from cohere_gateway.addons.headers import check_gateway_token, check_request_head, check_singletons
from cohere_gateway.settings import ProxySettings

ITERATIONS = 20_000
ROUNDS = 9
TOKEN = "bench-gateway-token-0123456789abcdef"  # an authenticated gateway: the secure configuration


@dataclass(frozen=True)
class CheckCost:
    name: str
    us_per_request: float


def _us(fn: Callable[[], object], iterations: int) -> float:
    fn()  # warm
    start = time.process_time_ns()
    for _ in range(iterations):
        fn()
    return (time.process_time_ns() - start) / iterations / 1000


def _server(data: bytes) -> tuple[_http1.Http1Server, Client]:
    client = Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    return _http1.Http1Server(Context(client, Options())), client


def _read_head(
    read: Callable[..., object], server: _http1.Http1Server, client: Client, data: bytes
) -> Callable[[], list]:
    def once() -> list:
        server.buf = type(server.buf)()
        server.buf += data
        server.state = server.read_headers
        return list(read(server, events.DataReceived(client, data)))  # type: ignore[call-overload]

    return once


def _paired_difference_us(a: Callable[[], object], b: Callable[[], object], iterations: int) -> float:
    """Median over interleaved rounds of b - a: the two alternate, so drift of the machine hits both."""
    rounds = ROUNDS
    per = max(1, iterations // rounds)
    diffs = sorted(_us(b, per) - _us(a, per) for _ in range(rounds))
    return max(0.0, diffs[len(diffs) // 2])


def measure(request: bytes, iterations: int = ITERATIONS) -> list[CheckCost]:
    """`request`: the whole HTTP/1.1 request the load sends (head and body)."""
    hot = HotOptions.of(ProxySettings())  # what the gateway's hooks read, as copied in its configure()
    server, client = _server(request)
    plain = _http1.Http1Server.read_headers
    # The gateway's head bound wraps mitmproxy's reader for the whole process, as in the gateway.
    mitmproxy_seam.install_head_limit(
        lambda: hot.max_header_bytes, json_error_page, lambda: hot.header_timeout_s
    )
    bounded = _http1.Http1Server.read_headers
    receive = _read_head(bounded, server, client, request)
    head = next(cmd.event.request for cmd in receive() if hasattr(cmd, "event"))
    head_bound = _paired_difference_us(_read_head(plain, server, client, request), receive, iterations)

    data = head.data
    fields = head.headers.fields
    names = [k.decode("latin-1").lower() for k, _ in fields]
    presented = f"Bearer {TOKEN}"
    tokens = (TOKEN,)
    user_agent = head.headers.get("user-agent")
    path = head.path
    return [
        CheckCost("head bound (size, slowloris) around mitmproxy's reader", head_bound),
        CheckCost(
            "CR/LF/NUL, header count, upgrade",
            _us(
                lambda: check_request_head(data.method, data.path, data.authority, fields, hot.max_headers),
                iterations,
            ),
        ),
        CheckCost("singleton headers", _us(lambda: check_singletons(names), iterations)),
        CheckCost(
            "gateway token, constant time", _us(lambda: check_gateway_token(presented, tokens), iterations)
        ),
        CheckCost(
            "content-encoding allowed",
            _us(lambda: (check_content_encoding(None), is_identity(None)), iterations),
        ),
        CheckCost(
            "event strings bounded and sanitised",
            _us(
                lambda: (clean(MODEL, MAX_MODEL), clean(user_agent, MAX_USER_AGENT), clean(path, MAX_PATH)),
                iterations,
            ),
        ),
    ]
