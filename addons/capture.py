"""One exchange's state while it is in flight, and the event built from it when it ends.

Every string an event takes from a request (model, user agent, path, metadata, ids) is bounded and
sanitised here, where the event is built: no client byte can make it fail to encode, and no client
can make it larger than delivery accepts (`MAX_EVENT_BYTES`, below the Kafka producer's and broker's
limits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cohere_gateway.addons.cache import CacheState
from cohere_gateway.addons.gateway_config import GatewayPolicy
from cohere_gateway.addons.headers import RequestOptions
from cohere_gateway.addons.pricing import PricingTable, compute_cost
from cohere_gateway.addons.ratelimits import Reservation
from cohere_gateway.addons.relay import Ticket
from cohere_gateway.addons.retries import RetryPolicy
from cohere_gateway.addons.routing import Route
from cohere_gateway.addons.streaming import StreamWatcher
from cohere_gateway.addons.usage import Extracted
from cohere_gateway.events import (
    MAX_ERROR_MESSAGE,
    MAX_EVENT_BYTES,
    SCHEMA_VERSION,
    Event,
    Latency,
    Usage,
    encode,
    truncate,
    utc_from_timestamp,
)

MAX_MODEL = 256
MAX_USER_AGENT = 256
MAX_PATH = 1024
MAX_FIELD = 256  # ids and short fields from upstream responses
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


# What credentials look like inside logged bodies: an Authorization-style "Bearer/Token <value>", a JSON
# field named like a credential, and Cohere API keys (40 letters and digits).
_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2[REDACTED]"),
    (
        re.compile(
            r'(?i)("(?:api[_-]?key|authorization|token|secret|password|cf-aig-authorization)"\s*:\s*")[^"]*"'
        ),
        r'\1[REDACTED]"',
    ),
    (re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{40}(?![A-Za-z0-9])"), "[REDACTED]"),
)
REDACTED = "[REDACTED]"


def redact(text: str | None, secrets: tuple[str, ...] = ()) -> str | None:
    """`text` with this exchange's own credentials and anything shaped like one replaced."""
    if not text:
        return text
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def clean(text: str | None, limit: int) -> str | None:
    """`text` with control characters and lone surrogates replaced by U+FFFD, at most `limit` characters."""
    if text is None:
        return None
    if not text.isascii() or not text.isprintable():
        text = _UNPRINTABLE.sub("\ufffd", text)
    return truncate(text, limit)


@dataclass(slots=True)
class Exchange:
    route: Route
    options: RequestOptions
    account_id: str
    gateway_id: str
    event_id: str
    start: float  # request's first byte, epoch seconds (mitmproxy's timestamp_start)
    method: str
    user_agent: str | None = None
    key_fingerprint: str | None = None
    model: str | None = None
    stream: bool = False
    forwarded_at: float | None = None  # when the request left the gateway for upstream
    request_bytes: int = 0
    request_body: str | None = None
    watcher: StreamWatcher | None = None
    response_payload: list[bytes] | None = None  # streamed bodies kept for payload logging
    payload_kept: int = 0
    strip_usage: bool = False  # compat stream: the gateway asked upstream for usage the client did not
    recorded: bool = True  # False: refused before authentication, no event at all
    failed_hook: str | None = None  # a response hook raised: the response is replaced by a 500
    secrets: tuple[str, ...] = ()  # this request's credentials, redacted from everything its event keeps
    policy: GatewayPolicy = field(default_factory=GatewayPolicy)  # this gateway's configuration
    cache: CacheState | None = None  # None: the cache does not apply to this request
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # the gateway's, with this request's headers
    ticket: Ticket | None = None  # sent through the relay (addons/relay.py): its attempts
    relay_token: str | None = None
    reservation: Reservation | None = None  # what this request holds of its gateway's token limits
    refusal: str | None = None  # the gateway's own refusal after authentication: the event's error_type
    # Fixed when the gateway hands its answer on, so the response header and the event say one number.
    overhead_ms: float | None = None
    ending: Ending | None = None  # set once, by whichever hook ends the exchange

    @property
    def finished(self) -> bool:
        """The event is built exactly once, whichever hook ends the exchange."""
        return self.ending is not None

    def overhead_at(self, now: float, answered: float | None = None) -> float:
        """Milliseconds spent in the gateway itself up to `now`: all of it if upstream was never asked;
        otherwise the time before the request left for upstream, plus the time from `answered` (upstream's
        answer reaching the gateway) to `now`. The time waiting on upstream is not the gateway's."""
        if self.forwarded_at is None:
            return _ms(now - self.start)
        held = max(0.0, now - answered) if answered is not None else 0.0
        return _ms(self.forwarded_at - self.start + held)

    def hand_on(self, now: float, answered: float | None = None) -> float:
        """The gateway passes its answer to the client at `now`: the overhead, fixed for the event too.
        `answered`: when upstream's answer reached the gateway (a stream's headers, a body's last byte)."""
        self.overhead_ms = self.overhead_at(now, answered)
        return self.overhead_ms


@dataclass(slots=True)
class Ending:
    """How an exchange ended, as the hook that saw it end knows it; everything else the exchange holds."""

    status: int  # 0: no response at all
    outcome: str
    error_type: str | None
    at: float  # epoch seconds
    extracted: Extracted = field(default_factory=Extracted)
    response_start: float | None = None  # upstream's response headers reached the gateway
    response_bytes: int = 0
    response_body: str | None = None
    error_message: str | None = None


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000.0, 3)


