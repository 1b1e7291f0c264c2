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
import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # loaded by path (`mitmdump -s addons/gateway.py`) from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson
from mitmproxy import ctx, http
from mitmproxy.proxy.mode_specs import RegularMode, ReverseMode

from addons import cache as rcache
from addons import gateway_config as gwconfig
from addons import mitmproxy_seam, provider_keys, ratelimits, retries
from addons.bodies import DECODE_INLINE_BYTES, check_content_encoding, decode_body, is_identity, too_large
from addons.capture import Ending, Exchange, build_event, fit_event
from addons.delivery import DELIVERY_OPTIONS, DeliveryConfig, default_spool_dir
from addons.headers import (
    SECRET_HEADERS,
    RequestOptions,
    api_key_of,
    check_gateway_token,
    check_request_head,
    check_singletons,
    header_text,
    key_fingerprint,
    parse_request_options,
)
from addons.metrics import CONTENT_TYPE, Metrics
from addons.outcomes import classify_proxy_error, classify_status
from addons.pricing import DEFAULT_PRICING, compute_cost, load_pricing
from addons.publish import NullPublisher, Publisher
from addons.relay import RELAY_HEADER, Relay, Ticket
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
from cohere_gateway.events import Usage, new_event_id, truncate, utc_from_timestamp

log = logging.getLogger("cohere_gateway.gateway")

