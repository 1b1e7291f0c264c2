"""The upstream call made by the gateway itself, for requests with a timeout or retries, and for those
the upstream pool serves (`upstream_pool`).

mitmproxy has no per-request read timeout and no way to send a request twice, and a response an addon
sets is sent whole (it cannot stream). mitmproxy also ties each upstream connection to one client
connection, so a client that opens a connection per request makes it open a new TCP+TLS connection to the
upstream per request. So such a request is sent by mitmproxy to this relay, a plain HTTP/1.1 server on a
loopback port of the same process and event loop, which makes the attempts with one httpx client shared
by every client connection (its pool keeps warm keep-alive connections to the upstream) and answers
mitmproxy like an upstream would: a stream is passed on chunk by chunk as it arrives, so everything
mitmproxy and the gateway's hooks do with a response (streaming tap, usage, cache, events) stays as it
is. Other requests never come here.

The pool is bounded: at most POOL_MAX_IDLE idle connections are kept, each for POOL_IDLE_EXPIRY_S; it
speaks HTTP/1.1 (a request per connection at a time) and each request comes on a relay connection, so
the connections in use at once are bounded by the relay's (`RelayLimits.max_open`, its httpx limit
too). It never takes a proxy from the environment (HTTP(S)_PROXY), and checks the upstream's
certificate against certifi's bundle or the `upstream_ca` file, never SSL_CERT_FILE.

Per attempt: the request timeout runs until the response's headers (Cloudflare: "the first part of the
response"); a 429/5xx, a connection failure, a timeout, or a non-stream body cut short is retried after
the backoff (or the upstream's `retry-after` when longer, up to MAX_RETRY_AFTER_S) as long as attempts
remain, because nothing has reached the client yet. A stream is committed at its headers: once they are
passed on it is never retried, and a stream the upstream cuts is cut for the client too. When every
attempt failed without an answer the relay answers itself: 504 after a timeout, 502 otherwise, JSON
`{"message"}` like every error of the gateway.

Only the gateway may use the relay: each request carries a one-time ticket id (RELAY_HEADER, 144 random
bits) that the gateway registered for it; anything else gets 403 as soon as its head is read, before any
body. The ticket records each attempt's status for the event. Any local process can connect to the
loopback port, so the listener has the gateway's own bounds (`RelayLimits`): the body of
`max_request_bytes`, a head timeout, an idle timeout and a cap on open connections. Every answer the
relay makes itself carries RELAY_ANSWER_HEADER, so the gateway records it as its own, not the upstream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import certifi
import h11
import httpx
import orjson

from cohere_gateway import settings
from cohere_gateway.addons.retries import RetryPolicy, next_delay_s, retry_after_s, retryable
from cohere_gateway.addons.routing import Upstream
from cohere_gateway.addons.streaming import is_stream_response

log = logging.getLogger("cohere_gateway.relay")

RELAY_HEADER = "x-cohere-gateway-relay"
_RELAY_HEADER = RELAY_HEADER.encode()
# On every answer the relay makes itself (refusals, 502/504 when no attempt was answered); the gateway
# strips it. An upstream's own copy is dropped on the way, so only the relay can set it.
RELAY_ANSWER_HEADER = "x-cohere-gateway-relay-answer"
_RELAY_ANSWER_HEADER = RELAY_ANSWER_HEADER.encode()
# Hop-by-hop headers (RFC 9110 7.6.1) and the framing each side sets itself.
_HOP = frozenset(
    b"connection keep-alive proxy-connection transfer-encoding te trailer upgrade content-length".split()
)
_DROPPED = _HOP | {_RELAY_HEADER, _RELAY_ANSWER_HEADER}
MAX_HEAD_BYTES = 1 << 20  # mitmproxy already bounded the client's head (max_header_bytes)
READ_CHUNK = 65536
POOL_MAX_IDLE = 256  # idle upstream connections kept for reuse; one going idle beyond it is closed
# Below the 60 s after which common HTTP load balancers (AWS ALB's default) drop an idle connection: the
# pool lets go first, rather than send a request on a connection the far end is closing.
POOL_IDLE_EXPIRY_S = 50.0
# The gateway may grow a body it checked against max_request_bytes (stream_options, a re-serialised
# model name): room for that, not for a second body.
BODY_SLACK_BYTES = 65536
# Relay connections per client connection the gateway accepts: mitmproxy opens one per client connection,
# and one per concurrent stream of an HTTP/2 client connection (it never reuses an HTTP/1.1 upstream
# connection for HTTP/2 streams). Twice leaves room for those; beyond it the relay refuses.
OPEN_PER_CLIENT_CONNECTION = 2
# mitmproxy closes an idle client connection (and its relay connection) after `idle_timeout_s`; the relay
# waits a little longer, so it is never the one closing a connection mitmproxy is about to send on.
IDLE_MARGIN_S = 10.0
# How long a refused connection's remaining input is read and dropped before it is closed: closing with
# unread input makes the kernel reset the connection, which can discard the answer before it is read.
LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class RelayLimits:
    """The gateway's bounds on its own listener, applied to the relay's loopback listener too."""

    max_body_bytes: int  # a request body over it is answered 413
    max_open: int  # connections open at once; further ones are answered 503
    head_timeout_s: float  # a connection that never showed a ticket: its first head, from accept
    idle_timeout_s: float  # the gateway's kept-alive connection: between its requests, and a body

    @classmethod
    def of(cls, opts: Any) -> RelayLimits:
        """From the gateway's options (or a `settings.ProxySettings`)."""
        return cls(
            max_body_bytes=opts.max_request_bytes + BODY_SLACK_BYTES,
            max_open=max(1, opts.max_connections) * OPEN_PER_CLIENT_CONNECTION,
            head_timeout_s=opts.header_timeout_s,
            idle_timeout_s=math.ceil(opts.idle_timeout_s) + IDLE_MARGIN_S,
        )


