"""The Cohere gateway as a mitmproxy addon (`cohere-gateway proxy`, or a stock mitmdump with
`-s addons/mitmdump_script.py`).

Listeners decide the route kind: a `reverse` listener serves the Cloudflare-compatible gateway routes
(/v1/{account}/{gateway}/cohere/... and /compat/...); a `regular` listener is a forward proxy for apps that
set HTTPS_PROXY, capturing api.cohere.ai / api.cohere.com only. Either way the addon alone sets where a
request goes: the configured upstream, never a host the client named.

Hooks stay thin; routing, header parsing, extraction, pricing and event building are pure functions in
the sibling modules.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from cohere_gateway import settings
from cohere_gateway.addons import cache as rcache
from cohere_gateway.addons import gateway_config as gwconfig
from cohere_gateway.addons import mitmproxy_seam, provider_keys, ratelimits, retries
from cohere_gateway.addons.bodies import (
    DECODE_INLINE_BYTES,
    check_content_encoding,
    decode_body,
    is_identity,
    too_large,
)
from cohere_gateway.addons.capture import Ending, Exchange, build_event, fit_event
from cohere_gateway.addons.delivery import PUBLISHER_OPTIONS, DeliveryConfig
from cohere_gateway.addons.headers import (
    RequestOptions,
    api_key_of,
    check_gateway_token,
    check_request_head,
    check_singletons,
    credentials,
    header_text,
    key_fingerprint,
    parse_request_options,
)
from cohere_gateway.addons.metrics import CONTENT_TYPE, Metrics
from cohere_gateway.addons.outcomes import classify_proxy_error, classify_status
from cohere_gateway.addons.pricing import DEFAULT_PRICING, compute_cost, load_pricing
from cohere_gateway.addons.publish import NullPublisher, Publisher
from cohere_gateway.addons.relay import (
    RELAY_ANSWER_HEADER,
    RELAY_HEADER,
    Relay,
    RelayLimits,
    RelayStartError,
    Ticket,
)
from cohere_gateway.addons.routing import (
    LocalRoute,
    Route,
    RouteError,
    Upstream,
    check_connect,
    route_gateway,
    route_transparent,
)
from cohere_gateway.addons.sidecar import SidecarPublisher
from cohere_gateway.addons.streaming import (
    StreamWatcher,
    UsageStripper,
    is_stream_response,
    want_stream_usage,
)
from cohere_gateway.addons.usage import Extracted, extract_body, request_fields
from cohere_gateway.events import Usage, new_event_id, truncate, utc_from_timestamp

log = logging.getLogger("cohere_gateway.gateway")

STATE = "cohere_gateway"  # key of the Exchange in flow.metadata
OVERHEAD_HEADER = "x-cohere-gateway-overhead-ms"
LOG_ID_HEADER = "cf-aig-log-id"
ATTEMPTS_HEADER = "x-cohere-gateway-attempts"


# Every ProxySettings field but the process's own, with its type and help from there.
OPTIONS: tuple[tuple[str, type, str], ...] = settings.addon_options()
# Options the `*/*` defaults of the per-gateway configuration come from.
_POLICY_OPTIONS = frozenset({"config", "gateway_token", "log_payloads", "payload_max_bytes", "cache_ttl"})
_CACHE_OPTIONS = frozenset({"cache_url", "cache_max_bytes", "confdir"})
CONFIG_CHECK_S = 1.0  # how often the configuration file is checked for changes


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> http.Response:
    return http.Response.make(
        status, orjson.dumps(body), {"content-type": "application/json", **(headers or {})}
    )


def json_error_body(status_code: int, message: str = "") -> bytes:
    """The body of an error mitmproxy answers itself, as the gateway's own: JSON `{"message"}`."""
    text = message or http.status_codes.RESPONSES.get(status_code, "error")
    if status_code == 413:  # mitmproxy's body_size_limit, set from max_request_bytes: say so in our words
        text = too_large(ctx.options.max_request_bytes).message  # rare: an error page
    if status_code == 502:
        text = f"the gateway could not reach the upstream: {text}"
    return orjson.dumps({"message": text})


def json_error_page(status_code: int, message: str = "") -> bytes:
    """What mitmproxy sends for errors it answers itself (upstream unreachable, malformed request line):
    JSON `{"message"}` like the gateway's own errors, so the SDKs raise their typed errors, not ApiError
    on an HTML page."""
    from mitmproxy.net.http import http1

    resp = http.Response.make(
        status_code,
        json_error_body(status_code, message),
        {"content-type": "application/json", "connection": "close"},
    )
    return http1.assemble_response(resp)


def _header_ms(ms: float) -> str:
    return f"{ms:.3f}"


def _fail_closed(hook: Callable[[Gateway, http.HTTPFlow], Any]) -> Callable[[Gateway, http.HTTPFlow], Any]:
    """A hook that raises must not let mitmproxy carry on with the flow as it was (it logs "Addon error"
    and forwards it: unauthenticated, cf-aig-* headers on, to the upstream's host outside its prefix).
    Any exception - in the hook or in the coroutine it returns - answers a JSON error instead and ends
    the exchange as a gateway_error."""

    @functools.wraps(hook)
    def guarded(self: Gateway, flow: http.HTTPFlow) -> Any:
        try:
            result = hook(self, flow)
        except Exception as exc:
            self._hook_failed(flow, hook.__name__, exc)
            return None
        if result is None:
            return None
        return self._await_guarded(flow, hook.__name__, result)

    return guarded


# How often the publisher's counters are copied into the gateway's (addons/metrics.py).
METRICS_SHARE_S = 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class HotOptions:
    """The options every request reads, copied in `configure`: mitmproxy's option lookup deep-copies the
    value on every read (≈ 2.5 µs each on the bench host), eight or more of them per request otherwise."""

    max_headers: int
    max_header_bytes: int
    header_timeout_s: float
    max_request_bytes: int
    max_custom_cost: float
    default_account_id: str
    default_gateway_id: str
    upstream_pool: str
    pool_streams: bool

    @classmethod
    def of(cls, opts: Any) -> HotOptions:
        return cls(**{name: getattr(opts, name) for name in cls.__dataclass_fields__})


