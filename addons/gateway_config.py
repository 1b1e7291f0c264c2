"""Per-gateway configuration as data: one TOML file, validated, resolved per `account_id/gateway_id`.

```toml
[gateways."*/*"]              # every gateway; starts from the proxy's flags
log_payloads = false

[gateways."acme/*"]           # every gateway of account acme
tokens_env = ["ACME_GATEWAY_TOKEN"]
cache = { enabled = true, ttl = 3600 }

[gateways."acme/prod"]        # exactly one gateway; the most specific entry wins, key by key
allow_log_opt_out = false
```

An entry's pattern is `ACCOUNT/GATEWAY`, each side an id or a glob (`*`, `team-*`). Every entry that
matches a request's ids applies, from the least to the most specific (an exact account beats an exact
gateway, a literal beats a glob, a longer literal part beats a shorter one), so a key set by a more
specific entry overrides the same key of a less specific one and everything else is inherited. The
built-in base under all of them is the proxy's flags (`--gateway-token`, `--log-payloads`, ...), so a
gateway works with no file at all, and a file only says what differs.

Errors name the file, the line, the key and what is allowed (`ConfigError`); a bad file refuses the
start, and a bad edit of a running gateway's file keeps the previous configuration (`ConfigWatcher`).
Tokens are secrets: no message, log or event ever carries one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cohere_gateway import gateway_file, settings
from cohere_gateway.addons import ratelimits, retries
from cohere_gateway.addons.retries import RetryPolicy
from cohere_gateway.addons.routing import ID_MAX_LENGTH, RouteError
from cohere_gateway.events import MAX_METADATA_ENTRIES, api_key_fingerprint
from cohere_gateway.gateway_file import boolean as _bool
from cohere_gateway.gateway_file import int_in as _int_in
from cohere_gateway.gateway_file import one_of as _one_of
from cohere_gateway.gateway_file import positive as _positive
from cohere_gateway.gateway_file import rule_key as _rule_key

log = logging.getLogger("cohere_gateway.config")

# Cloudflare's bounds for cf-aig-cache-ttl: one minute to one month (30 days).
MIN_CACHE_TTL_S = 60
MAX_CACHE_TTL_S = 30 * 24 * 3600
# Cloudflare caches a request that names a cf-aig-cache-key on a gateway without caching this long.
CLIENT_KEY_TTL_S = 300
MAX_PAYLOAD_CHARS = 16 * 1024 * 1024
MAX_CACHE_ENTRY_BYTES = 64 * 1024 * 1024
_PATTERN_SIDE = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Sections the next control issue adds (limits, budgets, retries, timeouts, provider keys): refused with
# a message saying so, rather than accepted and ignored.
_NOT_YET: tuple[str, ...] = ()
# A Cohere API key as the gateway holds it: printable ASCII without spaces, like every key Cohere issues.
_PROVIDER_KEY = re.compile(r"^[\x21-\x7e]{8,512}$")


class ConfigError(ValueError):
    """A configuration that cannot be used; `str()` reads `FILE:LINE: KEY: what is wrong and allowed`."""

    def __init__(self, file: str, line: int | None, key: str, message: str) -> None:
        self.file, self.line, self.key, self.message = file, line, key, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    enabled: bool = False  # cache every cacheable request of the gateway (else only those that ask)
    ttl_s: int = CLIENT_KEY_TTL_S  # default time to live of an entry
    client_control: bool = True  # whether cf-aig-cache-ttl / -skip-cache / -key are honoured
    max_entry_bytes: int = 8 * 1024 * 1024  # larger responses are passed on and not stored


@dataclass(frozen=True, slots=True)
class ProviderKey:
    """The Cohere API key a gateway holds for its apps (BYOK). Printing one shows where it came from and
    its fingerprint, never the key."""

    source: str  # "env NAME" or "file PATH"
    key: str = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return api_key_fingerprint(self.key)

    def __str__(self) -> str:
        return f"<Cohere key from {self.source}, {self.fingerprint}>"

    __repr__ = __str__


@dataclass(frozen=True, slots=True)
class GatewayPolicy:
    tokens: tuple[str, ...] = field(default=(), repr=False)  # empty: no gateway token required
    log_payloads: bool = settings.ProxySettings.log_payloads
    payload_max_bytes: int = settings.ProxySettings.payload_max_bytes
    allow_log_opt_out: bool = True  # whether cf-aig-collect-log: false is honoured
    max_metadata_entries: int = MAX_METADATA_ENTRIES
    cache: CachePolicy = field(default_factory=CachePolicy)
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # cf-aig-* headers override it per request
    provider_key: ProviderKey | None = None  # set: upstream gets this key, whatever the client sent
    rate_limits: tuple[ratelimits.RateRule, ...] = ()  # the most specific entry's list, whole
    budgets: tuple[ratelimits.RateRule, ...] = ()  # cost limits over calendar periods, the same way


# --- validation of one entry: key -> (checker, what is allowed) --------------------------------------


def _tokens(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(t, str) and 8 <= len(t) <= 512 for t in v):
        raise TypeError
    return tuple(v)


def _env_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(n, str) and _ENV_NAME.match(n) for n in v):
        raise TypeError
    return tuple(v)


_GATEWAY_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "tokens": (_tokens, "a list of gateway tokens (strings of 8-512 characters)"),
    "tokens_env": (_env_names, "a list of environment variable names holding gateway tokens"),
    "log_payloads": (_bool, "true or false"),
    "payload_max_bytes": (_int_in(0, MAX_PAYLOAD_CHARS), f"an integer 0..{MAX_PAYLOAD_CHARS}"),
    "allow_log_opt_out": (_bool, "true or false"),
    "max_metadata_entries": (
        _int_in(0, MAX_METADATA_ENTRIES),
        f"an integer 0..{MAX_METADATA_ENTRIES} (the event contract's maximum)",
    ),
}
_CACHE_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "enabled": (_bool, "true or false"),
    "ttl": (
        _int_in(MIN_CACHE_TTL_S, MAX_CACHE_TTL_S),
        f"an integer number of seconds {MIN_CACHE_TTL_S}..{MAX_CACHE_TTL_S} (1 minute to 30 days)",
    ),
    "client_control": (_bool, "true or false"),
    "max_entry_bytes": (_int_in(1, MAX_CACHE_ENTRY_BYTES), f"an integer 1..{MAX_CACHE_ENTRY_BYTES}"),
}
_RETRY_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "max_attempts": (_int_in(1, retries.MAX_ATTEMPTS), f"an integer 1..{retries.MAX_ATTEMPTS}"),
    "delay": (
        _int_in(0, retries.MAX_RETRY_DELAY_MS),
        f"an integer number of milliseconds 0..{retries.MAX_RETRY_DELAY_MS}",
    ),
    "backoff": (_one_of(retries.BACKOFFS), "one of " + ", ".join(retries.BACKOFFS)),
}
_RETRY_FIELD = {"max_attempts": "max_attempts", "delay": "delay_ms", "backoff": "backoff"}
_TIMEOUT_SPEC = (
    _int_in(1, retries.MAX_REQUEST_TIMEOUT_MS),
    f"an integer number of milliseconds 1..{retries.MAX_REQUEST_TIMEOUT_MS}",
)
# file key -> CachePolicy field (`ttl` reads like Cloudflare's setting; the field says its unit)
_CACHE_FIELD = {key: "ttl_s" if key == "ttl" else key for key in _CACHE_KEYS}


@dataclass(frozen=True, slots=True)
class Entry:
    pattern: str
    account: str
    gateway: str
    values: dict[str, Any]  # validated GatewayPolicy fields (tokens already resolved)
    cache: dict[str, Any]  # validated CachePolicy fields
    retry: dict[str, Any] = field(default_factory=dict)  # validated RetryPolicy fields

    @property
    def specificity(self) -> tuple[int, int, int]:
        return gateway_file.specificity(self.account, self.gateway)

    def matches(self, account: str, gateway: str) -> bool:
        return gateway_file.matches(self.account, self.gateway, account, gateway)


class _Locator:
    """Best-effort line numbers for keys (tomllib gives none): the line of `key = ...` inside the table
    `[header]`, else of the header itself."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    @staticmethod
    def _norm(s: str) -> str:
        return re.sub(r"\s+", "", s).replace("'", '"')

    def find(self, header: str, key: str | None = None) -> int | None:
        want = self._norm(f"[{header}]")
        start = None
        for i, line in enumerate(self.lines):
            if self._norm(line.split("#", 1)[0]) == want:
                start = i
                break
        if start is None:
            return None
        if key is None:
            return start + 1
        for j in range(start + 1, len(self.lines)):
            stripped = self.lines[j].strip()
            if stripped.startswith("["):
                break
            if re.match(rf"^{re.escape(key)}\s*[=.]", stripped):
                return j + 1
        return start + 1