@dataclass(slots=True)
class Attempt:
    status: int  # the upstream's status; 0: no answer (see `error`)
    error: str | None = None  # "timeout", "connection_failed", "upstream_disconnected"


@dataclass(slots=True)
class Ticket:
    upstream: Upstream
    policy: RetryPolicy
    stream: bool  # the request asked for a stream
    attempts: list[Attempt] = field(default_factory=list)
    # Set when the relay answered itself because no attempt got an answer: the last attempt's error.
    failure: str | None = None
    used: bool = False
    # The answer says `Connection: close`, so mitmproxy's connection to the relay ends with it: a request
    # the pool serves only because it is its client connection's first (`new-connections`), whose later
    # requests go upstream on mitmproxy's own connection and would leave this one open unused.
    close: bool = False
    # When the answered attempt's response headers arrived from the upstream: a non-stream answer is
    # passed on only once whole, so mitmproxy's own time of its first byte is the upstream's last.
    response_start: float | None = None
    # The relay answered with a refusal of its own (RELAY_ANSWER_HEADER without `failure`): set by the
    # gateway, which records it as its own error.
    refused: bool = False


def upstream_tls(ca_file: str = "") -> ssl.SSLContext:
    """How the upstream's certificate is checked: against `ca_file`, else certifi's bundle (never the
    environment's SSL_CERT_FILE). Raises OSError / ssl.SSLError for a file that is not a PEM bundle."""
    return ssl.create_default_context(cafile=ca_file or certifi.where())


class RelayStartError(RuntimeError):
    """The relay could not start listening: the request must not go upstream without it."""


