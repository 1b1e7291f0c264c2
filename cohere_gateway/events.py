"""The event contract: one event per request/response exchange through the gateway.

Both sides import this module: the gateway addon builds `Event`s and encodes them, the consumers decode
and validate them. It is documented field by field in docs/events.md; change both together.

Versioning: `schema_version` is "MAJOR.MINOR". A minor bump only adds optional fields, so a consumer
accepts any minor of its major (unknown fields are ignored); a major bump is a breaking change and is
rejected with a clear error until the consumer is upgraded.
"""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 3
SCHEMA_VERSION = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
EVENT_ID_MAX_LENGTH = 128  # the gateway's own ids are 36 characters

# Longest error message kept in an event; Cohere's messages are short, upstream HTML error pages are not.
MAX_ERROR_MESSAGE = 1024
MAX_METADATA_ENTRIES = 5
# Kafka's default limits (broker message.max.bytes, producer max.request.size) are about 1 MiB per
# record including key and batch overhead; the gateway builds events of at most half of that, which
# leaves room for the overhead and for the consumer's dead-letter envelope around an event.
KAFKA_MAX_MESSAGE_BYTES = 1 << 20
MAX_EVENT_BYTES = KAFKA_MAX_MESSAGE_BYTES // 2

RouteMode = Literal["gateway", "transparent", "compat"]
Outcome = Literal["ok", "upstream_error", "gateway_error", "client_aborted", "upstream_timeout"]
OUTCOMES: tuple[str, ...] = ("ok", "upstream_error", "gateway_error", "client_aborted", "upstream_timeout")

# Counts are stored as UInt64 (msgspec bounds stop at int64) and timestamps compared across gateways, so
# both limits are part of the contract, checked while decoding rather than found by a failed insert.
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
StatusCode = Annotated[int, msgspec.Meta(ge=0, le=999)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]


class EventError(ValueError):
    """A message that is not a valid event; `str()` says which field and why."""


class Usage(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=False):
    """Token and unit counts as Cohere reports them.

    `input_tokens`/`output_tokens` are Cohere's *billed* units (what cost is computed from, and what
    OpenTelemetry's gen_ai.usage.* carry for Cohere); `raw_*` are `meta.tokens`/`usage.tokens`, which
    include the system preamble and are kept beside them. None means "not reported", never zero.
    """

    input_tokens: NonNegInt | None = None
    output_tokens: NonNegInt | None = None
    raw_input_tokens: NonNegInt | None = None
    raw_output_tokens: NonNegInt | None = None
    cached_tokens: NonNegInt | None = None
    search_units: NonNegInt | None = None
    classifications: NonNegInt | None = None
    embeddings: NonNegInt | None = None  # number of vectors returned by an embed call
    images: NonNegInt | None = None  # 1.1: `billed_units.images` (Embed v3 image inputs)
    image_tokens: NonNegInt | None = None  # 1.1: `billed_units.image_tokens` (Embed v4 image inputs)


class Latency(msgspec.Struct, omit_defaults=True):
    """Milliseconds. `upstream_ttfb_ms` is request-sent → first response byte from upstream;
    `ttft_ms` (streams only) is request-received → first generated token reaching the gateway;
    `gateway_overhead_ms` is time spent in the gateway itself: before the request left for upstream, plus
    the time it held upstream's answer (a stream's headers, a whole body) before passing it on; the same
    number as the response's `x-cohere-gateway-overhead-ms` header."""

    total_ms: NonNegFloat
    upstream_ttfb_ms: NonNegFloat | None = None
    ttft_ms: NonNegFloat | None = None
    gateway_overhead_ms: NonNegFloat | None = None


