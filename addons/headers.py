"""Cloudflare AI Gateway compatible request headers (`cf-aig-*`): pure parsing and validation.

Malformed values are the client's mistake and are answered with 400 and a message naming the header, so
a typo never silently drops metadata or the client's correlation id.

Header values arrive as bytes and are handled as bytes or latin-1 on purpose: every byte decodes, so no
client byte can make a parser raise. JSON-valued headers are parsed from their bytes (orjson checks the
UTF-8), credentials are compared and fingerprinted as bytes.
"""

from __future__ import annotations

import hmac
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

import orjson

from cohere_gateway.addons.routing import RouteError, check_id
from cohere_gateway.events import MAX_METADATA_ENTRIES, api_key_fingerprint

CF_PREFIX = "cf-aig-"
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 256
_EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")

# Headers whose values are credentials: never logged, never stored, never published.
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "proxy-authorization",
        "cf-aig-authorization",
    }
)


def credentials(fields: Iterable[tuple[str, bytes]], extra: Iterable[str] = ()) -> tuple[str, ...]:
    """What is redacted from everything stored about a request: the value of each SECRET_HEADERS field
    (`fields`: lower-case names, raw values) after its scheme word, or whole, and `extra` (the gateway's
    tokens, a key it holds)."""
    found = [
        text.partition(" ")[2].strip() or text
        for name, value in fields
        if name in SECRET_HEADERS
        for text in (header_text(value),)
    ]
    return tuple(s for s in (*extra, *found) if s)


@dataclass(frozen=True, slots=True)
class CustomCost:
    per_token_in: float | None = None
    per_token_out: float | None = None
    total_cost: float | None = None


@dataclass(slots=True)
class RequestOptions:
    metadata: dict[str, str] = field(default_factory=dict)
    collect_log: bool = True
    collect_payload: bool = True
    custom_cost: CustomCost | None = None
    client_event_id: str | None = None
    account_id: str | None = None  # cf-aig-account-id (transparent mode)
    gateway_id: str | None = None  # cf-aig-gateway-id (transparent mode)
    authorization: str | None = None  # cf-aig-authorization, checked then dropped


def _bad(header: str, why: str) -> RouteError:
    return RouteError(400, f"invalid {header} header: {why}")