class Relay:
    def __init__(self, on_connect: Callable[[], None] | None = None) -> None:
        """`on_connect` is called for every new connection the pool opens to the upstream."""
        self._tickets: dict[str, Ticket] = {}
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._starting: asyncio.Task[None] | None = None
        self._verify = upstream_tls()
        self._on_connect = on_connect
        self._extensions: dict[str, Any] = {"trace": self._trace} if on_connect is not None else {}
        self._closing: set[asyncio.Task[None]] = set()
        # Attempts under way on each client, and the clients replaced by `configure` still in use: one is
        # closed when its last attempt ends, not while a stream it carries is being passed on.
        self._in_use: dict[httpx.AsyncClient, int] = {}
        self._retired: set[httpx.AsyncClient] = set()
        self._open = 0  # connections to the relay open now
        self.limits = RelayLimits.of(settings.ProxySettings())
        self.port = 0

    def configure(self, ca_file: str) -> None:
        """Check the upstream's certificate against `ca_file` (empty: certifi's bundle) from now on."""
        self._verify = upstream_tls(ca_file)
        if self._client is not None:
            # Its idle connections were verified against the old CAs: no new attempt may use them.
            old, self._client = self._client, self._new_client()
            if self._in_use.get(old):
                self._retired.add(old)
            else:
                self._close_later(old)

    def _close_later(self, client: httpx.AsyncClient) -> None:
        task = asyncio.get_running_loop().create_task(client.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _acquire(self) -> httpx.AsyncClient:
        client = self._client
        assert client is not None
        self._in_use[client] = self._in_use.get(client, 0) + 1
        return client

    def _release(self, client: httpx.AsyncClient) -> None:
        left = self._in_use[client] - 1
        if left:
            self._in_use[client] = left
            return
        del self._in_use[client]
        if client in self._retired:
            self._retired.discard(client)
            self._close_later(client)

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Raises RelayStartError when it cannot listen; the next call tries again."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start())
        task = self._starting
        try:
            await asyncio.shield(task)
        except Exception as exc:
            if self._starting is task:
                self._starting = None  # kept, every later request would get the same failure
            raise RelayStartError(f"the upstream relay could not start: {exc!r}") from exc

    def _new_client(self) -> httpx.AsyncClient:
        # No timeouts of httpx's own: the policy's timeout covers connect + headers, and after the headers
        # a stream runs as long as it runs. trust_env off: HTTP(S)_PROXY of the gateway's environment
        # must not reroute its upstream, nor SSL_CERT_FILE change whom it trusts.
        # HTTP/1.1 (httpx's default): one request per connection at a time, and each comes from a relay
        # connection, so the connections in use are bounded by the relay's (`max_open`).
        return httpx.AsyncClient(
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(
                max_connections=self.limits.max_open,
                max_keepalive_connections=POOL_MAX_IDLE,
                keepalive_expiry=POOL_IDLE_EXPIRY_S,
            ),
            follow_redirects=False,
            trust_env=False,
            verify=self._verify,
        )

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        # httpx's documented `trace` request extension: the one public place a new connection shows.
        if event == "connection.connect_tcp.complete" and self._on_connect is not None:
            self._on_connect()

    async def _start(self) -> None:
        client = self._new_client()
        try:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD_BYTES)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in [*self._retired, *([self._client] if self._client is not None else [])]:
            await client.aclose()

    def register(self, ticket: Ticket) -> str:
        token = secrets.token_urlsafe(18)
        self._tickets[token] = ticket
        return token

    def discard(self, token: str) -> None:
        """The exchange ended; a ticket the relay never saw must not stay behind."""
        self._tickets.pop(token, None)

    # --- serving mitmproxy ---------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.limits.max_open:
            await _refuse(reader, writer, 503, "the gateway's upstream relay has too many connections open")
            return
        self._open += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        limits = self.limits
        proven = False  # whether this connection has shown a ticket (it is then mitmproxy's)
        try:
            while True:
                async with asyncio.timeout(limits.idle_timeout_s if proven else limits.head_timeout_s):
                    event = await _next_event(conn, reader)
                if not isinstance(event, h11.Request):
                    break
                # The ticket before the body: a stranger's request costs its head, never its body.
                token = next((v.decode("latin-1") for k, v in event.headers if k == _RELAY_HEADER), "")
                ticket = self._tickets.pop(token, None)
                if ticket is None or self._client is None:
                    await _refuse(reader, writer, 403, "not a request of this gateway", conn)
                    break
                proven = ticket.used = True
                length = next((v for k, v in event.headers if k == b"content-length"), b"0")
                if int(length) > limits.max_body_bytes:  # h11 checked it is digits
                    await _refuse(reader, writer, 413, "request body is larger than the relay's limit", conn)
                    break
                body = bytearray()
                async with asyncio.timeout(limits.idle_timeout_s):
                    while not isinstance(part := await _next_event(conn, reader), h11.EndOfMessage):
                        if not isinstance(part, h11.Data):
                            return
                        body += part.data
                        if len(body) > limits.max_body_bytes:  # chunked: no length to check first
                            break
                if len(body) > limits.max_body_bytes:
                    await _refuse(reader, writer, 413, "request body is larger than the relay's limit", conn)
                    break
                # The exchange keeps its own copy (for its attempts): the buffer must not live on beside it
                # for as long as a stream runs.
                content, body = bytes(body), bytearray()
                if not await self._exchange(conn, reader, writer, event, content, ticket):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:  # the relay's own bug: cut this connection, mitmproxy reports the flow's error
            log.exception("internal error in the upstream relay")
        finally:
            self._open -= 1
            if conn.our_state is h11.SEND_BODY:  # a response cut short must not look complete
                writer.transport.abort()
            elif not writer.is_closing():
                writer.close()

    async def _exchange(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
        ticket: Ticket,
    ) -> bool:
        """Answer one request; False when the connection must close."""
        work = asyncio.ensure_future(self._attempts(conn, writer, request, body, ticket))
        # While upstream is waited for, a client that leaves (mitmproxy closes this connection) must stop
        # the attempts and the stream, not leave them running to the end.
        gone = asyncio.ensure_future(reader.read(READ_CHUNK))
        seen = False  # whether what `gone` read was handed to h11
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone in done:
                seen = True
                data = gone.result()
                if not data:
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await work
                    return False
                conn.receive_data(data)  # mitmproxy does not pipeline; kept for h11 all the same
            return await work
        finally:
            if not work.done():
                work.cancel()
            if not gone.done():
                gone.cancel()
                # A StreamReader takes one reader at a time: the cancelled read must be over before this
                # kept-alive connection's next request is read, or that read raises.
                await asyncio.wait({gone})
            elif not seen and not gone.cancelled() and gone.exception() is None:
                conn.receive_data(gone.result())  # came in while the answer went out (b"": EOF)

    async def _attempts(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
        ticket: Ticket,
    ) -> bool:
        policy, up = ticket.policy, ticket.upstream
        headers = [(k, v) for k, v in request.headers.raw_items() if k.lower() not in _DROPPED]
        url = httpx.URL(scheme=up.scheme, host=up.host, port=up.port, raw_path=request.target)
        method = request.method.decode("ascii")
        timeout_s = policy.timeout_ms / 1000 if policy.timeout_ms is not None else None
        for n in range(1, policy.max_attempts + 1):
            last = n == policy.max_attempts
            client = self._acquire()  # this attempt's: a `configure` meanwhile closes it after
            try:
                wait: float | None = None
                resp: httpx.Response | None = None
                try:
                    async with asyncio.timeout(timeout_s):
                        request = httpx.Request(
                            method, url, headers=headers, content=body or None, extensions=self._extensions
                        )
                        resp = await client.send(request, stream=True)
                    headers_at = time.time()
                except TimeoutError:
                    ticket.attempts.append(Attempt(0, "timeout"))
                except httpx.HTTPError as exc:
                    log.debug("upstream attempt %d failed: %s", n, type(exc).__name__)
                    ticket.attempts.append(Attempt(0, "connection_failed"))
                if resp is None:
                    if last:
                        break
                    await asyncio.sleep(next_delay_s(policy, n, None) or 0.0)
                    continue
                try:
                    streaming = is_stream_response(resp.headers.get("content-type", ""), ticket.stream)
                    content: bytes | None = None
                    if not streaming:
                        try:
                            content = b"".join([chunk async for chunk in resp.aiter_raw()])
                        except httpx.HTTPError:
                            ticket.attempts.append(Attempt(0, "upstream_disconnected"))
                            if last:
                                break
                            await asyncio.sleep(next_delay_s(policy, n, None) or 0.0)
                            continue
                    if retryable(resp.status_code) and not last:
                        after = retry_after_s(resp.headers.get("retry-after"), time.time())
                        wait = next_delay_s(policy, n, after)
                    ticket.attempts.append(Attempt(resp.status_code))
                    ticket.response_start = headers_at
                    if wait is not None:
                        await resp.aclose()
                        await asyncio.sleep(wait)
                        continue
                    return await self._pass_on(conn, writer, resp, content, ticket.close)
                finally:
                    await resp.aclose()
            finally:
                self._release(client)
        ticket.failure = ticket.attempts[-1].error if ticket.attempts else "connection_failed"
        tries = f"{len(ticket.attempts)} attempt{'s' if len(ticket.attempts) > 1 else ''}"
        if ticket.failure == "timeout":
            answer = _json(504, f"the upstream did not answer within {policy.timeout_ms} ms ({tries})")
        elif ticket.failure == "upstream_disconnected":
            answer = _json(502, f"the upstream cut its response short ({tries})")
        else:
            answer = _json(502, f"the gateway could not reach the upstream ({tries})")
        await _send(conn, writer, *answer, close=ticket.close)
        return True

    async def _pass_on(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        resp: httpx.Response,
        content: bytes | None,
        close: bool,
    ) -> bool:
        headers = [(k, v) for k, v in resp.headers.raw if k.lower() not in _DROPPED]
        if close:  # h11 then ends the connection after this answer (`_serve` sees our state MUST_CLOSE)
            headers.append((b"connection", b"close"))
        if content is not None:
            headers.append((b"content-length", str(len(content)).encode()))
        elif (length := resp.headers.get("content-length")) is not None:
            headers.append((b"content-length", length.encode("latin-1")))
        reason = resp.reason_phrase.encode("latin-1", "replace")
        head = conn.send(h11.Response(status_code=resp.status_code, headers=headers, reason=reason))
        if content is not None:
            # One write for a whole answer: each is a system call, and on loopback one that also runs the
            # receiving side's TCP processing (a third of the relay's CPU when written in three).
            body = conn.send(h11.Data(data=content)) if content else b""
            writer.write(b"".join((head, body, conn.send(h11.EndOfMessage()))))
            await writer.drain()
            return True
        writer.write(head)
        await writer.drain()
        try:
            async for chunk in resp.aiter_raw():
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()
        except httpx.HTTPError:
            # The upstream cut the stream: cut it for mitmproxy too (no final chunk), so the client and
            # the event see the same as without the relay.
            writer.transport.abort()
            return False
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True


