"""Where a request goes: pure functions from (method, request target, host) to a `Route` or a `RouteError`.

The client never chooses the upstream: routes only ever produce a *path* on the configured upstream, and
anything that could smuggle another target through (percent-encoded bytes, `.`/`..` or empty segments,
backslashes, unusual characters) is refused before any parsing of meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from cohere_gateway.events import Id

# Account and gateway ids follow the event contract's `Id` type so every accepted route yields a valid event.
_ID_META: msgspec.Meta = Id.__metadata__[0]
ID_PATTERN = re.compile(_ID_META.pattern)
ID_MAX_LENGTH: int = _ID_META.max_length or 64

# RFC 3986 pchar minus '%': percent-encoding is refused outright, so "%2F" / "%2e%2e" cannot hide a slash
# or a dot-segment from us while an upstream decodes it.
_PATH_CHARS = re.compile(r"^/[A-Za-z0-9._~!$&'()*+,;=:@/-]*$")
_QUERY_CHARS = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/?%-]*$")

FORWARDED_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
LOCAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
COHERE_HOSTS = frozenset({"api.cohere.ai", "api.cohere.com"})

COMPAT_PATHS = {
    ("chat", "completions"): ("/compatibility/v1/chat/completions", "chat.completions"),
    ("embeddings",): ("/compatibility/v1/embeddings", "embeddings"),
}

GATEWAY_ROUTE_HELP = (
    "gateway routes are /v1/{account_id}/{gateway_id}/cohere/{v1|v2}/... and "
    "/v1/{account_id}/{gateway_id}/compat/chat/completions"
)


class RouteError(Exception):
    """A request the gateway answers itself with `status` and a JSON `{"message": ...}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Route:
    mode: str  # "gateway" | "compat" | "transparent" (the event's route_mode)
    path: str  # path on the upstream, no query
    query: str  # "" or "?..." exactly as the client sent it
    api_version: str  # "v1" | "v2" | "compat"
    endpoint: str
    account_id: str | None = None  # None: taken from headers or defaults (transparent mode)
    gateway_id: str | None = None


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """A request for the gateway itself (/healthz, /metrics), never forwarded."""

    path: str


def split_target(target: str) -> tuple[str, str]:
    """Validate an origin-form request target and split it into (path, "?query" or "")."""
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        raise RouteError(
            400, "the request target must be a path starting with '/' (absolute-form is refused)"
        )
    if not _PATH_CHARS.fullmatch(path):
        if "%" in path:
            raise RouteError(400, "percent-encoded characters are not accepted in the path")
        raise RouteError(400, "the path contains characters that are not accepted (backslash, space, ...)")
    if sep and not _QUERY_CHARS.fullmatch(query):
        raise RouteError(400, "the query string contains characters that are not accepted")
    segments = path.split("/")[1:]
    for seg in segments:
        if seg in (".", ".."):
            raise RouteError(400, "'.' and '..' path segments are not accepted")
    if "" in segments[:-1]:
        raise RouteError(400, "empty path segments ('//') are not accepted")
    return path, sep + query


def check_method(method: str) -> None:
    if method not in FORWARDED_METHODS:
        raise RouteError(405, f"method {method} is not accepted; use GET, POST, PUT, PATCH or DELETE")


def check_id(kind: str, value: str) -> str:
    if not value or len(value) > ID_MAX_LENGTH or not ID_PATTERN.fullmatch(value):
        raise RouteError(
            400,
            f"invalid {kind} {value[:80]!r}: 1-{ID_MAX_LENGTH} characters of A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit",
        )
    return value


def classify_cohere_path(segments: list[str]) -> tuple[str, str]:
    """(api_version, endpoint) of a Cohere API path given as segments, e.g. ["v2", "chat"]."""
    if segments[:2] == ["compatibility", "v1"]:
        rest = tuple(segments[2:])
        compat = COMPAT_PATHS.get(rest)
        return "compat", compat[1] if compat else "/".join(rest)
    # Only the first segment names the endpoint: later ones carry ids (`/v1/models/{name}`,
    # `/v1/datasets/{id}`), which would make the endpoint column unbounded.
    return segments[0], segments[1] if len(segments) > 1 else ""


def cohere_segments(rest: list[str]) -> list[str]:
    """The Cohere path below the provider prefix, undoing the SDK's doubled version: with
    base_url=".../cohere/v1" the SDK requests ".../cohere/v1/v1/chat" (or ".../v1/v2/chat" for ClientV2)."""
    if len(rest) >= 2 and rest[0] == "v1" and rest[1] in ("v1", "v2"):
        rest = rest[1:]
    if rest and rest[-1] == "":
        rest = rest[:-1]
    if len(rest) < 2 or rest[0] not in ("v1", "v2", "compatibility"):
        raise RouteError(
            404, "no such Cohere API path; expected .../cohere/v1/<endpoint> or .../cohere/v2/<endpoint>"
        )
    return rest


def route_gateway(method: str, target: str) -> Route | LocalRoute:
    """Route a request received on the gateway (reverse) listener."""
    path, query = split_target(target)
    if path in LOCAL_PATHS:
        if method not in ("GET", "HEAD"):
            raise RouteError(405, f"{path} answers GET only")
        return LocalRoute(path)
    segments = path.split("/")[1:]
    if len(segments) < 4 or segments[0] != "v1":
        raise RouteError(404, f"no such route {path[:200]!r}; {GATEWAY_ROUTE_HELP}")
    check_method(method)
    account_id = check_id("account_id", segments[1])
    gateway_id = check_id("gateway_id", segments[2])
    provider, rest = segments[3], segments[4:]
    if provider == "cohere":
        rest = cohere_segments(rest)
        api_version, endpoint = classify_cohere_path(rest)
        return Route(
            "compat" if api_version == "compat" else "gateway",
            "/" + "/".join(rest),
            query,
            api_version,
            endpoint,
            account_id,
            gateway_id,
        )
    if provider == "compat":
        compat = COMPAT_PATHS.get(tuple(s for s in rest if s))
        if compat is None:
            raise RouteError(404, "the compat route serves /compat/chat/completions and /compat/embeddings")
        return Route("compat", compat[0], query, "compat", compat[1], account_id, gateway_id)
    raise RouteError(404, f"provider {provider[:40]!r} is not served here; {GATEWAY_ROUTE_HELP}")


def route_transparent(method: str, host: str, port: int, target: str) -> Route:
    """Route a request that arrived through the forward proxy for `host`: only Cohere's API hosts."""
    if host.lower().rstrip(".") not in COHERE_HOSTS or port not in (443, 80):
        raise RouteError(403, f"this proxy only forwards to {' and '.join(sorted(COHERE_HOSTS))}")
    check_method(method)
    path, query = split_target(target)
    segments = cohere_segments(path.split("/")[1:])
    api_version, endpoint = classify_cohere_path(segments)
    return Route("transparent", "/" + "/".join(segments), query, api_version, endpoint)


def check_connect(host: str, port: int) -> None:
    """CONNECT on the forward proxy: only to Cohere's API hosts on 443 (then intercepted with our CA)."""
    if host.lower().rstrip(".") not in COHERE_HOSTS or port != 443:
        raise RouteError(403, f"CONNECT is only accepted to {' and '.join(sorted(COHERE_HOSTS))} on port 443")


@dataclass(frozen=True, slots=True)
class Upstream:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix of the base URL, "" for https://api.cohere.ai

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.query:
            raise ValueError(f"upstream must be an http(s) URL like https://api.cohere.ai, got {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"