def _check_pattern(file: str, line: int | None, pattern: str) -> tuple[str, str]:
    account, slash, gateway = pattern.partition("/")
    for side in (account, gateway):
        if not slash or not side or len(side) > ID_MAX_LENGTH or not _PATTERN_SIDE.match(side):
            raise ConfigError(
                file,
                line,
                f'gateways."{pattern}"',
                "entries are named ACCOUNT/GATEWAY, each an id (A-Z a-z 0-9 _ . -, at most "
                f"{ID_MAX_LENGTH}) or a glob of one ('*', 'team-*'); '*/*' is every gateway",
            )
    return account, gateway


def _entry(file: str, loc: _Locator, pattern: str, raw: Any, env: dict[str, str]) -> Entry:
    header = f'gateways."{pattern}"'
    line = loc.find(header)
    if not isinstance(raw, dict):
        raise ConfigError(file, line, header, "must be a table of settings")
    account, gateway = _check_pattern(file, line, pattern)
    values: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    tokens: list[str] = []
    for key, value in raw.items():
        where = loc.find(header, key)
        if key in _NOT_YET:
            raise ConfigError(file, where, f"{header}.{key}", "is not supported by this version yet")
        if key == "cache":
            if not isinstance(value, dict):
                raise ConfigError(file, where, f"{header}.cache", "must be a table: { enabled, ttl, ... }")
            for ckey, cvalue in value.items():
                cwhere = loc.find(f"{header}.cache", ckey) or where
                spec = _CACHE_KEYS.get(ckey)
                if spec is None:
                    raise ConfigError(
                        file,
                        cwhere,
                        f"{header}.cache.{ckey}",
                        f"unknown key; allowed: {', '.join(_CACHE_KEYS)}",
                    )
                cache[_CACHE_FIELD[ckey]] = _checked(file, cwhere, f"{header}.cache.{ckey}", spec, cvalue)
            continue
        if key == "retries":
            if not isinstance(value, dict):
                raise ConfigError(
                    file, where, f"{header}.retries", "must be a table: { max_attempts, delay, backoff }"
                )
            for rkey, rvalue in value.items():
                rwhere = loc.find(f"{header}.retries", rkey) or where
                rspec = _RETRY_KEYS.get(rkey)
                if rspec is None:
                    raise ConfigError(
                        file,
                        rwhere,
                        f"{header}.retries.{rkey}",
                        f"unknown key; allowed: {', '.join(_RETRY_KEYS)}",
                    )
                retry[_RETRY_FIELD[rkey]] = _checked(file, rwhere, f"{header}.retries.{rkey}", rspec, rvalue)
            continue
        if key == "request_timeout":
            retry["timeout_ms"] = _checked(file, where, f"{header}.request_timeout", _TIMEOUT_SPEC, value)
            continue
        if key == "rate_limits":
            values["rate_limits"] = _rate_limits(file, where, f"{header}.rate_limits", value)
            continue
        if key == "budgets":
            values["budgets"] = _budgets(file, where, f"{header}.budgets", value)
            continue
        if key == "provider_key":
            values["provider_key"] = _provider_key(file, where, f"{header}.provider_key", value, env)
            continue
        spec = _GATEWAY_KEYS.get(key)
        if spec is None:
            allowed = ", ".join(
                [
                    *_GATEWAY_KEYS,
                    "cache",
                    "retries",
                    "request_timeout",
                    "provider_key",
                    "rate_limits",
                    "budgets",
                ]
            )
            raise ConfigError(file, where, f"{header}.{key}", f"unknown key; allowed: {allowed}")
        checked = _checked(file, where, f"{header}.{key}", spec, value)
        if key == "tokens":
            tokens += checked
        elif key == "tokens_env":
            for name in checked:
                token = env.get(name, "")
                if not token:
                    raise ConfigError(
                        file,
                        where,
                        f"{header}.tokens_env",
                        f"environment variable {name} is not set or empty",
                    )
                tokens.append(token)
        else:
            values[key] = checked
    if "tokens" in raw or "tokens_env" in raw:
        values["tokens"] = tuple(tokens)
    return Entry(pattern, account, gateway, values, cache, retry)