class Event(msgspec.Struct, kw_only=True, omit_defaults=False, forbid_unknown_fields=False):
    schema_version: str
    # Bounded: the consumer looks ids up in ClickHouse as HTTP parameters, which a server refuses past
    # 128 KiB, so an event with a larger id would be retried for ever instead of dead-lettered.
    event_id: Annotated[str, msgspec.Meta(max_length=EVENT_ID_MAX_LENGTH)]
    start_time: AwareDatetime
    end_time: AwareDatetime

    account_id: Id
    gateway_id: Id
    route_mode: RouteMode
    api_version: str  # "v1", "v2", "compat"
    endpoint: str  # "chat", "generate", "embed", "rerank", ..., "chat.completions", or the path when unknown
    method: str
    path: str  # upstream path, without query string
    model: str | None = None
    # 1.1: the request named no model, `model` is the one Cohere uses by default for this endpoint, and the
    # cost (if any) was computed at that model's price.
    model_implied: bool = False
    stream: bool = False

    status_code: Annotated[int, msgspec.Meta(ge=0, le=999)]  # 0: no response (connect failure, abort)
    outcome: Outcome
    error_type: str | None = None
    error_message: str | None = None

    usage: Usage = msgspec.field(default_factory=Usage)
    finish_reason: str | None = None
    latency: Latency

    request_bytes: NonNegInt = 0
    response_bytes: NonNegInt = 0
    user_agent: str | None = None
    api_key_fingerprint: str | None = None
    response_id: str | None = None  # Cohere's `id` / `response_id`
    generation_id: str | None = None
    client_event_id: str | None = None  # cf-aig-event-id
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    cost_usd: NonNegFloat | None = None
    cost_source: Literal["pricing", "custom", "unknown_model", "not_billable", "cache"] | None = None
    # 1.2, the response cache. A HIT was not billed: `usage` is empty, `cost_usd` 0 with cost_source
    # "cache", and the usage the stored answer reports (what the hit saved) is in saved_*, so sums of
    # usage and cost stay what upstream billed.
    cache_status: Literal["HIT", "MISS", "EXPIRED", "BYPASS"] | None = None
    saved_input_tokens: NonNegInt | None = None
    saved_output_tokens: NonNegInt | None = None
    saved_search_units: NonNegInt | None = None
    saved_cost_usd: NonNegFloat | None = None  # None: what it would have cost is unknown
    # 1.3, retries: how many times the gateway sent the request upstream and each attempt's status, in
    # order (0: no answer - timed out, not reachable, or a body cut short; the last is what the client
    # was answered from). None and empty: never sent upstream (refused, cache hit).
    attempts: Annotated[int, msgspec.Meta(ge=1, le=16)] | None = None
    attempt_statuses: Annotated[list[StatusCode], msgspec.Meta(max_length=16)] = msgspec.field(
        default_factory=list
    )

    request_body: str | None = None  # only when payload logging is on, truncated
    response_body: str | None = None

    def __post_init__(self) -> None:
        major, _, minor = self.schema_version.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise msgspec.ValidationError(
                f"schema_version must be 'MAJOR.MINOR', got {self.schema_version!r} - at `$.schema_version`"
            )
        if int(major) != SCHEMA_MAJOR:
            raise msgspec.ValidationError(
                f"schema_version {self.schema_version} has major {major}; this build reads major "
                f"{SCHEMA_MAJOR} only - upgrade cohere-gateway - at `$.schema_version`"
            )
        if self.end_time < self.start_time:
            raise msgspec.ValidationError("end_time is before start_time - at `$.end_time`")
        if len(self.metadata) > MAX_METADATA_ENTRIES:
            raise msgspec.ValidationError(
                f"metadata has {len(self.metadata)} entries, at most {MAX_METADATA_ENTRIES} - at `$.metadata`"
            )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """Parse and validate one event. Raises EventError naming the field at fault."""
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise EventError(f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventError(f"not a JSON event: {exc}") from None


def to_builtins(event: Event) -> dict:
    return msgspec.to_builtins(event)


def new_event_id(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48-bit Unix milliseconds then randomness, so ids sort by creation time."""
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    digits = f"{value:032x}"  # str(uuid.UUID(int=value)) without building the UUID
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def utc_from_timestamp(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def api_key_fingerprint(key: str | bytes) -> str:
    """Identifies a key across events without storing it: the first 16 hex digits of its SHA-256,
    like the short fingerprints Cohere's dashboard shows. Keys are high-entropy, so this is not reversible."""
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def truncate(text: str | None, limit: int = MAX_ERROR_MESSAGE) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"