def parse_bool(header: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1"):
        return True
    if v in ("false", "0"):
        return False
    raise _bad(header, "expected true or false")


def _metadata_value(header: str, key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(header, f"value of {key!r} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        if len(value) > MAX_METADATA_VALUE:
            raise _bad(header, f"value of {key!r} is longer than {MAX_METADATA_VALUE} characters")
        return value
    raise _bad(header, f"value of {key!r} must be a string, number or boolean")


def _json_bytes(value: str | bytes) -> bytes:
    """The header's bytes: a latin-1 string (as the gateway decodes headers) maps back to them exactly."""
    if isinstance(value, bytes):
        return value
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:  # a str that never was a header (direct callers): its UTF-8
        return value.encode("utf-8", "replace")


def parse_metadata(value: str | bytes) -> dict[str, str]:
    header = "cf-aig-metadata"
    try:
        obj = orjson.loads(_json_bytes(value))
    except orjson.JSONDecodeError:
        raise _bad(header, 'expected a JSON object like {"user": "alice", "team": 7}') from None
    if not isinstance(obj, dict):
        raise _bad(header, "expected a JSON object")
    if len(obj) > MAX_METADATA_ENTRIES:
        raise _bad(header, f"{len(obj)} entries, at most {MAX_METADATA_ENTRIES}")
    out: dict[str, str] = {}
    for key, v in obj.items():
        if not key or len(key) > MAX_METADATA_KEY:
            raise _bad(header, f"keys must be 1-{MAX_METADATA_KEY} characters")
        if key.startswith("cf."):
            raise _bad(header, f"key {key!r}: keys starting with 'cf.' are reserved")
        out[key] = _metadata_value(header, key, v)
    return out


def _non_negative(header: str, obj: dict, name: str) -> float | None:
    v = obj.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
        raise _bad(header, f"{name} must be a non-negative number")
    return float(v)


def parse_custom_cost(value: str | bytes, max_cost: float = math.inf) -> CustomCost:
    header = "cf-aig-custom-cost"
    try:
        obj = orjson.loads(_json_bytes(value))
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise _bad(header, 'expected {"per_token_in": N, "per_token_out": N} or {"total_cost": N}')
    unknown = set(obj) - {"per_token_in", "per_token_out", "total_cost"}
    if unknown:
        raise _bad(header, f"unknown field(s) {sorted(unknown)}")
    cost = CustomCost(
        _non_negative(header, obj, "per_token_in"),
        _non_negative(header, obj, "per_token_out"),
        _non_negative(header, obj, "total_cost"),
    )
    if cost.total_cost is None and cost.per_token_in is None and cost.per_token_out is None:
        raise _bad(header, "give per_token_in/per_token_out or total_cost")
    if cost.total_cost is not None and (cost.per_token_in is not None or cost.per_token_out is not None):
        raise _bad(header, "give either per-token prices or total_cost, not both")
    # A sum of bounded costs stays finite: one huge value would turn every total it joins into inf/null.
    for name in ("per_token_in", "per_token_out", "total_cost"):
        v = getattr(cost, name)
        if v is not None and v > max_cost:
            raise _bad(header, f"{name} {v!r} is above the gateway's maximum custom cost of {max_cost!r} USD")
    return cost


def header_text(raw: bytes) -> str:
    return raw.decode("latin-1")


def parse_request_options(
    items: Iterable[tuple[str | bytes, str | bytes]], *, max_custom_cost: float = math.inf
) -> RequestOptions:
    """Read every `cf-aig-*` header of a request (raw fields or latin-1 strings). Unknown `cf-aig-*`
    headers (cache, retries) are ignored here and, like all of them, not forwarded upstream."""
    opts = RequestOptions()
    for raw_name, raw_value in items:
        lname = (header_text(raw_name) if isinstance(raw_name, bytes) else raw_name).lower()
        if not lname.startswith(CF_PREFIX):
            continue
        value = header_text(raw_value) if isinstance(raw_value, bytes) else raw_value
        key = lname[len(CF_PREFIX) :]
        if key == "metadata":
            opts.metadata = parse_metadata(raw_value)
        elif key == "collect-log":
            opts.collect_log = parse_bool(lname, value)
        elif key == "collect-log-payload":
            opts.collect_payload = parse_bool(lname, value)
        elif key == "custom-cost":
            opts.custom_cost = parse_custom_cost(raw_value, max_custom_cost)
        elif key == "event-id":
            if not _EVENT_ID.fullmatch(value):
                raise _bad(lname, "1-128 characters of A-Z a-z 0-9 . _ : -")
            opts.client_event_id = value
        elif key == "account-id":
            opts.account_id = check_id("cf-aig-account-id", value)
        elif key == "gateway-id":
            opts.gateway_id = check_id("cf-aig-gateway-id", value)
        elif key == "authorization":
            opts.authorization = value
    return opts


# Headers a request may carry once: two differing copies are ambiguous (request smuggling, a body parsed
# one way by the gateway and another upstream), so they are refused rather than forwarded. Every cf-aig-*
# header is one too (SINGLETON_PREFIX): which of two cache TTLs, metadata objects or tokens was meant is
# not the gateway's to guess.
SINGLETON_HEADERS = frozenset(
    {"host", "content-length", "content-type", "authorization", "transfer-encoding"}
)
SINGLETON_PREFIX = "cf-aig-"


def check_singletons(names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        lname = name.lower()
        if lname in SINGLETON_HEADERS or lname.startswith(SINGLETON_PREFIX):
            if lname in seen:
                raise RouteError(400, f"duplicate {lname} header: send it once")
            seen.add(lname)


def check_gateway_token(presented: str | None, tokens: tuple[str, ...]) -> None:
    """Authenticated gateway: `cf-aig-authorization: Bearer <token>` must match one of the gateway's
    tokens (constant-time compare; every token compared, so the time does not say which one nearly
    matched). No tokens: open."""
    tokens = tuple(t for t in tokens if t)
    if not tokens:
        return
    scheme, _, value = (presented or "").strip().partition(" ")
    # latin-1 maps every byte back exactly, and never raises (a UTF-8 encode of a client byte could)
    given = value.strip().encode("latin-1", "replace")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(given, token.encode())
    if scheme.lower() != "bearer" or not ok:
        raise RouteError(
            401, "this gateway requires the header 'cf-aig-authorization: Bearer <gateway token>'"
        )


def api_key_of(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The Cohere key from `Authorization: Bearer <key>` (SDK) or `Token <key>` (Cloudflare's curl)."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        key = value.strip() if scheme.lower() in ("bearer", "token") else authorization.strip()
        return key or None
    return x_api_key or None


def key_fingerprint(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """Of latin-1 header values: the key's bytes are hashed, so any byte a client sends fingerprints."""
    key = api_key_of(authorization, x_api_key)
    return api_key_fingerprint(key.encode("latin-1", "replace")) if key else None


# Requests that would change the connection into something else (a raw tunnel to the upstream once it
# answers 101) are not a Cohere API call.
_UPGRADE_HEADERS = frozenset({b"upgrade", b"http2-settings"})


def check_request_head(
    method: bytes, path: bytes, authority: bytes, fields: Sequence[tuple[bytes, bytes]], max_headers: int
) -> None:
    """CR, LF or NUL anywhere in the request head could end a header line (or the request) once an HTTP/2
    request is written upstream as HTTP/1.1; refused whatever protocol it came in on, as are more header
    fields than `max_headers` (431) and connection upgrades. On every request: one join and a few
    memchr-speed scans, the per-field loop only when one of them hits."""
    blob = b"\x01".join([method, path, authority, *chain.from_iterable(fields)])
    if b"\r" in blob or b"\n" in blob or b"\x00" in blob:
        for part, what in ((method, "method"), (path, "request target"), (authority, "authority")):
            if b"\r" in part or b"\n" in part or b"\x00" in part:
                raise RouteError(400, f"the {what} contains CR, LF or NUL, which are not accepted")
        raise RouteError(400, "a header name or value contains CR, LF or NUL, which are not accepted")
    if len(fields) > max_headers:
        raise RouteError(
            431, f"the request has {len(fields)} header fields; the gateway accepts at most {max_headers}"
        )
    lowered = blob.lower()
    if (b"upgrade" in lowered or b"http2-settings" in lowered) and any(
        name.lower() in _UPGRADE_HEADERS for name, _ in fields
    ):
        raise RouteError(400, "connection upgrades are not accepted by the gateway")