STATE = "cohere_gateway"  # key of the Exchange in flow.metadata
SECRET_HEADER_BYTES = frozenset(name.encode() for name in SECRET_HEADERS)
OVERHEAD_HEADER = "x-cohere-gateway-overhead-ms"
LOG_ID_HEADER = "cf-aig-log-id"
ATTEMPTS_HEADER = "x-cohere-gateway-attempts"


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
    *settings.addon_options(
        "upstream",
        "kafka_bootstrap",
        "topic",
        "default_account_id",
        "default_gateway_id",
        "gateway_token",
        "max_request_bytes",
        "max_header_bytes",
        "max_headers",
        "max_connections",
        "idle_timeout_s",
        "header_timeout_s",
        "allow_http2",
        "max_custom_cost",
        "protect_local_endpoints",
        "log_payloads",
        "payload_max_bytes",
    ),
    *DELIVERY_OPTIONS,
    *settings.option_specs(settings.ProxySettings, "config", "cache_ttl", "cache_url", "cache_max_bytes"),
    *settings.option_specs(settings.ProxySettings, "state_url"),
)
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
        self.config = gwconfig.ConfigWatcher(None, gwconfig.GatewayPolicy(), self.metrics.config)
        self.cache = rcache.ResponseCache(None, self.metrics.cache)
        self._watching: asyncio.Task[None] | None = None
        self.relay = Relay()  # makes the upstream call for requests with a timeout or retries
        self.limiter = ratelimits.RateLimiter()
        self._settling: set[asyncio.Task[None]] = set()
        self.hot = HotOptions.of(settings.ProxySettings())  # until the first configure()

    # --- configuration -------------------------------------------------------------------------------

    def load(self, loader) -> None:  # loader: mitmproxy.addonmanager.Loader
        for name, kind, help_text in OPTIONS:
            loader.add_option(name, kind, _opt_default(name), help_text)
        # mitmproxy has no hook for the error pages it writes itself: every error this process sends is
        # JSON only through this seam.
        mitmproxy_seam.install_error_pages(json_error_page, json_error_body)
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
        if updated & {"kafka_bootstrap", "topic", *(name for name, _, _ in DELIVERY_OPTIONS)}:
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

        conf = Path(opts.confdir).expanduser()
        directory = (conf.parent if conf.name == "mitmproxy" else conf) / "cache"
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
            spool_dir = default_spool_dir(ctx.options.confdir)
            return SidecarPublisher(
                DeliveryConfig.from_options(ctx.options, spool_dir),
                grace_s=ctx.options.shutdown_grace_s,
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
        x = Exchange(
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
        flow.metadata[STATE] = x
        self.in_flight += 1
        try:
            # The token first: nothing else a client says is taken in before it is known to be allowed.
            x.policy = self.config.current.resolve(x.account_id, x.gateway_id)
            check_gateway_token(first.get("cf-aig-authorization"), x.policy.tokens)
        except RouteError as exc:
            # Unauthenticated: no event (its account, metadata and cost would all be the client's word);
            # the refusal is counted in cohere_gateway_rejected_total.
            x.recorded = False
            self._reject(flow, exc, x)
            return
        try:
            check_singletons(name for name, _ in fields)
            x.options = parse_request_options(fields, max_custom_cost=opts.max_custom_cost)
            if route.mode == "transparent" and (x.options.account_id or x.options.gateway_id):
                x.account_id = x.options.account_id or x.account_id
                x.gateway_id = x.options.gateway_id or x.gateway_id
                # the gateway the client names may hold other tokens than the default one
                x.policy = self.config.current.resolve(x.account_id, x.gateway_id)
                try:
                    check_gateway_token(first.get("cf-aig-authorization"), x.policy.tokens)
                except RouteError:
                    x.recorded = False
                    raise
            gwconfig.check_metadata(x.options.metadata, x.policy)
            x.retry = retries.parse_retry_headers(first, x.policy.retry)
            api_key = api_key_of(first.get("authorization"), first.get("x-api-key"))
            if x.policy.provider_key is not None:
                x.key_fingerprint = provider_keys.use(req.headers, x.policy)
                api_key = x.policy.provider_key.key
            decision = rcache.decide(x.policy.cache, rcache.parse_cache_headers(first.items()), req.method)
            if decision.status is not None:
                status = "BYPASS" if decision.status == "BYPASS" else None
                vary = tuple(first.get(name, "").strip().lower() for name in rcache.VARY_HEADERS)
                x.cache = rcache.CacheState(
                    decision.ttl_s, status, decision.client_key, rcache.tenant_of(api_key), vary
                )
            length = first.get("content-length", "")
            if length.isdigit() and int(length) > opts.max_request_bytes:
                raise RouteError(
                    413, f"request body is larger than the gateway's limit of {opts.max_request_bytes} bytes"
                )
            check_content_encoding(first.get("content-encoding"))
        except RouteError as exc:
            self._reject(flow, exc, x)
            return
        for name in [k for k in req.headers if k.lower().startswith("cf-aig-")]:
            del req.headers[name]
        up = self.upstream
        req.scheme = up.scheme
        req.host = up.host
        req.port = up.port
        req.path = up.prefix + route.path + route.query
        req.host_header = up.host_header

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        x: Exchange | None = flow.metadata.get(STATE)
        if x is None or flow.response is not None:
            return None
        opts = self.hot
        raw = flow.request.raw_content or b""
        x.request_bytes = len(raw)
        if len(raw) > opts.max_request_bytes:
            self._reject(flow, too_large(opts.max_request_bytes), x)
            return None
        coding = flow.request.headers.get("content-encoding", "")
        if not raw or is_identity(coding):
            return self._prepare(flow, x, raw)
        if len(raw) < DECODE_INLINE_BYTES:
            return self._prepare(flow, x, decode_body(raw, coding, opts.max_request_bytes))
        return self._decode_off_loop(flow, x, raw, coding)

    async def _decode_off_loop(self, flow: http.HTTPFlow, x: Exchange, raw: bytes, coding: str) -> None:
        # A compressed body can decode to many times its size: not on the event loop every client shares.
        body = await asyncio.to_thread(decode_body, raw, coding, ctx.options.max_request_bytes)
        pending = self._prepare(flow, x, body)
        if pending is not None:
            await pending

    def _prepare(self, flow: http.HTTPFlow, x: Exchange, content: bytes) -> Awaitable[None] | None:
        """Read what the request says (model, stream), then look it up in the cache or forward it."""
        headers = flow.request.headers
        if "content-length" not in headers and "transfer-encoding" not in headers:
            # An HTTP/2 request has no framing header; mitmproxy writes it upstream as HTTP/1.1 without
            # one, so its body would be read as the next request. The body is whole here: say its length.
            headers["content-length"] = str(len(flow.request.raw_content or b""))
        body, x.model, x.stream = request_fields(content or None)
        if x.route.mode == "compat" and body is not None and x.model:
            provider, slash, name = x.model.partition("/")
            if slash and provider != "cohere":
                self._reject(
                    flow,
                    RouteError(400, f"model {x.model[:80]!r}: this gateway serves cohere/<model> only"),
                    x,
                )
                return None
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
        if x.policy.log_payloads and x.options.collect_payload:
            x.request_body = truncate(content.decode("utf-8", "replace"), x.policy.payload_max_bytes)
            x.secrets = tuple(
                s
                for s in (
                    *x.policy.tokens,
                    *(header_text(v).partition(" ")[2].strip() or header_text(v) for k, v in
                      flow.request.headers.fields if k.lower() in SECRET_HEADER_BYTES),
                )
                if s
            )  # fmt: skip
        if x.policy.rate_limits or x.policy.budgets:
            return self._admit(flow, x, content, body)
        return self._lookup_or_forward(flow, x, content)

    def _lookup_or_forward(self, flow: http.HTTPFlow, x: Exchange, content: bytes) -> Awaitable[None] | None:
        if x.cache is not None and x.cache.status is None and self.cache.store is not None:
            return self._cache_lookup(flow, x, content)
        if x.cache is not None and x.cache.status is None:  # no store configured (cache_url=none)
            x.cache = None
        return self._forward(flow, x)

    def _forward(self, flow: http.HTTPFlow, x: Exchange) -> Awaitable[None] | None:
        self.metrics.requests[x.route.mode] += 1
        x.forwarded_at = time.time()
        if not x.retry.active:
            return None
        if not self.relay.port:
            return self._via_relay_started(flow, x)
        self._via_relay(flow, x)
        return None

    async def _admit(self, flow: http.HTTPFlow, x: Exchange, content: bytes, body: dict | None) -> None:
        """Count the request against its gateway's rate limits before anything else is done with it;
        over a limit it is answered 429 here and never forwarded (nor served from the cache)."""
        rules = x.policy.rate_limits + x.policy.budgets
        if self.metrics_dir is not None and not self.limiter.shared:
            # Each worker would count alone, allowing limit x workers: refuse rather than pretend.
            raise RouteError(
                503, "rate limits with --workers > 1 need shared counters: start with --state-url"
            )
        max_tokens = body.get("max_tokens") if isinstance(body, dict) else None
        # The request's own time picks budget periods and sliding windows: its event's start_time, so the
        # read side recomputes each budget from the events alone.
        now = x.start
        model = x.model or self.pricing.implied_model(x.route.api_version, x.route.endpoint)
        ids = [ratelimits.identity(r, x.account_id, x.gateway_id, x.key_fingerprint, x.options.metadata,
                                   model, now) for r in rules]  # fmt: skip
        estimates = [self._estimate(x, r, model, max_tokens, len(content)) for r in rules]
        verdict = await ratelimits.bounded(self.limiter.admit(rules, ids, estimates, now), "admit")
        if isinstance(verdict, ratelimits.Refusal):
            self.metrics.rejected[429] += 1
            x.refusal = "rate_limited"
            headers = {**verdict.headers(time.time()), LOG_ID_HEADER: x.event_id}
            flow.response = json_response(429, {"message": verdict.message()}, headers)
            return
        x.reservation = verdict
        pending = self._lookup_or_forward(flow, x, content)
        if pending is not None:
            await pending

    def _estimate(self, x: Exchange, rule: ratelimits.RateRule, model: str | None, max_tokens: Any,
                  size: int) -> int:  # fmt: skip
        """What a request reserves of a rule: 1 request, its worst-case tokens, or their price."""
        if rule.unit != "cost":
            return ratelimits.token_estimate(rule, max_tokens, size)
        usage = Usage(input_tokens=size // 4 + 1, output_tokens=ratelimits.output_estimate(rule, max_tokens))
        cost, _ = compute_cost(self.pricing, x.route.endpoint, model, usage, x.options.custom_cost,
                               at=utc_from_timestamp(x.start))  # fmt: skip
        if cost is None:  # a spend limit cannot hold what it cannot price: refused, not let through free
            raise RouteError(
                422,
                f"this gateway limits spend and the cost of model {(model or '')[:80]!r} is unknown (not in "
                "the pricing table); send cf-aig-custom-cost or use a priced model",
            )
        return math.ceil(cost * ratelimits.MICRO)

    def _settle(self, x: Exchange) -> None:
        """Token reservations become the billed usage (an error, a refusal or a cache hit bills none)."""
        reservation = x.reservation
        if reservation is None or not reservation.held or x.ending is None:
            return
        usage = x.ending.extracted.usage
        billed: int | None = 0
        hit = x.cache is not None and x.cache.status == "HIT"
        if 200 <= x.ending.status < 400 and not hit:
            counts = (usage.input_tokens, usage.output_tokens)
            billed = None if counts == (None, None) else sum(c or 0 for c in counts)
        cost: float | None = None
        if any(rule.unit == "cost" for rule, _, _ in reservation.held):
            cost = build_event(x, self.pricing).cost_usd  # priced exactly as its event
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

    async def _via_relay_started(self, flow: http.HTTPFlow, x: Exchange) -> None:
        await self.relay.start()
        self._via_relay(flow, x)

    def _via_relay(self, flow: http.HTTPFlow, x: Exchange) -> None:
        """mitmproxy sends this request to the relay (addons/relay.py), which makes the attempts."""
        x.ticket = Ticket(self.upstream, x.retry, x.stream)
        x.relay_token = self.relay.register(x.ticket)
        req = flow.request
        req.scheme, req.host, req.port = "http", "127.0.0.1", self.relay.port
        req.host_header = self.upstream.host_header
        req.headers[RELAY_HEADER] = x.relay_token

    async def _cache_lookup(self, flow: http.HTTPFlow, x: Exchange, body: bytes) -> None:
        try:
            await self._serve_cached(flow, x, body)
        except Exception:  # a bug in the cache must cost its saving, never the request
            log.exception("cache lookup failed (event %s); forwarding", x.event_id)
            if x.cache is not None and x.cache.leader:
                self.cache.finish(x.cache.key or "", None)
            x.cache = None
            flow.response = None
            if x.forwarded_at is None:
                pending = self._forward(flow, x)
                if pending is not None:
                    await pending

    async def _serve_cached(self, flow: http.HTTPFlow, x: Exchange, body: bytes) -> None:
        c = x.cache
        assert c is not None
        c.key = rcache.cache_key(
            account_id=x.account_id,
            gateway_id=x.gateway_id,
            tenant=c.tenant,
            path=x.route.path,
            query=x.route.query,
            model=x.model,
            body=body,
            vary=c.vary,
            client_key=c.client_key,
        )
        c.status, entry, c.leader = await self.cache.get_or_lead(c.key)
        self.cache.counters[c.status.lower()] += 1
        if entry is None:
            c.chunks = [] if c.leader else None
            pending = self._forward(flow, x)
            if pending is not None:
                await pending
            return
        c.entry = entry
        fields = [*entry.headers, (rcache.STATUS_HEADER, "HIT"), (LOG_ID_HEADER, x.event_id)]
        fields.append((OVERHEAD_HEADER, _header_ms(x.hand_on(time.time()))))
        replay = http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields])
        content = entry.body
        if x.strip_usage and "event-stream" in replay.get("content-type", ""):
            # the entry is upstream's answer to the usage the gateway asked for; the client did not
            stripper = UsageStripper()
            content = stripper.feed(content) + stripper.flush()
        flow.response = http.Response.make(entry.status, content, replay)

    # --- responses -----------------------------------------------------------------------------------

    @_fail_closed
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if x is None or resp is None or x.forwarded_at is None:
            return
        resp.headers[LOG_ID_HEADER] = x.event_id
        resp.headers[ATTEMPTS_HEADER] = str(len(x.ticket.attempts) if x.ticket is not None else 1)
        if x.cache is not None and x.cache.status is not None:
            resp.headers[rcache.STATUS_HEADER] = x.cache.status
        if not is_stream_response(resp.headers.get("content-type", ""), x.stream) or resp.headers.get(
            "content-encoding", "identity"
        ) not in ("identity", ""):
            return
        fmt = "sse" if "event-stream" in resp.headers.get("content-type", "") else "ndjson"
        watcher = x.watcher = StreamWatcher(x.route.api_version, x.route.endpoint, fmt)
        keep = x.policy.log_payloads and x.options.collect_payload
        limit = x.policy.payload_max_bytes
        cached = x.cache if x.cache is not None and x.cache.leader else None
        if keep:
            x.response_payload = []

        stripper = UsageStripper() if x.strip_usage and fmt == "sse" else None

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
                    cached.collect(chunk, x.policy.cache.max_entry_bytes)
                if keep and x.payload_kept < limit:
                    x.response_payload.append(chunk[: limit - x.payload_kept])  # type: ignore[union-attr]
                    x.payload_kept += len(chunk)
                if watcher.complete and not x.finished:
                    # Published before the last chunk goes on: an SDK returns at `[DONE]`, and a crash
                    # right after must not lose an exchange the client saw complete.
                    self._finish_stream(flow, x, time.time())

        resp.stream = tap
        # a stream's headers go on now: what the gateway spends on its chunks is not in this number
        resp.headers[OVERHEAD_HEADER] = _header_ms(x.hand_on(time.time(), resp.timestamp_start))

    @_fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        resp = flow.response
        if x is not None and x.cache is not None and x.cache.leader and resp is not None:
            try:
                self._cache_store(x, resp)
            except Exception:  # never at the cost of the client's answer or its event
                log.exception("storing the answer failed (event %s)", x.event_id)
                self.cache.finish(x.cache.key or "", None)
        if x is None or x.finished or resp is None:
            return
        if x.failed_hook is not None:  # responseheaders raised; the response was buffered, not streamed
            raise RuntimeError(f"{x.failed_hook} failed")
        now = time.time()
        if x.forwarded_at is None and x.cache is not None and x.cache.status == "HIT":
            self._finish_hit(x, resp, now)
            return
        if x.forwarded_at is None:  # answered by the gateway itself
            ending = Ending(
                resp.status_code,
                "gateway_error",
                x.refusal or "gateway_rejected",
                now,
                error_message=_message_of(resp),
            )
            self._finish(x, ending)
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
        if x.policy.log_payloads and x.options.collect_payload and content is not None:
            payload = truncate(content.decode("utf-8", "replace"), x.policy.payload_max_bytes)
        # cf-aig-log-id was set in responseheaders; only now is the gateway's own time known
        resp.headers[OVERHEAD_HEADER] = _header_ms(x.hand_on(now, resp.timestamp_end or now))
        ending = Ending(
            resp.status_code,
            outcome,
            error_type,
            now,
            extracted,
            response_start=resp.timestamp_start,
            response_bytes=size,
            response_body=payload,
        )
        self._finish(x, ending)

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
                b"".join(x.response_payload).decode("utf-8", "replace"), x.policy.payload_max_bytes
            )
        ending = Ending(
            resp.status_code,
            outcome,
            error_type,
            now,
            x.watcher.extracted,
            response_start=resp.timestamp_start,
            response_bytes=x.watcher.bytes_seen,
            response_body=payload,
        )
        self._finish(x, ending)

    @_fail_closed
    def error(self, flow: http.HTTPFlow) -> None:
        x: Exchange | None = flow.metadata.get(STATE)
        if x is not None and x.cache is not None and x.cache.leader:  # a cut answer is never stored
            x.cache.leader = False
            self.cache.finish(x.cache.key or "", None)
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
        ending = Ending(
            resp.status_code if resp is not None else 0,
            outcome,
            error_type,
            time.time(),
            extracted,
            response_start=resp.timestamp_start if resp is not None else None,
            response_bytes=x.watcher.bytes_seen if x.watcher else 0,
            error_message=msg,
        )
        self._finish(x, ending)

    # --- the response cache --------------------------------------------------------------------------

    def _cache_store(self, x: Exchange, resp: http.Response) -> None:
        """The leader's complete answer: store it if it is a whole 2xx, release the followers either way."""
        c = x.cache
        assert c is not None and c.key is not None
        c.leader = False
        entry = None
        if x.watcher is not None:
            w = x.watcher
            done = w.ended and w.extracted.error_message is None and w.extracted.finish_reason != "ERROR"
            body = b"".join(c.chunks) if c.chunks is not None and done else None
        else:
            try:
                body = resp.content
            except ValueError:  # undecodable content-encoding
                body = None
        if body is not None and rcache.storable(resp.status_code, len(body), x.policy.cache):
            entry = rcache.make_entry(resp.status_code, resp.headers.items(), body, c.ttl_s, time.time())
        self.cache.finish(c.key, entry)

    def _finish_hit(self, x: Exchange, resp: http.Response, now: float) -> None:
        # upstream's bytes as stored, as a miss's event sees them (with the usage a stripped stream saved)
        assert x.cache is not None and x.cache.entry is not None
        body = x.cache.entry.body
        ctype = resp.headers.get("content-type", "")
        if is_stream_response(ctype, x.stream):
            watcher = StreamWatcher(
                x.route.api_version, x.route.endpoint, "sse" if "event-stream" in ctype else "ndjson"
            )
            watcher.feed(body)
            watcher.finish()
            extracted = watcher.extracted
        else:
            extracted = extract_body(x.route.api_version, x.route.endpoint, body)
        payload = None
        if x.policy.log_payloads and x.options.collect_payload:
            payload = truncate(body.decode("utf-8", "replace"), x.policy.payload_max_bytes)
        ending = Ending(
            resp.status_code, "ok", None, now, extracted, response_bytes=len(body), response_body=payload
        )
        self._finish(x, ending)

    # --- helpers -------------------------------------------------------------------------------------

    def _finish(self, x: Exchange, ending: Ending) -> None:
        """The one place an exchange ends: its token reservation settled, counted, its event published."""
        x.ending = ending
        self.in_flight -= 1
        if x.relay_token is not None:
            self.relay.discard(x.relay_token)
        self._settle(x)
        if x.ticket is not None and x.ticket.failure is not None and ending.outcome != "client_aborted":
            # The relay answered itself (504/502): no attempt got an answer from upstream.
            ending.outcome, ending.error_type, ending.status = retries.failure_outcome(x.ticket.failure)
        outcome = ending.outcome
        self.metrics.exchanges[outcome] += 1
        if not x.recorded:  # refused before authentication: counted in rejected, nothing stored
            return
        if not x.options.collect_log and x.policy.allow_log_opt_out:
            self.metrics.events_skipped.inc()
            return
        try:
            event = build_event(x, self.pricing)
            value = fit_event(event)
            if value is None:
                self.metrics.events_oversize.inc()
                log.error("event %s is too large to deliver even without bodies; dropped", x.event_id)
                return
            self.publisher.publish(f"{x.account_id}/{x.gateway_id}".encode(), value)
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
                        "path": x.route.path[:256],
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
        x: Exchange | None = flow.metadata.get(STATE)
        if isinstance(exc, RouteError) and (x is None or x.forwarded_at is None):
            self._reject(flow, exc, x)
            return
        self.metrics.hook_errors[hook] += 1
        # The type and hook only: an exception's text can quote the client's bytes (or its secrets).
        log.error("internal error in the %s hook (%s); answered 500", hook, type(exc).__name__,
                  exc_info=log.isEnabledFor(logging.DEBUG))  # fmt: skip
        try:
            self._answer_internal_error(flow, hook, exc, x)
        except Exception:  # last resort: cut the connection rather than let the flow go on
            log.error("could not answer the internal error of the %s hook; killing the flow", hook)
            if flow.killable:
                flow.kill()

    def _answer_internal_error(
        self, flow: http.HTTPFlow, hook: str, exc: Exception, x: Exchange | None
    ) -> None:
        if hook == "responseheaders":
            # The body is still to come; streaming is not set up, so it is buffered and `response`,
            # seeing the failure, answers the 500 in its place.
            if x is not None:
                x.failed_hook = hook
            return
        message = f"the gateway failed while handling this request ({hook}); it was not forwarded"
        if x is not None and x.forwarded_at is not None:
            message = f"the gateway failed while handling the response ({hook})"
        headers = {LOG_ID_HEADER: x.event_id} if x is not None else {}
        if hook != "error":
            flow.response = json_response(500, {"message": message}, headers)
        if x is not None and not x.finished:
            x.options = RequestOptions(collect_log=x.options.collect_log)
            message = f"internal error in the gateway's {hook} hook ({type(exc).__name__})"
            self._finish(
                x, Ending(500, "gateway_error", "gateway_internal_error", time.time(), error_message=message)
            )

    def _reject(self, flow: http.HTTPFlow, exc: RouteError, x: Exchange | None = None) -> None:
        self.metrics.rejected[exc.status] += 1
        if x is not None:
            # What a refused request claims (metadata, custom cost, its own event id) is not recorded:
            # the event says only what the gateway knows.
            x.options = RequestOptions(collect_log=x.options.collect_log)
        headers = {LOG_ID_HEADER: x.event_id} if x is not None else {}
        flow.response = json_response(exc.status, {"message": exc.message}, headers)
        if x is None:
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


def _message_of(resp: http.Response) -> str | None:
    """The message of an answer the gateway made itself (never an upstream body)."""
    try:
        body = orjson.loads(resp.raw_content or b"")
    except orjson.JSONDecodeError:
        return None
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else None


addons = [Gateway()]