_RULE_KEYS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "limit": (_positive, "a number > 0 (requests or tokens: an integer; cost: USD)"),
    "window": (
        _int_in(1, gateway_file.MAX_WINDOW_S),
        f"an integer number of seconds 1..{gateway_file.MAX_WINDOW_S}",
    ),
    "unit": (_one_of(ratelimits.UNITS), "one of " + ", ".join(ratelimits.UNITS)),
    "technique": (_one_of(ratelimits.TECHNIQUES), "one of " + ", ".join(ratelimits.TECHNIQUES)),
    "key": (_rule_key, "gateway, account, api_key or metadata.NAME (a cf-aig-metadata entry)"),
    "estimate": (
        _int_in(1, gateway_file.MAX_ESTIMATE),
        f"an integer number of tokens 1..{gateway_file.MAX_ESTIMATE}",
    ),
}
_RULE_FIELD = {"window": "window_s"}


def _rate_limits(file: str, line: int | None, key: str, value: Any) -> tuple[ratelimits.RateRule, ...]:
    if not isinstance(value, list) or len(value) > gateway_file.MAX_RULES:
        raise ConfigError(
            file,
            line,
            key,
            f"expected a list of at most {gateway_file.MAX_RULES} rules: [{{ limit, window, ... }}]",
        )
    rules = []
    for i, raw in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(raw, dict) or not {"limit", "window"} <= set(raw):
            raise ConfigError(file, line, where, "expected a table with at least limit and window")
        fields: dict[str, Any] = {}
        for rkey, rvalue in raw.items():
            spec = _RULE_KEYS.get(rkey)
            if spec is None:
                raise ConfigError(
                    file, line, f"{where}.{rkey}", f"unknown key; allowed: {', '.join(_RULE_KEYS)}"
                )
            fields[_RULE_FIELD.get(rkey, rkey)] = _checked(file, line, f"{where}.{rkey}", spec, rvalue)
        unit = fields.get("unit", "requests")
        if unit == "cost":
            fields["limit"] = max(1, round(fields["limit"] * ratelimits.MICRO))
        elif fields["limit"] != int(fields["limit"]):
            raise ConfigError(file, line, f"{where}.limit", f"{unit} limits are whole numbers")
        else:
            fields["limit"] = int(fields["limit"])
        rules.append(ratelimits.RateRule(**fields))
    return tuple(rules)


