"""The Cohere gateway as a mitmproxy addon: `mitmdump -s addons/gateway.py --mode reverse:URL@PORT ...`.

Listeners decide the route kind: a `reverse` listener serves the Cloudflare-compatible gateway routes
(/v1/{account}/{gateway}/cohere/... and /compat/...); a `regular` listener is a forward proxy for apps that
set HTTPS_PROXY, capturing api.cohere.ai / api.cohere.com only. Either way the addon alone sets where a
request goes: the configured upstream, never a host the client named.

Hooks stay thin; routing, header parsing, extraction, pricing and event building are pure functions in
the sibling modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # loaded by path (`mitmdump -s addons/gateway.py`) from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode

from addons.capture import Exchange, build_event
from addons.delivery import DELIVERY_OPTIONS, DeliveryConfig, default_spool_dir
from addons.headers import check_gateway_token, check_singletons, key_fingerprint, parse_request_options
from addons.metrics import Metrics, Snapshot, merge, read_snapshots, render, write_snapshot
from addons.outcomes import classify_proxy_error, classify_status
from addons.pricing import DEFAULT_PRICING, load_pricing
from addons.publish import NullPublisher, Publisher
from addons.routing import (
    LocalRoute,
    Route,
    RouteError,
    Upstream,
    check_connect,
    route_gateway,
    route_transparent,
)
from addons.sidecar import SidecarPublisher
from addons.streaming import StreamWatcher, UsageStripper, is_stream_response, want_stream_usage
from addons.usage import Extracted, extract_body, request_fields
from cohere_gateway import settings
from cohere_gateway.events import encode, new_event_id, truncate

log = logging.getLogger("cohere_gateway.gateway")

STATE = "cohere_gateway"  # key of the Exchange in flow.metadata
OVERHEAD_HEADER = "x-cohere-gateway-overhead-ms"
LOG_ID_HEADER = "cf-aig-log-id"


def _opt_default(name: str) -> object:
    """Option defaults come from COHERE_GATEWAY_<NAME> (so the CLI can hand over the gateway token
    without putting it on a command line), else from ProxySettings."""
    default = next(f.default for f in dataclasses.fields(settings.ProxySettings) if f.name == name)
    raw = os.environ.get(settings.env_name(settings.ProxySettings, name))
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("upstream", str, "Cohere API base URL requests are forwarded to."),
    ("kafka_bootstrap", str, "Kafka bootstrap servers HOST:PORT[,...]; empty: events are not published."),
    ("topic", str, "Kafka topic for events."),
    ("default_account_id", str, "Account id of forward-proxy requests without cf-aig-account-id."),
    ("default_gateway_id", str, "Gateway id of forward-proxy requests without cf-aig-gateway-id."),
    ("gateway_token", str, "If set, requests need 'cf-aig-authorization: Bearer <token>'."),
    ("max_request_bytes", int, "Largest request body accepted; larger ones get 413."),
    ("log_payloads", bool, "Store request/response bodies in events (truncated)."),
    ("payload_max_bytes", int, "Bodies stored in events are truncated to this many characters."),
    *DELIVERY_OPTIONS,
)


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> http.Response:
    return http.Response.make(
        status, orjson.dumps(body), {"content-type": "application/json", **(headers or {})}
    )


def json_error_page(status_code: int, message: str = "") -> bytes:
    """What mitmproxy sends for errors it answers itself (upstream unreachable, malformed request line):
    JSON `{"message"}` like the gateway's own errors, so the SDKs raise their typed errors, not ApiError
    on an HTML page."""
    from mitmproxy.net.http import http1

    text = message or http.status_codes.RESPONSES.get(status_code, "error")
    if status_code == 502:
        text = f"the gateway could not reach the upstream: {text}"
    resp = http.Response.make(
        status_code,
        orjson.dumps({"message": text}),
        {"content-type": "application/json", "connection": "close"},
    )
    return http1.assemble_response(resp)


def _ms(seconds: float) -> str:
    return f"{max(0.0, seconds) * 1000:.3f}"


# How often a worker of `proxy --workers N` shares its counters with the others (addons/metrics.py).
METRICS_SHARE_S = 1.0


class Gateway:
    def __init__(self, metrics_dir: Path | None = None) -> None:
        self.metrics = Metrics()
        self.metrics_dir = metrics_dir  # set in the workers of `proxy --workers N`: /metrics sums them
        self._sharing: asyncio.Task[None] | None = None
        self.publisher: Publisher = NullPublisher()
        self.pricing = load_pricing(DEFAULT_PRICING)
        self.upstream = Upstream.parse(settings.DEFAULT_UPSTREAM)
        self.started = time.time()
        self.in_flight = 0  # exchanges started and not finished: shutdown waits for them

    # --- configuration -------------------------------------------------------------------------------

    def load(self, loader) -> None:  # loader: mitmproxy.addonmanager.Loader
        for name, kind, help_text in OPTIONS:
            loader.add_option(name, kind, _opt_default(name), help_text)
        # mitmproxy has no hook for the error pages it writes itself; its HTTP/1 layer looks this name up
        # at call time, so replacing it makes every error this process sends JSON.
        from mitmproxy.proxy.layers.http import _http1

        _http1.make_error_response = json_error_page

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "upstream" in updated:
            try:
                self.upstream = Upstream.parse(opts.upstream)
            except ValueError as exc:
                from mitmproxy import exceptions

                raise exceptions.OptionsError(str(exc)) from None
        if updated & {"kafka_bootstrap", "topic", *(name for name, _, _ in DELIVERY_OPTIONS)}:
            # Close first: the new publisher takes over the old one's spool directory (and its lock).
            self.publisher.close(5.0)
            self.publisher = self._make_publisher()
        if "connection_strategy" in updated and opts.connection_strategy != "lazy":
            # eager would connect to the host a client CONNECTs to before the addon decides where it goes
            opts.connection_strategy = "lazy"

    def _make_publisher(self) -> Publisher:
        bootstrap = ctx.options.kafka_bootstrap.strip()
        if not bootstrap:
            log.warning("no kafka_bootstrap set: events are counted but not published")
            return NullPublisher()
        try:
            spool_dir = default_spool_dir(ctx.options.confdir)
            return SidecarPublisher(
                DeliveryConfig.from_options(ctx.options, spool_dir),
                grace_s=ctx.options.shutdown_grace_s,
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            from mitmproxy import exceptions

            raise exceptions.OptionsError(f"cannot start event delivery: {exc}") from None

    def running(self) -> None:
        if self.metrics_dir is not None:
            self._sharing = asyncio.get_running_loop().create_task(self._share_metrics(self.metrics_dir))

    async def _share_metrics(self, directory: Path) -> None:
        failed = False
        while True:
            try:
                write_snapshot(directory, self._snapshot())
                failed = False
            except OSError as exc:
                if not failed:  # once per failure, not once a second
                    log.warning("cannot share counters with the other workers: %s", exc)
                failed = True
            await asyncio.sleep(METRICS_SHARE_S)

    def _snapshot(self) -> Snapshot:
        return self.metrics.snapshot(self.publisher.counters())

    async def done(self) -> None:
        # Graceful stop (SIGTERM/SIGINT): accept no new connections, let in-flight exchanges finish (and
        # publish their events), then give the publisher what is left of the grace period to reach Kafka;
        # it spools the rest. Async so the event loop keeps serving those exchanges meanwhile.
        deadline = time.monotonic() + ctx.options.shutdown_grace_s
        proxyserver = ctx.master.addons.get("proxyserver")
        if proxyserver is not None:
            await proxyserver.servers.update([])
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self.publisher.close, max(0.0, deadline - time.monotonic()))
        if self._sharing is not None and self.metrics_dir is not None:
            self._sharing.cancel()
            # The last counts stay in the directory: the workers still running keep summing them.
            with contextlib.suppress(OSError):
                write_snapshot(self.metrics_dir, self._snapshot())
        log.info(orjson.dumps({"msg": "gateway stopped", **self.publisher.counters()}).decode())

    # --- requests ------------------------------------------------------------------------------------

    def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            check_connect(flow.request.host, flow.request.port)
        except RouteError as exc:
            self._reject(flow, exc)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        mode = flow.client_conn.proxy_mode
        try:
            if isinstance(mode, ReverseMode):
                if req.authority and not (req.is_http2 or req.is_http3):
                    raise RouteError(400, "absolute-form request targets are not accepted by the gateway")
                route = route_gateway(req.method, req.path)
            elif isinstance(mode, RegularMode):
                route = route_transparent(req.method, req.host, req.port, req.path)
            else:
                raise RouteError(400, f"the gateway does not serve {mode.type_name} mode")
        except RouteError as exc:
            self._reject(flow, exc)
            return
        if isinstance(route, LocalRoute):
            self._serve_local(flow, route)
            return
        self._start_exchange(flow, route)

    def _start_exchange(self, flow: http.HTTPFlow, route: Route) -> None:
        req = flow.request
        opts = ctx.options
        headers = req.headers
        x = Exchange(
            route=route,
            options=parse_request_options(()),
            account_id=route.account_id or opts.default_account_id,
            gateway_id=route.gateway_id or opts.default_gateway_id,
            event_id=new_event_id(),
            start=req.timestamp_start,
            method=req.method,
            user_agent=headers.get("user-agent"),
            key_fingerprint=key_fingerprint(headers.get("authorization"), headers.get("x-api-key")),
        )
        flow.metadata[STATE] = x
        self.in_flight += 1
        try:
            check_singletons(k.decode("latin-1") for k, _ in headers.fields)
            x.options = parse_request_options(headers.items())
            check_gateway_token(x.options.authorization, opts.gateway_token)
            if route.mode == "transparent":
                x.account_id = x.options.account_id or x.account_id
                x.gateway_id = x.options.gateway_id or x.gateway_id
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > opts.max_request_bytes:
                raise RouteError(
                    413, f"request body is larger than the gateway's limit of {opts.max_request_bytes} bytes"
                )
        except RouteError as exc:
            self._reject(flow, exc, x)
            return
        for name in [k for k in headers if k.lower().startswith("cf-aig-")]:
            del headers[name]
        up = self.upstream
        req.scheme = up.scheme
        req.host = up.host
        req.port = up.port
        req.path = up.prefix + route.path + route.query
        req.host_header = up.host_header

    def request(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        if x is None or flow.response is not None:
            return
        opts = ctx.options
        raw = flow.request.raw_content or b""
        x.request_bytes = len(raw)
        if len(raw) > opts.max_request_bytes:
            self._reject(
                flow,
                RouteError(
                    413, f"request body is larger than the gateway's limit of {opts.max_request_bytes} bytes"
                ),
                x,
            )
            return
        body, x.model, x.stream = request_fields(flow.request.content if raw else None)
        if x.route.mode == "compat" and body is not None and x.model:
            provider, slash, name = x.model.partition("/")
            if slash and provider != "cohere":
                self._reject(
                    flow,
                    RouteError(400, f"model {x.model[:80]!r}: this gateway serves cohere/<model> only"),
                    x,
                )
                return
            if slash:
                x.model = name
                body["model"] = name
                flow.request.content = orjson.dumps(body)
        if body is not None and want_stream_usage(x.route.api_version, x.route.endpoint, x.stream, body):
            # Without usage a compat stream cannot be priced: ask for it, and strip it from the answer.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            flow.request.content = orjson.dumps(body)
            x.strip_usage = True
        if x.stream:
            # the stream is read as it passes; a compressed one could not be
            flow.request.headers["accept-encoding"] = "identity"
        if opts.log_payloads and x.options.collect_payload:
            x.request_body = truncate(flow.request.get_text(strict=False), opts.payload_max_bytes)
        self.metrics.requests[x.route.mode] += 1
        x.forwarded_at = time.time()

    # --- responses -----------------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if x is None or resp is None or x.forwarded_at is None:
            return
        resp.headers[LOG_ID_HEADER] = x.event_id
        if not is_stream_response(resp.headers.get("content-type", ""), x.stream) or resp.headers.get(
            "content-encoding", "identity"
        ) not in ("identity", ""):
            return
        fmt = "sse" if "event-stream" in resp.headers.get("content-type", "") else "ndjson"
        watcher = x.watcher = StreamWatcher(x.route.api_version, x.route.endpoint, fmt)
        keep = ctx.options.log_payloads and x.options.collect_payload
        limit = ctx.options.payload_max_bytes
        if keep:
            x.response_payload = []

        stripper = UsageStripper() if x.strip_usage and fmt == "sse" else None

        def tap(chunk: bytes) -> bytes | list[bytes]:
            if stripper is None:
                return _tap(chunk)
            if not _tap(chunk):
                return stripper.flush()
            # a list, because an empty bytes chunk would end the client's response
            out = stripper.feed(chunk)
            return [out] if out else []

        def _tap(chunk: bytes) -> bytes:
            if chunk:
                watcher.feed(chunk)
                if keep and x.payload_kept < limit:
                    x.response_payload.append(chunk[: limit - x.payload_kept])  # type: ignore[union-attr]
                    x.payload_kept += len(chunk)
                if watcher.complete and not x.finished:
                    # Published before the last chunk goes on: an SDK returns at `[DONE]`, and a crash
                    # right after must not lose an exchange the client saw complete.
                    self._finish_stream(flow, x, time.time())
            return chunk

        resp.stream = tap
        now = time.time()
        resp.headers[OVERHEAD_HEADER] = _ms((x.forwarded_at - x.start) + (now - resp.timestamp_start))

    def response(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if x is None or x.finished or resp is None:
            return
        now = time.time()
        if x.forwarded_at is None:  # answered by the gateway itself
            self._finish(
                x,
                status=resp.status_code,
                outcome="gateway_error",
                error_type="gateway_rejected",
                extracted=Extracted(),
                end=now,
                error_message=_message_of(resp),
            )
            return
        if x.watcher is not None:
            self._finish_stream(flow, x, now)
            return
        outcome, error_type = classify_status(resp.status_code)
        payload: str | None = None
        size = len(resp.raw_content or b"")
        try:
            content = resp.content
        except ValueError:  # undecodable content-encoding: we learn nothing, the client still gets it
            content = None
        extracted = extract_body(x.route.api_version, x.route.endpoint, content)
        if ctx.options.log_payloads and x.options.collect_payload and content is not None:
            payload = truncate(content.decode("utf-8", "replace"), ctx.options.payload_max_bytes)
        # cf-aig-log-id was set in responseheaders; only now is the gateway's own time known
        resp.headers[OVERHEAD_HEADER] = _ms((x.forwarded_at - x.start) + (now - (resp.timestamp_end or now)))
        self._finish(
            x,
            status=resp.status_code,
            outcome=outcome,
            error_type=error_type,
            extracted=extracted,
            end=now,
            response_start=resp.timestamp_start,
            response_end=resp.timestamp_end,
            response_bytes=size,
            response_body=payload,
        )

    def _finish_stream(self, flow: http.HTTPFlow, x: Exchange, now: float) -> None:
        resp = flow.response
        assert resp is not None and x.watcher is not None
        outcome, error_type = classify_status(resp.status_code)
        x.watcher.finish()
        if outcome == "ok" and x.watcher.stream_error:
            outcome, error_type = "upstream_error", "stream_error"
        payload: str | None = None
        if x.response_payload is not None:
            payload = truncate(
                b"".join(x.response_payload).decode("utf-8", "replace"), ctx.options.payload_max_bytes
            )
        self._finish(
            x,
            status=resp.status_code,
            outcome=outcome,
            error_type=error_type,
            extracted=x.watcher.extracted,
            end=now,
            response_start=resp.timestamp_start,
            response_end=resp.timestamp_end or now,
            response_bytes=x.watcher.bytes_seen,
            response_body=payload,
        )

    def error(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        if x is None or x.finished:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        resp = flow.response
        outcome, error_type = classify_proxy_error(msg, resp is not None)
        extracted = Extracted()
        if x.watcher is not None:
            x.watcher.finish()
            extracted = x.watcher.extracted
        if x.forwarded_at is None and outcome != "client_aborted":
            outcome, error_type = "gateway_error", "proxy_error"
        self._finish(
            x,
            status=resp.status_code if resp is not None else 0,
            outcome=outcome,
            error_type=error_type,
            extracted=extracted,
            end=time.time(),
            response_start=resp.timestamp_start if resp is not None else None,
            response_bytes=x.watcher.bytes_seen if x.watcher else 0,
            error_message=msg,
        )

    # --- helpers -------------------------------------------------------------------------------------

    def _finish(self, x: Exchange, **kw) -> None:
        x.finished = True
        self.in_flight -= 1
        outcome = kw["outcome"]
        self.metrics.exchanges[outcome] += 1
        if not x.options.collect_log:
            self.metrics.events_skipped += 1
            return
        try:
            event = build_event(x, pricing=self.pricing, **kw)
            self.publisher.publish(f"{x.account_id}/{x.gateway_id}".encode(), encode(event))
        except Exception:  # a bug here must cost an event, never the client's response
            log.exception("building the event failed (event %s)", x.event_id)
            return
        if outcome != "ok":
            log.info(
                orjson.dumps(
                    {
                        "msg": "exchange",
                        "event_id": x.event_id,
                        "account_id": x.account_id,
                        "gateway_id": x.gateway_id,
                        "path": x.route.path,
                        "status": kw["status"],
                        "outcome": outcome,
                        "error_type": kw.get("error_type"),
                    }
                ).decode()
            )

    def _reject(self, flow: http.HTTPFlow, exc: RouteError, x: Exchange | None = None) -> None:
        self.metrics.rejected[exc.status] += 1
        headers = {LOG_ID_HEADER: x.event_id} if x is not None else {}
        flow.response = json_response(exc.status, {"message": exc.message}, headers)
        if x is None:
            log.info(orjson.dumps({"msg": "rejected", "status": exc.status, "reason": exc.message}).decode())

    def _serve_local(self, flow: http.HTTPFlow, route: LocalRoute) -> None:
        if route.path == "/metrics":
            snap = self._snapshot()
            if self.metrics_dir is None:
                text = render(snap)
            else:
                others = read_snapshots(self.metrics_dir, os.getpid())
                text = render(merge([snap, *others]), workers=1 + len(others))
            flow.response = http.Response.make(200, text, {"content-type": "text/plain; version=0.0.4"})
            return
        flow.response = json_response(
            200,
            {
                "status": "ok",
                "pid": os.getpid(),  # with --workers, which process answered (these counters are its own)
                "upstream": f"{self.upstream.scheme}://{self.upstream.host_header}{self.upstream.prefix}",
                "uptime_s": round(time.time() - self.started, 3),
                "publisher": self.publisher.counters(),
            },
        )


def _message_of(resp: http.Response) -> str | None:
    try:
        body = orjson.loads(resp.content or b"")
    except (orjson.JSONDecodeError, ValueError):
        return None
    return body.get("message") if isinstance(body, dict) else None


addons = [Gateway()]
