"""One exchange's state while it is in flight, and the event built from it when it ends."""

from __future__ import annotations

from dataclasses import dataclass, field

from cohere_gateway.events import (
    MAX_ERROR_MESSAGE,
    SCHEMA_VERSION,
    Event,
    Latency,
    truncate,
    utc_from_timestamp,
)

from .headers import RequestOptions
from .pricing import PricingTable, compute_cost
from .routing import Route
from .streaming import StreamWatcher
from .usage import Extracted


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
    finished: bool = False  # the event is built exactly once, whichever hook ends the exchange
    strip_usage: bool = False  # compat stream: the gateway asked upstream for usage the client did not
    headers_sent_at: float | None = field(default=None)


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000.0, 3)


def latency(x: Exchange, end: float, response_start: float | None, response_end: float | None) -> Latency:
    total = _ms(end - x.start)
    ttfb = upstream_wait = None
    if x.forwarded_at is not None and response_start is not None:
        ttfb = _ms(response_start - x.forwarded_at)
        upstream_wait = _ms((response_end or end) - x.forwarded_at)
    ttft = _ms(x.watcher.first_token_at - x.start) if x.watcher and x.watcher.first_token_at else None
    overhead = round(max(0.0, total - upstream_wait), 3) if upstream_wait is not None else total
    if x.forwarded_at is None or response_start is not None:
        return Latency(total_ms=total, upstream_ttfb_ms=ttfb, ttft_ms=ttft, gateway_overhead_ms=overhead)
    # no response at all (connect failure): the time spent is upstream's, not ours
    return Latency(total_ms=total, gateway_overhead_ms=_ms(x.forwarded_at - x.start))


def build_event(
    x: Exchange,
    *,
    pricing: PricingTable,
    status: int,
    outcome: str,
    error_type: str | None,
    extracted: Extracted,
    end: float,
    response_start: float | None = None,
    response_end: float | None = None,
    response_bytes: int = 0,
    response_body: str | None = None,
    error_message: str | None = None,
) -> Event:
    model = x.model or extracted.model
    implied = (
        model is None and (model := pricing.implied_model(x.route.api_version, x.route.endpoint)) is not None
    )
    # Cohere bills no request it answered with an error status, nor one it never received.
    billed = status < 400 and not (
        status == 0 and (x.forwarded_at is None or error_type == "connection_failed")
    )
    cost, cost_source = compute_cost(
        pricing,
        x.route.endpoint,
        model,
        extracted.usage,
        x.options.custom_cost,
        at=utc_from_timestamp(x.start),
        billed=billed,
    )
    keep_payload = x.options.collect_payload
    return Event(
        schema_version=SCHEMA_VERSION,
        event_id=x.event_id,
        start_time=utc_from_timestamp(x.start),
        end_time=utc_from_timestamp(max(end, x.start)),
        account_id=x.account_id,
        gateway_id=x.gateway_id,
        route_mode=x.route.mode,  # type: ignore[arg-type]
        api_version=x.route.api_version,
        endpoint=x.route.endpoint,
        method=x.method,
        path=x.route.path,
        model=model,
        model_implied=implied,
        stream=x.stream,
        status_code=status,
        outcome=outcome,  # type: ignore[arg-type]
        error_type=error_type,
        error_message=truncate(error_message or extracted.error_message, MAX_ERROR_MESSAGE)
        if outcome != "ok"
        else None,
        usage=extracted.usage,
        finish_reason=extracted.finish_reason,
        latency=latency(x, end, response_start, response_end),
        request_bytes=x.request_bytes,
        response_bytes=response_bytes,
        user_agent=truncate(x.user_agent, 256),
        api_key_fingerprint=x.key_fingerprint,
        response_id=extracted.response_id,
        generation_id=extracted.generation_id,
        client_event_id=x.options.client_event_id,
        metadata=x.options.metadata,
        cost_usd=cost,
        cost_source=cost_source,  # type: ignore[arg-type]
        request_body=x.request_body if keep_payload else None,
        response_body=response_body if keep_payload else None,
    )