def _budgets(file: str, line: int | None, key: str, value: Any) -> tuple[ratelimits.RateRule, ...]:
    """Budgets are cost limits over calendar periods, epoch-aligned windows or the last N seconds (a
    sliding cost limit): the same counters as rate_limits. Parsed by the piece the read side shares."""
    try:
        budgets = gateway_file.parse_budgets(value)
    except gateway_file.BudgetError as exc:
        raise ConfigError(file, line, key + exc.key, exc.message) from None
    return tuple(ratelimits.budget_rule(b) for b in budgets)


def _provider_key(file: str, line: int | None, key: str, value: Any, env: dict[str, str]) -> ProviderKey:
    """`{ env = "NAME" }` or `{ file = "PATH" }`, read now; no message ever quotes what was read."""
    if not isinstance(value, dict) or len(value) != 1 or not isinstance(next(iter(value.values())), str):
        raise ConfigError(file, line, key, 'expected { env = "VARIABLE" } or { file = "PATH" }')
    ((kind, name),) = value.items()
    if kind == "env":
        if not _ENV_NAME.match(name):
            raise ConfigError(file, line, key, f"env: {name[:80]!r} is not an environment variable name")
        secret = env.get(name, "").strip()
        source = f"env {name}"
    elif kind == "file":
        try:
            secret = Path(name).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(file, line, key, f"cannot read {name}: {type(exc).__name__}") from None
        source = f"file {name}"
    else:
        raise ConfigError(file, line, key, 'expected { env = "VARIABLE" } or { file = "PATH" }')
    if not secret:
        raise ConfigError(file, line, key, f"{source} is not set or empty")
    if not _PROVIDER_KEY.match(secret):
        raise ConfigError(file, line, key, f"{source} does not hold an API key (8-512 printable characters)")
    return ProviderKey(source, secret)