def _json(status: int, message: str) -> tuple[int, bytes]:
    return status, orjson.dumps({"message": message})


def _own_head(body: bytes) -> list[tuple[bytes, bytes]]:
    """The head of an answer the relay makes itself."""
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (_RELAY_ANSWER_HEADER, b"1"),
    ]


async def _send(
    conn: h11.Connection, writer: asyncio.StreamWriter, status: int, body: bytes, *, close: bool
) -> None:
    head = _own_head(body) + ([(b"connection", b"close")] if close else [])
    writer.write(conn.send(h11.Response(status_code=status, headers=head)))
    writer.write(conn.send(h11.Data(data=body)))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


async def _refuse(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    status: int,
    message: str,
    conn: h11.Connection | None = None,
) -> None:
    """Answer a refusal and close the connection, whatever its request still has to send."""
    _, body = _json(status, message)
    head = [*_own_head(body), (b"connection", b"close")]
    if conn is not None:
        response = h11.Response(status_code=status, headers=head)
        data = conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    else:  # refused before a request was read: h11 answers only one it has read
        lines = b"".join(k + b": " + v + b"\r\n" for k, v in head)
        data = b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (status, HTTPStatus(status).phrase.encode(), lines, body)
    try:
        writer.write(data)
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(LINGER_S):
            while await reader.read(READ_CHUNK):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(READ_CHUNK))