class Gateway:
    def __init__(self, metrics_dir: Path | None = None) -> None:
        self.metrics = Metrics(metrics_dir)
        self.metrics_dir = metrics_dir  # set in the workers of `proxy --workers N`: /metrics sums them
        self._sharing: asyncio.Task[None] | None = None
        self.publisher: Publisher = NullPublisher()
        self.pricing = load_pricing(DEFAULT_PRICING)
        self.upstream = Upstream.parse(settings.DEFAULT_UPSTREAM)
        self.started = time.time()
        self.in_flight = 0  # exchanges started and not finished: shutdown waits for them
        self._counted: set[str] = set()  # ids of the client connections open now (max_connections)
        # ids of the open client connections that have sent a request upstream (upstream_pool)
        self._forwarded_on: set[str] = set()
        self.config = gwconfig.ConfigWatcher(None, gwconfig.GatewayPolicy(), self.metrics.config)
        self.cache = rcache.ResponseCache(None, self.metrics.cache)
        self._watching: asyncio.Task[None] | None = None
        # makes the upstream call for requests with a timeout or retries, and those the pool serves
        self.relay = Relay(on_connect=self._pool_connected)
        self._upstream_ca_set: str | None = None  # what configure gave mitmproxy's trusted-CA option
        self.limiter = ratelimits.RateLimiter()
        self._settling: set[asyncio.Task[None]] = set()
        self.hot = HotOptions.of(settings.ProxySettings())  # until the first configure()

    # --- configuration -------------------------------------------------------------------------------

    def load(self, loader) -> None:  # loader: mitmproxy.addonmanager.Loader
        for name, kind, help_text in OPTIONS:
            # Defaults from COHERE_GATEWAY_<NAME>, so the CLI can hand over the gateway token without
            # putting it on a command line.
            default = settings.env_value(settings.ProxySettings, name)
            loader.add_option(name, kind, default, help_text)
        # mitmproxy has no hook for the error pages it writes itself: every error this process sends is
        # JSON only through this seam.
        mitmproxy_seam.install_error_pages(json_error_page, json_error_body)
        mitmproxy_seam.install_fast_typecheck()
        mitmproxy_seam.install_fast_accessors()
        mitmproxy_seam.install_head_limit(
            lambda: self.hot.max_header_bytes, json_error_page, lambda: self.hot.header_timeout_s
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        self.hot = HotOptions.of(opts)
        if "upstream" in updated:
            try:
                self.upstream = Upstream.parse(opts.upstream)
            except ValueError as exc:
                from mitmproxy import exceptions

                raise exceptions.OptionsError(str(exc)) from None
        if updated & PUBLISHER_OPTIONS:
            # Close first: the new publisher takes over the old one's spool directory (and its lock).
            self.publisher.close(5.0)
            self.publisher = self._make_publisher()
        if updated & _POLICY_OPTIONS:
            self._configure_policy(opts, "config" in updated)
        if updated & _CACHE_OPTIONS:
            self._configure_cache(opts)
        if "state_url" in updated:
            try:
                self.limiter = ratelimits.RateLimiter(opts.state_url)
            except ValueError as exc:
                from mitmproxy import exceptions

                raise exceptions.OptionsError(str(exc)) from None
        if "upstream_pool" in updated and opts.upstream_pool not in settings.UPSTREAM_POOL_MODES:
            from mitmproxy import exceptions

            raise exceptions.OptionsError(
                f"upstream_pool must be one of {', '.join(settings.UPSTREAM_POOL_MODES)}, "
                f"not {opts.upstream_pool!r}"
            )
        if "upstream_ca" in updated:
            try:
                self.relay.configure(opts.upstream_ca)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                from mitmproxy import exceptions

                raise exceptions.OptionsError(
                    f"upstream_ca: cannot load {opts.upstream_ca!r}: {exc}"
                ) from None
        # the relay's loopback listener has the bounds of the gateway's own
        self.relay.limits = RelayLimits.of(opts)
        if "max_custom_cost" in updated and not (
            math.isfinite(opts.max_custom_cost) and opts.max_custom_cost >= 0
        ):
            from mitmproxy import exceptions

            raise exceptions.OptionsError(
                f"max_custom_cost must be a finite number >= 0, not {opts.max_custom_cost}"
            )
        # mitmproxy's own options that the gateway's safety depends on, set from the gateway's. Each is
        # set only when it differs: setting an option triggers another configure().
        wanted = self._mitmproxy_options(opts)
        if "upstream_ca" in updated:
            given, self._upstream_ca_set = self._upstream_ca_set, opts.upstream_ca or None
            # cleared: mitmproxy's own connections stop trusting the file the gateway gave them, as the
            # pool does (a value its user set on a stock mitmdump is left alone)
            current = getattr(opts, "ssl_verify_upstream_trusted_ca", None)
            if not opts.upstream_ca and given and current == given:
                wanted["ssl_verify_upstream_trusted_ca"] = None
        # (An option of an addon not loaded, e.g. in a test context, is left alone.)
        changed = {k: v for k, v in wanted.items() if k in opts and getattr(opts, k) != v}
        if changed:
            opts.update(**changed)

    @staticmethod
    def _mitmproxy_options(opts: Any) -> dict[str, Any]:
        return {
            # eager would connect to the host a client CONNECTs to before the addon decides where it goes
            "connection_strategy": "lazy",
            # mitmproxy stops reading a body past this (413) instead of buffering it whole first
            "body_size_limit": str(opts.max_request_bytes),
            "tcp_timeout": max(1, math.ceil(opts.idle_timeout_s)),
            "http2": opts.allow_http2,
            # refuse smuggling-prone framing and malformed header names at the protocol layer
            "validate_inbound_headers": True,
            # bytes in a CONNECT tunnel that are not HTTP or TLS are refused, never piped to the host
            "rawtcp": False,
            "websocket": False,
            "http3": False,
            # the relay's pool and mitmproxy's own upstream connections trust the same CAs (unset, a
            # stock mitmdump's own ssl_verify_upstream_trusted_ca is left as its user set it)
            **({"ssl_verify_upstream_trusted_ca": opts.upstream_ca} if opts.upstream_ca else {}),
            # The pool always checks the upstream's certificate: mitmproxy's own connections must too, or
            # which path a request takes would decide whether its API key may go to an impostor (an
            # upstream behind a private CA takes --upstream-ca, not --ssl-insecure).
            "ssl_insecure": False,
        }

    def _configure_policy(self, opts, reload_file: bool) -> None:
        from mitmproxy import exceptions

        ttl = opts.cache_ttl
        if ttl and not gwconfig.MIN_CACHE_TTL_S <= ttl <= gwconfig.MAX_CACHE_TTL_S:
            raise exceptions.OptionsError(
                f"cache_ttl must be 0 or {gwconfig.MIN_CACHE_TTL_S}..{gwconfig.MAX_CACHE_TTL_S} seconds"
            )
        base = gwconfig.GatewayPolicy(
            tokens=(opts.gateway_token,) if opts.gateway_token else (),
            log_payloads=opts.log_payloads,
            payload_max_bytes=opts.payload_max_bytes,
            cache=gwconfig.CachePolicy(enabled=bool(ttl), ttl_s=ttl or gwconfig.CLIENT_KEY_TTL_S),
        )
        if not reload_file:
            self.config.set_base(base)
            return
        try:
            path = Path(opts.config) if opts.config else None
            self.config = gwconfig.ConfigWatcher(path, base, self.metrics.config)
        except gwconfig.ConfigError as exc:
            raise exceptions.OptionsError(f"invalid configuration: {exc}") from None

    def _configure_cache(self, opts) -> None:
        from mitmproxy import exceptions

        directory = settings.data_dir_of(opts.confdir) / "cache"
        store = None
        try:
            store = rcache.open_store(opts.cache_url, directory, opts.cache_max_bytes)
        except ValueError as exc:
            raise exceptions.OptionsError(f"cannot open the response cache: {exc}") from None
        except Exception as exc:  # a full or broken disk: serve without a cache rather than not at all
            self.metrics.cache["store_errors"] += 1
            log.error("cannot open the response cache, running without one: %r", exc)
        # a disk cache of one process coalesces in memory alone; workers and Redis share the store's lock
        shared = self.metrics_dir is not None or not isinstance(store, rcache.DiskStore)
        self.cache = rcache.ResponseCache(store, self.metrics.cache, shared=shared)

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(CONFIG_CHECK_S)
            try:
                await asyncio.to_thread(self.config.check)
            except Exception:  # the watcher logs bad files itself; this is a bug, never fatal
                log.exception("checking the configuration file failed")

    def _make_publisher(self) -> Publisher:
        bootstrap = ctx.options.kafka_bootstrap.strip()
        if not bootstrap:
            log.warning("no kafka_bootstrap set: events are counted but not published")
            return NullPublisher()
        try:
            return SidecarPublisher(
                DeliveryConfig.from_options(ctx.options, settings.data_dir_of(ctx.options.confdir)),
                log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
            )
        except (OSError, ValueError, RuntimeError) as exc:
            from mitmproxy import exceptions

            raise exceptions.OptionsError(f"cannot start event delivery: {exc}") from None

    def client_connected(self, client: Any) -> None:
        # mitmproxy has no connection limit; one idle connection costs little, ten thousand do not.
        if self.connections >= ctx.options.max_connections:
            client.error = "too many connections"
            self.metrics.connections_refused.inc()
            return
        self._counted.add(client.id)

    def client_disconnected(self, client: Any) -> None:
        self._counted.discard(client.id)
        self._forwarded_on.discard(client.id)

    def server_connected(self, data: ServerConnectionHookData) -> None:
        # mitmproxy's own connections to the relay are loopback hops, not upstream handshakes.
        if data.server.address != ("127.0.0.1", self.relay.port):
            self.metrics.upstream_connections["mitmproxy"] += 1

    def _pool_connected(self) -> None:
        self.metrics.upstream_connections["pool"] += 1

    @property
    def connections(self) -> int:
        return len(self._counted)

    def running(self) -> None:
        self._watching = asyncio.get_running_loop().create_task(self._watch_config())
        if self.metrics_dir is not None:
            self._sharing = asyncio.get_running_loop().create_task(self._share_metrics())

    async def _share_metrics(self) -> None:
        # The worker answering a scrape reads its own publisher then; the others' part comes from here.
        while True:
            self.metrics.observe_publisher(self.publisher.counters())
            await asyncio.sleep(METRICS_SHARE_S)

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
        if self._watching is not None:
            self._watching.cancel()
        await self.cache.close()
        await self.relay.close()
        if self._sharing is not None:
            self._sharing.cancel()
            # The last counts stay in the directory: the workers still running keep summing them.
            self.metrics.observe_publisher(self.publisher.counters())
        log.info(orjson.dumps({"msg": "gateway stopped", **self.publisher.counters()}).decode())

    # --- requests ------------------------------------------------------------------------------------

    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            check_connect(flow.request.host, flow.request.port)
        except RouteError as exc:
            self._reject(flow, exc)

    @_fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        mode = flow.client_conn.proxy_mode
        try:
            check_request_head(req.data.method, req.data.path, req.data.authority, req.headers.fields,
                               self.hot.max_headers)  # fmt: skip
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
        opts = self.hot
        # Header bytes as latin-1: every byte decodes, nothing a client sends can make this raise.
        fields = [(k.decode("latin-1").lower(), v) for k, v in req.headers.fields]
        first = {name: header_text(value) for name, value in reversed(fields)}
        exchange = Exchange(
            route=route,
            options=RequestOptions(),
            account_id=route.account_id or opts.default_account_id,
            gateway_id=route.gateway_id or opts.default_gateway_id,
            event_id=new_event_id(),
            start=req.timestamp_start,
            method=req.method,
            user_agent=first.get("user-agent"),
            key_fingerprint=key_fingerprint(first.get("authorization"), first.get("x-api-key")),
        )
        flow.metadata[STATE] = exchange
        self.in_flight += 1
        try:
            # The token first: nothing else a client says is taken in before it is known to be allowed.
            exchange.policy = self.config.current.resolve(exchange.account_id, exchange.gateway_id)
            check_gateway_token(first.get("cf-aig-authorization"), exchange.policy.tokens)
            exchange.secrets = self._credentials(fields, exchange.policy)
        except RouteError as exc:
            # Unauthenticated: no event (its account, metadata and cost would all be the client's word);
            # the refusal is counted in cohere_gateway_rejected_total.
            exchange.recorded = False
            self._reject(flow, exc, exchange)
            return
        try:
            check_singletons(name for name, _ in fields)
            exchange.options = parse_request_options(fields, max_custom_cost=opts.max_custom_cost)
            if route.mode == "transparent" and (exchange.options.account_id or exchange.options.gateway_id):
                exchange.account_id = exchange.options.account_id or exchange.account_id
                exchange.gateway_id = exchange.options.gateway_id or exchange.gateway_id
                # the gateway the client names may hold other tokens than the default one
                exchange.policy = self.config.current.resolve(exchange.account_id, exchange.gateway_id)
                try:
                    check_gateway_token(first.get("cf-aig-authorization"), exchange.policy.tokens)
                except RouteError:
                    exchange.recorded = False
                    raise
                exchange.secrets = self._credentials(fields, exchange.policy)
            gwconfig.check_metadata(exchange.options.metadata, exchange.policy)
            exchange.retry = retries.parse_retry_headers(first, exchange.policy.retry)
            api_key = api_key_of(first.get("authorization"), first.get("x-api-key"))
            if exchange.policy.provider_key is not None:
                exchange.key_fingerprint = provider_keys.use(req.headers, exchange.policy)
                api_key = exchange.policy.provider_key.key
            decision = rcache.decide(
                exchange.policy.cache, rcache.parse_cache_headers(first.items()), req.method
            )
            if decision.status is not None:
                status = "BYPASS" if decision.status == "BYPASS" else None
                vary = tuple(first.get(name, "").strip().lower() for name in rcache.VARY_HEADERS)
                exchange.cache = rcache.CacheState(
                    decision.ttl_s, status, decision.client_key, rcache.tenant_of(api_key), vary
                )
            length = first.get("content-length", "")
            if length.isdigit() and int(length) > opts.max_request_bytes:
                raise RouteError(
                    413, f"request body is larger than the gateway's limit of {opts.max_request_bytes} bytes"
                )
            check_content_encoding(first.get("content-encoding"))
        except RouteError as exc:
            self._reject(flow, exc, exchange)
            return
        for name in [k for k in req.headers if k.lower().startswith("cf-aig-")]:
            del req.headers[name]
        up = self.upstream
        # Written to the request's data rather than through its host and port setters: each setter
        # rewrites the Host header and the authority, which host_header below sets once for all. The
        # setters' one other effect, on an absolute-form target's authority, is kept.
        data = req.data
        data.scheme = up.scheme.encode()
        data.host = up.host
        data.port = up.port
        if data.authority:
            req.authority = up.host_header
        req.path = up.prefix + route.path + route.query
        req.host_header = up.host_header

    @staticmethod
    def _credentials(fields: list[tuple[str, bytes]], policy: gwconfig.GatewayPolicy) -> tuple[str, ...]:
        held = (policy.provider_key.key,) if policy.provider_key is not None else ()
        return credentials(fields, (*policy.tokens, *held))

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        exchange: Exchange | None = flow.metadata.get(STATE)
        if exchange is None or flow.response is not None:
            return None
        opts = self.hot
        raw = flow.request.raw_content or b""
        exchange.request_bytes = len(raw)
        if len(raw) > opts.max_request_bytes:
            self._reject(flow, too_large(opts.max_request_bytes), exchange)
            return None
        coding = flow.request.headers.get("content-encoding", "")
        if not raw or is_identity(coding):
            return self._prepare(flow, exchange, raw)
        if len(raw) < DECODE_INLINE_BYTES:
            return self._prepare(flow, exchange, decode_body(raw, coding, opts.max_request_bytes))
        return self._decode_off_loop(flow, exchange, raw, coding)

    async def _decode_off_loop(
        self, flow: http.HTTPFlow, exchange: Exchange, raw: bytes, coding: str
    ) -> None:
        # A compressed body can decode to many times its size: not on the event loop every client shares.
        body = await asyncio.to_thread(decode_body, raw, coding, ctx.options.max_request_bytes)
        pending = self._prepare(flow, exchange, body)
        if pending is not None:
            await pending

    def _prepare(self, flow: http.HTTPFlow, exchange: Exchange, content: bytes) -> Awaitable[None] | None:
        """Read what the request says (model, stream), then look it up in the cache or forward it."""
        headers = flow.request.headers
        if "content-length" not in headers and "transfer-encoding" not in headers:
            # An HTTP/2 request has no framing header; mitmproxy writes it upstream as HTTP/1.1 without
            # one, so its body would be read as the next request. The body is whole here: say its length.
            headers["content-length"] = str(len(flow.request.raw_content or b""))
        body, exchange.model, exchange.stream = request_fields(content or None)
        if exchange.route.mode == "compat" and body is not None and exchange.model:
            provider, slash, name = exchange.model.partition("/")
            if slash and provider != "cohere":
                self._reject(
                    flow,
                    RouteError(
                        400, f"model {exchange.model[:80]!r}: this gateway serves cohere/<model> only"
                    ),
                    exchange,
                )
                return None
            if slash:
                exchange.model = name
                body["model"] = name
                flow.request.content = orjson.dumps(body)
        if body is not None and want_stream_usage(
            exchange.route.api_version, exchange.route.endpoint, exchange.stream, body
        ):
            # Without usage a compat stream cannot be priced: ask for it, and strip it from the answer.
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            flow.request.content = orjson.dumps(body)
            exchange.strip_usage = True
        if exchange.stream:
            # the stream is read as it passes; a compressed one could not be
            flow.request.headers["accept-encoding"] = "identity"
        if exchange.policy.log_payloads and exchange.options.collect_payload:
            exchange.request_body = truncate(
                content.decode("utf-8", "replace"), exchange.policy.payload_max_bytes
            )
        if exchange.policy.rate_limits or exchange.policy.budgets:
            return self._admit(flow, exchange, content, body)
        return self._lookup_or_forward(flow, exchange, content)

    def _lookup_or_forward(
        self, flow: http.HTTPFlow, exchange: Exchange, content: bytes
    ) -> Awaitable[None] | None:
        if exchange.cache is not None and exchange.cache.status is None and self.cache.store is not None:
            return self._cache_lookup(flow, exchange, content)
        if (
            exchange.cache is not None and exchange.cache.status is None
        ):  # no store configured (cache_url=none)
            exchange.cache = None
        return self._forward(flow, exchange)

    def _forward(self, flow: http.HTTPFlow, exchange: Exchange) -> Awaitable[None] | None:
        self.metrics.requests[exchange.route.mode] += 1
        exchange.forwarded_at = time.time()
        pooled = self._pooled(flow, exchange.stream)
        if not (pooled or exchange.retry.active):
            return None
        # A request the pool serves only as its client connection's first: the connection's later
        # requests go upstream on mitmproxy's own connection, so its loopback connection to the relay
        # ends with this answer rather than stay open unused for the client connection's life.
        close = pooled and not exchange.retry.active and self.hot.upstream_pool == "new-connections"
        if not self.relay.port:
            return self._via_relay_started(flow, exchange, close)
        self._via_relay(flow, exchange, close)
        return None

    def _pooled(self, flow: http.HTTPFlow, stream: bool) -> bool:
        """Whether the pool (the relay's shared connections) serves this request (`upstream_pool`,
        `pool_streams`)."""
        mode = self.hot.upstream_pool
        client = flow.client_conn.id
        if mode == "off" or client not in self._counted:  # (a flow of no announced connection: a test's)
            return False
        if stream and not self.hot.pool_streams:
            # mitmproxy's own upstream connection then serves this client connection's later requests too
            self._forwarded_on.add(client)
            return False
        if mode == "always":
            return True
        # A client that sends a second request on its connection keeps it: one handshake on mitmproxy's
        # own upstream connection then serves the rest without the loopback hop.
        if client in self._forwarded_on:
            return False
        self._forwarded_on.add(client)
        return True

    async def _admit(
        self, flow: http.HTTPFlow, exchange: Exchange, content: bytes, body: dict | None
    ) -> None:
        """Count the request against its gateway's rate limits before anything else is done with it;
        over a limit it is answered 429 here and never forwarded (nor served from the cache)."""
        rules = exchange.policy.rate_limits + exchange.policy.budgets
        if self.metrics_dir is not None and not self.limiter.shared:
            # Each worker would count alone, allowing limit x workers: refuse rather than pretend.
            raise RouteError(
                503, "rate limits with --workers > 1 need shared counters: start with --state-url"
            )
        max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
        # The request's own time picks budget periods and sliding windows: its event's start_time, so the
        # read side recomputes each budget from the events alone.
        now = exchange.start
        model = exchange.model or self.pricing.implied_model(
            exchange.route.api_version, exchange.route.endpoint
        )
        ids = [ratelimits.identity(r, exchange.account_id, exchange.gateway_id, exchange.key_fingerprint,
                                   exchange.options.metadata, model, now) for r in rules]  # fmt: skip
        estimates = [self._estimate(exchange, r, model, max_tokens, len(content)) for r in rules]
        verdict = await ratelimits.bounded(self.limiter.admit(rules, ids, estimates, now), "admit")
        if isinstance(verdict, ratelimits.Refusal):
            self.metrics.rejected[429] += 1
            exchange.refusal = "rate_limited"
            headers = {**verdict.headers(time.time()), LOG_ID_HEADER: exchange.event_id}
            flow.response = json_response(429, {"message": verdict.message()}, headers)
            return
        exchange.reservation = verdict
        pending = self._lookup_or_forward(flow, exchange, content)
        if pending is not None:
            await pending

    def _estimate(self, exchange: Exchange, rule: ratelimits.RateRule, model: str | None, max_tokens: Any,
                  size: int) -> int:  # fmt: skip
        """What a request reserves of a rule: 1 request, its worst-case tokens, or their price."""
        if rule.unit != "cost":
            return ratelimits.token_estimate(rule, max_tokens, size)
        usage = Usage(input_tokens=size // 4 + 1, output_tokens=ratelimits.output_estimate(rule, max_tokens))
        cost, _ = compute_cost(
            self.pricing,
            exchange.route.endpoint,
            model,
            usage,
            exchange.options.custom_cost,
            at=utc_from_timestamp(exchange.start),
        )
        if cost is None:  # a spend limit cannot hold what it cannot price: refused, not let through free
            raise RouteError(
                422,
                f"this gateway limits spend and the cost of model {(model or '')[:80]!r} is unknown (not in "
                "the pricing table); send cf-aig-custom-cost or use a priced model",
            )
        return math.ceil(cost * ratelimits.MICRO)

    def _settle(self, exchange: Exchange) -> None:
        """Token reservations become the billed usage (an error, a refusal or a cache hit bills none)."""
        reservation = exchange.reservation
        if reservation is None or not reservation.held or exchange.ending is None:
            return
        usage = exchange.ending.extracted.usage
        billed: int | None = 0
        hit = exchange.cache is not None and exchange.cache.status == "HIT"
        if 200 <= exchange.ending.status < 400 and not hit:
            counts = (usage.input_tokens, usage.output_tokens)
            billed = None if counts == (None, None) else sum(c or 0 for c in counts)
        cost: float | None = None
        if any(rule.unit == "cost" for rule, _, _ in reservation.held):
            cost = build_event(exchange, self.pricing).cost_usd  # priced exactly as its event
        task = asyncio.get_running_loop().create_task(self._settle_now(reservation, billed, cost))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_now(
        self, reservation: ratelimits.Reservation, billed: int | None, cost: float | None
    ) -> None:
        try:
            await ratelimits.bounded(self.limiter.settle(reservation, billed, cost), "settle")
        except Exception as exc:  # the reservation stands: counted as estimated, never lost
            log.error("settling a token reservation failed (%s)", type(exc).__name__)

    async def _via_relay_started(self, flow: http.HTTPFlow, exchange: Exchange, close: bool) -> None:
        try:
            await self.relay.start()
        except RelayStartError:
            # Not forwarded: the hook answers 500 (fail closed). Sent on as it stands, mitmproxy would
            # take it upstream itself, without the timeout and retries it asked for.
            exchange.forwarded_at = None
            raise
        self._via_relay(flow, exchange, close)

    def _via_relay(self, flow: http.HTTPFlow, exchange: Exchange, close: bool) -> None:
        """mitmproxy sends this request to the relay (addons/relay.py), which makes the attempts."""
        exchange.ticket = Ticket(self.upstream, exchange.retry, exchange.stream, close=close)
        exchange.relay_token = self.relay.register(exchange.ticket)
        req = flow.request
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.relay.port
        req.host_header = self.upstream.host_header
        req.headers[RELAY_HEADER] = exchange.relay_token

    async def _cache_lookup(self, flow: http.HTTPFlow, exchange: Exchange, body: bytes) -> None:
        try:
            await self._serve_cached(flow, exchange, body)
        except Exception as exc:  # a bug in the cache must cost its saving, never the request
            if exchange.cache is not None and exchange.cache.leader:
                self.cache.finish(exchange.cache.key or "", None)
            exchange.cache = None
            flow.response = None
            if isinstance(exc, RelayStartError) or exchange.forwarded_at is not None:
                raise  # forwarding failed, not the cache: answered 500 by the hook, never sent on as is
            log.exception("cache lookup failed (event %s); forwarding", exchange.event_id)
            pending = self._forward(flow, exchange)
            if pending is not None:
                await pending

    async def _serve_cached(self, flow: http.HTTPFlow, exchange: Exchange, body: bytes) -> None:
        cache_state = exchange.cache
        assert cache_state is not None
        cache_state.key = rcache.cache_key(
            account_id=exchange.account_id,
            gateway_id=exchange.gateway_id,
            tenant=cache_state.tenant,
            path=exchange.route.path,
            query=exchange.route.query,
            model=exchange.model,
            body=body,
            vary=cache_state.vary,
            client_key=cache_state.client_key,
        )
        cache_state.status, entry, cache_state.leader = await self.cache.get_or_lead(cache_state.key)
        self.cache.counters[cache_state.status.lower()] += 1
        if entry is None:
            cache_state.chunks = [] if cache_state.leader else None
            pending = self._forward(flow, exchange)
            if pending is not None:
                await pending
            return
        cache_state.entry = entry
        fields = [*entry.headers, (rcache.STATUS_HEADER, "HIT"), (LOG_ID_HEADER, exchange.event_id)]
        fields.append((OVERHEAD_HEADER, _header_ms(exchange.hand_on(time.time()))))
        replay = http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields])
        content = entry.body
        if exchange.strip_usage and "event-stream" in replay.get("content-type", ""):
            # the entry is upstream's answer to the usage the gateway asked for; the client did not
            stripper = UsageStripper()
            content = stripper.feed(content) + stripper.flush()
        flow.response = http.Response.make(entry.status, content, replay)

    # --- responses -----------------------------------------------------------------------------------

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if exchange is None or resp is None or exchange.forwarded_at is None:
            return
        if exchange.ticket is not None:
            # The loopback hop's own: the relay's `Connection: close` ends mitmproxy's connection to the
            # relay (the relay closes it), never the client's.
            resp.headers.pop("connection", None)
            if resp.headers.pop(RELAY_ANSWER_HEADER, None) is not None and exchange.ticket.failure is None:
                exchange.ticket.refused = True  # the relay's own refusal, not the upstream's answer
        resp.headers[LOG_ID_HEADER] = exchange.event_id
        resp.headers[ATTEMPTS_HEADER] = str(
            len(exchange.ticket.attempts) if exchange.ticket is not None else 1
        )
        if exchange.cache is not None and exchange.cache.status is not None:
            resp.headers[rcache.STATUS_HEADER] = exchange.cache.status
        if not is_stream_response(resp.headers.get("content-type", ""), exchange.stream) or resp.headers.get(
            "content-encoding", "identity"
        ) not in ("identity", ""):
            return
        fmt = "sse" if "event-stream" in resp.headers.get("content-type", "") else "ndjson"
        watcher = exchange.watcher = StreamWatcher(exchange.route.api_version, exchange.route.endpoint, fmt)
        keep = exchange.policy.log_payloads and exchange.options.collect_payload
        limit = exchange.policy.payload_max_bytes
        cached = exchange.cache if exchange.cache is not None and exchange.cache.leader else None
        if keep:
            exchange.response_payload = []

        stripper = UsageStripper() if exchange.strip_usage and fmt == "sse" else None

        def tap(chunk: bytes) -> bytes | list[bytes]:
            # The client's stream must not break on a bug in watching it: what was seen stays counted.
            try:
                watch(chunk)
                if stripper is None:
                    return chunk
                if not chunk:
                    return stripper.flush()
                # a list, because an empty bytes chunk would end the client's response
                out = stripper.feed(chunk)
                return [out] if out else []
            except Exception as exc:
                resp.stream = True
                self.metrics.hook_errors["stream"] += 1
                log.error(
                    "internal error watching a stream (%s); passing it on unwatched", type(exc).__name__
                )
                # what the stripper held back goes on first, so the stream stays whole
                return (stripper.flush() if stripper is not None else b"") + chunk

        def watch(chunk: bytes) -> None:
            if chunk:
                watcher.feed(chunk)
                if cached is not None:
                    cached.collect(chunk, exchange.policy.cache.max_entry_bytes)
                if keep and exchange.payload_kept < limit:
                    exchange.response_payload.append(chunk[: limit - exchange.payload_kept])  # type: ignore[union-attr]
                    exchange.payload_kept += len(chunk)
                if watcher.complete and not exchange.finished:
                    # Published before the last chunk goes on: an SDK returns at `[DONE]`, and a crash
                    # right after must not lose an exchange the client saw complete.
                    self._finish_stream(flow, exchange, time.time())

        resp.stream = tap
        # a stream's headers go on now: what the gateway spends on its chunks is not in this number
        resp.headers[OVERHEAD_HEADER] = _header_ms(exchange.hand_on(time.time(), resp.timestamp_start))

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if exchange is not None and exchange.cache is not None and exchange.cache.leader and resp is not None:
            try:
                self._cache_store(exchange, resp)
            except Exception:  # never at the cost of the client's answer or its event
                log.exception("storing the answer failed (event %s)", exchange.event_id)
                self.cache.finish(exchange.cache.key or "", None)
        if exchange is None or exchange.finished or resp is None:
            return
        if exchange.failed_hook is not None:
            # responseheaders raised; the response was buffered, not streamed
            raise RuntimeError(f"{exchange.failed_hook} failed")
        now = time.time()
        if exchange.forwarded_at is None and exchange.cache is not None and exchange.cache.status == "HIT":
            self._finish_hit(exchange, resp, now)
            return
        if exchange.forwarded_at is None:  # answered by the gateway itself
            ending = Ending(
                resp.status_code,
                "gateway_error",
                exchange.refusal or "gateway_rejected",
                now,
                error_message=_message_of(resp),
            )
            self._finish(exchange, ending)
            return
        if exchange.watcher is not None:
            self._finish_stream(flow, exchange, now)
            return
        outcome, error_type = classify_status(resp.status_code)
        payload: str | None = None
        size = len(resp.raw_content or b"")
        try:
            content = resp.content
        except ValueError:  # undecodable content-encoding: we learn nothing, the client still gets it
            content = None
        extracted = extract_body(exchange.route.api_version, exchange.route.endpoint, content)
        if exchange.policy.log_payloads and exchange.options.collect_payload and content is not None:
            payload = truncate(content.decode("utf-8", "replace"), exchange.policy.payload_max_bytes)
        # cf-aig-log-id was set in responseheaders; only now is the gateway's own time known
        resp.headers[OVERHEAD_HEADER] = _header_ms(exchange.hand_on(now, resp.timestamp_end or now))
        ending = Ending(
            resp.status_code,
            outcome,
            error_type,
            now,
            extracted,
            response_start=_response_start(exchange, resp),
            response_bytes=size,
            response_body=payload,
        )
        self._finish(exchange, ending)

    def _finish_stream(self, flow: http.HTTPFlow, exchange: Exchange, now: float) -> None:
        resp = flow.response
        assert resp is not None and exchange.watcher is not None
        outcome, error_type = classify_status(resp.status_code)
        exchange.watcher.finish()
        if outcome == "ok" and exchange.watcher.stream_error:
            outcome, error_type = "upstream_error", "stream_error"
        payload: str | None = None
        if exchange.response_payload is not None:
            payload = truncate(
                b"".join(exchange.response_payload).decode("utf-8", "replace"),
                exchange.policy.payload_max_bytes,
            )
        ending = Ending(
            resp.status_code,
            outcome,
            error_type,
            now,
            exchange.watcher.extracted,
            response_start=_response_start(exchange, resp),
            response_bytes=exchange.watcher.bytes_seen,
            response_body=payload,
        )
        self._finish(exchange, ending)

    @_fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(STATE)
        if (
            exchange is not None and exchange.cache is not None and exchange.cache.leader
        ):  # a cut answer is never stored
            exchange.cache.leader = False
            self.cache.finish(exchange.cache.key or "", None)
        if exchange is None or exchange.finished:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        resp = flow.response
        outcome, error_type = classify_proxy_error(msg, resp is not None)
        extracted = Extracted()
        if exchange.watcher is not None:
            exchange.watcher.finish()
            extracted = exchange.watcher.extracted
        if exchange.forwarded_at is None and outcome != "client_aborted":
            outcome, error_type = "gateway_error", "proxy_error"
        ending = Ending(
            resp.status_code if resp is not None else 0,
            outcome,
            error_type,
            time.time(),
            extracted,
            response_start=resp.timestamp_start if resp is not None else None,
            response_bytes=exchange.watcher.bytes_seen if exchange.watcher else 0,
            error_message=msg,
        )
        self._finish(exchange, ending)

    # --- the response cache --------------------------------------------------------------------------

    def _cache_store(self, exchange: Exchange, resp: http.Response) -> None:
        """The leader's complete answer: store it if it is a whole 2xx, release the followers either way."""
        cache_state = exchange.cache
        assert cache_state is not None and cache_state.key is not None
        cache_state.leader = False
        entry = None
        if exchange.watcher is not None:
            watcher = exchange.watcher
            done = (
                watcher.ended
                and watcher.extracted.error_message is None
                and watcher.extracted.finish_reason != "ERROR"
            )
            body = b"".join(cache_state.chunks) if cache_state.chunks is not None and done else None
        else:
            try:
                body = resp.content
            except ValueError:  # undecodable content-encoding
                body = None
        if body is not None and rcache.storable(resp.status_code, len(body), exchange.policy.cache):
            entry = rcache.make_entry(
                resp.status_code, resp.headers.items(), body, cache_state.ttl_s, time.time()
            )
        self.cache.finish(cache_state.key, entry)

    def _finish_hit(self, exchange: Exchange, resp: http.Response, now: float) -> None:
        # upstream's bytes as stored, as a miss's event sees them (with the usage a stripped stream saved)
        assert exchange.cache is not None and exchange.cache.entry is not None
        body = exchange.cache.entry.body
        ctype = resp.headers.get("content-type", "")
        if is_stream_response(ctype, exchange.stream):
            watcher = StreamWatcher(
                exchange.route.api_version,
                exchange.route.endpoint,
                "sse" if "event-stream" in ctype else "ndjson",
            )
            watcher.feed(body)
            watcher.finish()
            extracted = watcher.extracted
        else:
            extracted = extract_body(exchange.route.api_version, exchange.route.endpoint, body)
        payload = None
        if exchange.policy.log_payloads and exchange.options.collect_payload:
            payload = truncate(body.decode("utf-8", "replace"), exchange.policy.payload_max_bytes)
        ending = Ending(
            resp.status_code, "ok", None, now, extracted, response_bytes=len(body), response_body=payload
        )
        self._finish(exchange, ending)

    # --- helpers -------------------------------------------------------------------------------------

    def _finish(self, exchange: Exchange, ending: Ending) -> None:
        """The one place an exchange ends: its token reservation settled, counted, its event published."""
        exchange.ending = ending
        self.in_flight -= 1
        if exchange.relay_token is not None:
            self.relay.discard(exchange.relay_token)
        self._settle(exchange)
        if (
            exchange.ticket is not None
            and exchange.ticket.failure is not None
            and ending.outcome != "client_aborted"
        ):
            # The relay answered itself (504/502): no attempt got an answer from upstream.
            ending.outcome, ending.error_type, ending.status = retries.failure_outcome(
                exchange.ticket.failure
            )
        elif exchange.ticket is not None and exchange.ticket.refused and ending.outcome != "client_aborted":
            # The relay refused the gateway's own request (at its connection limit, ...): the gateway's
            # failure, never the upstream's.
            ending.outcome, ending.error_type = "gateway_error", "relay_refused"
        outcome = ending.outcome
        self.metrics.exchanges[outcome] += 1
        if not exchange.recorded:  # refused before authentication: counted in rejected, nothing stored
            return
        if not exchange.options.collect_log and exchange.policy.allow_log_opt_out:
            self.metrics.events_skipped.inc()
            return
        try:
            event = build_event(exchange, self.pricing)
            value = fit_event(event)
            if value is None:
                self.metrics.events_oversize.inc()
                log.error("event %s is too large to deliver even without bodies; dropped", exchange.event_id)
                return
            self.publisher.publish(f"{exchange.account_id}/{exchange.gateway_id}".encode(), value)
        except Exception:  # a bug here must cost an event, never the client's response
            log.exception("building the event failed (event %s)", exchange.event_id)
            return
        if outcome != "ok":
            log.info(
                orjson.dumps(
                    {
                        "msg": "exchange",
                        "event_id": exchange.event_id,
                        "account_id": exchange.account_id,
                        "gateway_id": exchange.gateway_id,
                        "path": exchange.route.path[:256],
                        "status": ending.status,
                        "outcome": outcome,
                        "error_type": ending.error_type,
                    }
                ).decode()
            )

    async def _await_guarded(self, flow: http.HTTPFlow, hook: str, result: Any) -> None:
        try:
            await result
        except Exception as exc:
            self._hook_failed(flow, hook, exc)

    def _hook_failed(self, flow: http.HTTPFlow, hook: str, exc: Exception) -> None:
        """Fail closed: a refusal raised from deep inside is a refusal; anything else is the gateway's own
        bug, answered 500 and recorded, and the request is not forwarded as it stood."""
        exchange: Exchange | None = flow.metadata.get(STATE)
        if isinstance(exc, RouteError) and (exchange is None or exchange.forwarded_at is None):
            self._reject(flow, exc, exchange)
            return
        self.metrics.hook_errors[hook] += 1
        # The type and hook only: an exception's text can quote the client's bytes (or its secrets).
        log.error("internal error in the %s hook (%s); answered 500", hook, type(exc).__name__,
                  exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
        try:
            self._answer_internal_error(flow, hook, exc, exchange)
        except Exception:  # last resort: cut the connection rather than let the flow go on
            log.error("could not answer the internal error of the %s hook; killing the flow", hook)
            if flow.killable:
                flow.kill()

    def _answer_internal_error(
        self, flow: http.HTTPFlow, hook: str, exc: Exception, exchange: Exchange | None
    ) -> None:
        if hook == "responseheaders":
            # The body is still to come; streaming is not set up, so it is buffered and `response`,
            # seeing the failure, answers the 500 in its place.
            if exchange is not None:
                exchange.failed_hook = hook
            return
        message = f"the gateway failed while handling this request ({hook}); it was not forwarded"
        if exchange is not None and exchange.forwarded_at is not None:
            message = f"the gateway failed while handling the response ({hook})"
        headers = {LOG_ID_HEADER: exchange.event_id} if exchange is not None else {}
        if hook != "error":
            flow.response = json_response(500, {"message": message}, headers)
        if exchange is not None and not exchange.finished:
            exchange.options = RequestOptions(collect_log=exchange.options.collect_log)
            message = f"internal error in the gateway's {hook} hook ({type(exc).__name__})"
            self._finish(
                exchange,
                Ending(500, "gateway_error", "gateway_internal_error", time.time(), error_message=message),
            )

    def _reject(self, flow: http.HTTPFlow, exc: RouteError, exchange: Exchange | None = None) -> None:
        self.metrics.rejected[exc.status] += 1
        if exchange is not None:
            # What a refused request claims (metadata, custom cost, its own event id) is not recorded:
            # the event says only what the gateway knows.
            exchange.options = RequestOptions(collect_log=exchange.options.collect_log)
        headers = {LOG_ID_HEADER: exchange.event_id} if exchange is not None else {}
        flow.response = json_response(exc.status, {"message": exc.message}, headers)
        if exchange is None:
            log.info(orjson.dumps({"msg": "rejected", "status": exc.status, "reason": exc.message}).decode())

    def _serve_local(self, flow: http.HTTPFlow, route: LocalRoute) -> None:
        opts = ctx.options
        trusted = True
        if opts.gateway_token and opts.protect_local_endpoints:
            presented = flow.request.headers.fields
            auth = next((v for k, v in presented if k.lower() == b"cf-aig-authorization"), None)
            try:
                check_gateway_token(header_text(auth) if auth is not None else None, (opts.gateway_token,))
            except RouteError as exc:
                if route.path != "/healthz":
                    self._reject(flow, exc)
                    return
                trusted = False
        if not trusted:  # health checks need no token; what the gateway runs and counts does
            flow.response = json_response(200, {"status": "ok"})
            return
        if route.path == "/metrics":
            self.metrics.observe_publisher(self.publisher.counters())
            flow.response = http.Response.make(200, self.metrics.render(), {"content-type": CONTENT_TYPE})
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


def _response_start(exchange: Exchange, resp: http.Response) -> float | None:
    """When the upstream's response headers arrived: on the relay path the relay's record of it, because
    the relay passes a non-stream answer on only once it is whole."""
    if exchange.ticket is not None and exchange.ticket.response_start is not None:
        return exchange.ticket.response_start
    return resp.timestamp_start


def _message_of(resp: http.Response) -> str | None:
    """The message of an answer the gateway made itself (never an upstream body)."""
    try:
        body = orjson.loads(resp.raw_content or b"")
    except orjson.JSONDecodeError:
        return None
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else None