def _checked(
    file: str, line: int | None, key: str, spec: tuple[Callable[[Any], Any], str], value: Any
) -> Any:
    check, allowed = spec
    try:
        return check(value)
    except (TypeError, ValueError):
        shown = "a token" if "token" in key and "env" not in key else repr(value)[:80]
        raise ConfigError(file, line, key, f"expected {allowed}, got {shown}") from None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The entries of one file over a base policy (the flags); `resolve` is memoized, bounded."""

    base: GatewayPolicy
    entries: tuple[Entry, ...] = ()
    source: str = ""  # the file it came from, "" for flags only
    _memo: dict[tuple[str, str], GatewayPolicy] = field(default_factory=dict, compare=False, repr=False)

    def resolve(self, account: str, gateway: str) -> GatewayPolicy:
        memo_key = (account, gateway)
        policy = self._memo.get(memo_key)
        if policy is not None:
            return policy
        values: dict[str, Any] = {}
        cache: dict[str, Any] = {}
        retry: dict[str, Any] = {}
        for entry in self.entries:  # sorted least specific first
            if entry.matches(account, gateway):
                values.update(entry.values)
                cache.update(entry.cache)
                retry.update(entry.retry)
        policy = dataclasses.replace(
            self.base,
            **values,
            cache=dataclasses.replace(self.base.cache, **cache),
            retry=dataclasses.replace(self.base.retry, **retry),
        )
        if len(self._memo) >= 4096:  # ids come from clients: never let them grow this without bound
            self._memo.clear()
        self._memo[memo_key] = policy
        return policy

    def with_base(self, base: GatewayPolicy) -> GatewayConfig:
        return GatewayConfig(base, self.entries, self.source)


def parse(text: str, file: str, base: GatewayPolicy, env: dict[str, str] | None = None) -> GatewayConfig:
    """Validate a configuration file's text; raises ConfigError."""
    env = dict(os.environ) if env is None else env
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise ConfigError(file, int(m.group(1)) if m else None, "", f"not valid TOML: {exc}") from None
    loc = _Locator(text)
    unknown = set(data) - {"gateways"}
    if unknown:
        key = sorted(unknown)[0]
        line = next(
            (i + 1 for i, ln in enumerate(loc.lines) if ln.strip().startswith((key, f"[{key}"))), None
        )
        raise ConfigError(
            file, line, key, 'unknown top-level key; the file holds [gateways."ACCOUNT/GATEWAY"]'
        )
    gateways = data.get("gateways", {})
    if not isinstance(gateways, dict):
        raise ConfigError(file, None, "gateways", 'must be tables: [gateways."ACCOUNT/GATEWAY"]')
    entries = [_entry(file, loc, pattern, raw, env) for pattern, raw in gateways.items()]
    entries.sort(key=lambda e: e.specificity)
    return GatewayConfig(base, tuple(entries), file)


def load(path: Path, base: GatewayPolicy) -> GatewayConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), None, "", f"cannot read the configuration: {exc}") from None
    return parse(text, str(path), base)


def check_metadata(metadata: dict[str, str], policy: GatewayPolicy) -> None:
    if len(metadata) > policy.max_metadata_entries:
        raise RouteError(
            400,
            f"invalid cf-aig-metadata header: {len(metadata)} entries, this gateway allows at most "
            f"{policy.max_metadata_entries}",
        )


class ConfigWatcher:
    """The configuration in force, reloaded when its file changes (checked every `interval_s`).

    A file that no longer parses, or disappeared, keeps the configuration in force and logs why once per
    change, so an operator's typo never takes a running gateway down or opens it up.
    """

    def __init__(self, path: Path | None, base: GatewayPolicy, counters: Counter[str] | None = None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._settling: tuple[int, int, int] | None = None  # a change seen once, not yet taken
        self.current = GatewayConfig(base)
        # "reloaded" / "refused" (the gateway's /metrics shows them)
        self.counters: Counter[str] = Counter() if counters is None else counters
        if path is not None:
            self._stamp = self._stat()
            self.current = load(path, base)  # a bad file at start is the caller's error to raise

    def set_base(self, base: GatewayPolicy) -> None:
        self.current = self.current.with_base(base)

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed; True if a new configuration is now in force. Blocking (a stat,
        and a read of a small file when it changed): run it off the event loop.

        A change is taken once the file has stayed the same for one check: an editor that truncates and
        then writes leaves a moment where the file is empty, which is valid TOML (no entries) and would
        otherwise be put in force for a second."""
        if self.path is None:
            return False
        stamp = self._stat()
        if stamp == self._stamp:
            self._settling = None
            return False
        if stamp != self._settling:
            self._settling = stamp
            return False
        self._stamp, self._settling = stamp, None
        if stamp is None:
            self.counters["refused"] += 1
            log.error("configuration %s is gone; keeping the one in force", self.path)
            return False
        try:
            new = load(self.path, self.current.base)
        except ConfigError as exc:
            self.counters["refused"] += 1
            log.error("configuration not reloaded, keeping the one in force: %s", exc)
            return False
        self.current = new
        self.counters["reloaded"] += 1
        log.info("configuration reloaded from %s (%d entries)", self.path, len(new.entries))
        return True