def latency(exchange: Exchange, ending: Ending) -> Latency:
    total = _ms(ending.at - exchange.start)
    overhead = exchange.overhead_ms if exchange.overhead_ms is not None else exchange.overhead_at(ending.at)
    ttfb: float | None = None
    if exchange.forwarded_at is not None:
        if ending.response_start is None:  # no response at all (connect failure): the rest is upstream's
            return Latency(total_ms=total, gateway_overhead_ms=overhead)
        ttfb = _ms(ending.response_start - exchange.forwarded_at)
    ttft = (
        _ms(exchange.watcher.first_token_at - exchange.start)
        if exchange.watcher and exchange.watcher.first_token_at
        else None
    )
    return Latency(total_ms=total, upstream_ttfb_ms=ttfb, ttft_ms=ttft, gateway_overhead_ms=overhead)


def build_event(exchange: Exchange, pricing: PricingTable) -> Event:
    """The event of an ended exchange."""
    ending = exchange.ending
    assert ending is not None, "an exchange's event is built once it has ended"
    status, outcome, error_type, extracted = (
        ending.status,
        ending.outcome,
        ending.error_type,
        ending.extracted,
    )
    model = clean(exchange.model or extracted.model, MAX_MODEL)
    implied = (
        model is None
        and (model := pricing.implied_model(exchange.route.api_version, exchange.route.endpoint)) is not None
    )
    # Cohere bills no request it answered with an error status, nor one it never received.
    billed = status < 400 and not (
        status == 0 and (exchange.forwarded_at is None or error_type == "connection_failed")
    )
    # A client's own cost applies to what it was served (2xx); an error costs what pricing says.
    custom = exchange.options.custom_cost if 200 <= status < 300 and outcome == "ok" else None
    cost, cost_source = compute_cost(
        pricing,
        exchange.route.endpoint,
        model,
        extracted.usage,
        custom,
        at=utc_from_timestamp(exchange.start),
        billed=billed,
    )
    keep_payload = exchange.options.collect_payload
    cache_status = exchange.cache.status if exchange.cache is not None else None
    usage, saved = extracted.usage, Usage()
    saved_cost: float | None = None
    if cache_status == "HIT":  # upstream was not called: nothing billed, the stored answer's usage saved
        usage, saved = Usage(), usage
        saved_cost, cost, cost_source = cost, 0.0, "cache"
    attempts: list[int] | None = None
    if exchange.ticket is not None and exchange.ticket.attempts:
        attempts = [a.status for a in exchange.ticket.attempts]
    elif exchange.forwarded_at is not None and cache_status != "HIT":
        attempts = [status]
    return Event(
        schema_version=SCHEMA_VERSION,
        event_id=exchange.event_id,
        start_time=utc_from_timestamp(exchange.start),
        end_time=utc_from_timestamp(max(ending.at, exchange.start)),
        account_id=exchange.account_id,
        gateway_id=exchange.gateway_id,
        route_mode=exchange.route.mode,  # type: ignore[arg-type]
        api_version=exchange.route.api_version,
        endpoint=exchange.route.endpoint,
        method=clean(exchange.method, 16) or "",
        path=clean(exchange.route.path, MAX_PATH) or "",
        model=model,
        model_implied=implied,
        stream=exchange.stream,
        status_code=status,
        outcome=outcome,  # type: ignore[arg-type]
        error_type=error_type,
        error_message=clean(ending.error_message or extracted.error_message, MAX_ERROR_MESSAGE)
        if outcome != "ok"
        else None,
        usage=usage,
        finish_reason=clean(extracted.finish_reason, MAX_FIELD),
        latency=latency(exchange, ending),
        request_bytes=exchange.request_bytes,
        response_bytes=ending.response_bytes,
        user_agent=clean(redact(exchange.user_agent, exchange.secrets), MAX_USER_AGENT),
        api_key_fingerprint=exchange.key_fingerprint,
        response_id=clean(extracted.response_id, MAX_FIELD),
        generation_id=clean(extracted.generation_id, MAX_FIELD),
        client_event_id=exchange.options.client_event_id,
        metadata={
            clean(redact(k, exchange.secrets), MAX_FIELD) or "": clean(redact(v, exchange.secrets), MAX_FIELD)
            or ""
            for k, v in exchange.options.metadata.items()
        },
        cost_usd=cost,
        cost_source=cost_source,  # type: ignore[arg-type]
        request_body=_payload(exchange.request_body, exchange.secrets) if keep_payload else None,
        response_body=_payload(ending.response_body, exchange.secrets) if keep_payload else None,
        cache_status=cache_status,  # type: ignore[arg-type]
        saved_input_tokens=saved.input_tokens,
        saved_output_tokens=saved.output_tokens,
        saved_search_units=saved.search_units,
        saved_cost_usd=saved_cost,
        attempts=len(attempts) if attempts is not None else None,
        attempt_statuses=attempts or [],
    )


def _payload(body: str | None, secrets: tuple[str, ...]) -> str | None:
    return clean(redact(body, secrets), len(body)) if body else None


def fit_event(event: Event, limit: int = MAX_EVENT_BYTES) -> bytes | None:
    """The encoded event, without its bodies if it is over `limit` bytes with them; None if even that is
    too large (every other field is bounded, so only a misconfiguration gets there)."""
    value = encode(event)
    if len(value) <= limit:
        return value
    event.request_body = event.response_body = None
    value = encode(event)
    return value if len(value) <= limit else None
