"""The response cache: key, per-request policy, stored entries, stores (disk, Redis) and coalescing.

Semantics (docs/gateway.md, "Response cache"): exact match on the upstream path and query, the request
body in canonical form (JSON keys sorted), the model, and the caller's API-key fingerprint, inside one
`account_id/gateway_id` - so one tenant never receives another's answer. A client's `cf-aig-cache-key`
replaces the body and model in the key, never the gateway, the key fingerprint or the path. Only complete
2xx answers are stored: a stream only once it ended with its end event, never an error or a cut stream.

Stores never block the event loop (diskcache runs in a worker thread, Redis through redis-py's asyncio
client) and never fail a client: a store error counts, logs and answers as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from cohere_gateway.addons.gateway_config import (
    CLIENT_KEY_TTL_S,
    MAX_CACHE_TTL_S,
    MIN_CACHE_TTL_S,
    CachePolicy,
)
from cohere_gateway.addons.routing import RouteError

log = logging.getLogger("cohere_gateway.cache")

STATUS_HEADER = "cf-aig-cache-status"
ENTRY_VERSION = 1
# Upstream headers a stored answer does not replay: hop-by-hop and framing (the body is stored decoded
# and whole), cookies, and what is about this one exchange.
_DROP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "set-cookie",
        "date",
        "proxy-authenticate",
        "upgrade",
        "trailer",
        "cf-aig-log-id",
        "x-cohere-gateway-overhead-ms",
        STATUS_HEADER,
    }
)
_CLIENT_KEY = re.compile(r"^[\x21-\x7e]{1,256}$")
STORE_TIMEOUT_S = 2.0  # a store slower than this is treated as failed for this request
COALESCE_WAIT_S = 120.0  # a follower waits this long for its leader, then goes upstream itself
# Across processes (--workers, gateways on one Redis) the leader of a key holds a lock in the store for at
# most this long: a leader slower than this, or one whose process died, lets the others go upstream.
LOCK_TTL_S = 30.0
POLL_S = (0.01, 0.2)  # a waiter on another process's leader polls the store, backing off between these
# An entry stays readable this long past its expiry, so a request after it is told EXPIRED, not MISS.
EXPIRED_GRACE_S = 3600


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """What a request's cf-aig-cache-* headers ask for."""

    ttl_s: int | None = None
    skip: bool = False
    key: str | None = None


def parse_cache_headers(items: Iterable[tuple[str, str]]) -> CacheRequest:
    """cf-aig-cache-ttl (seconds, Cloudflare's bounds), cf-aig-skip-cache (bool), cf-aig-cache-key.
    A malformed value is a 400 naming the header and what is allowed."""
    ttl: int | None = None
    skip = False
    key: str | None = None
    for name, value in items:
        lname = name.lower()
        if lname == "cf-aig-cache-ttl":
            v = value.strip()
            if not v.isdigit() or not MIN_CACHE_TTL_S <= int(v) <= MAX_CACHE_TTL_S:
                raise RouteError(
                    400,
                    f"invalid cf-aig-cache-ttl header: an integer number of seconds "
                    f"{MIN_CACHE_TTL_S}..{MAX_CACHE_TTL_S} (1 minute to 30 days)",
                )
            ttl = int(v)
        elif lname == "cf-aig-skip-cache":
            v = value.strip().lower()
            if v not in ("true", "false", "1", "0"):
                raise RouteError(400, "invalid cf-aig-skip-cache header: expected true or false")
            skip = v in ("true", "1")
        elif lname == "cf-aig-cache-key":
            if not _CLIENT_KEY.match(value):
                raise RouteError(
                    400, "invalid cf-aig-cache-key header: 1-256 printable ASCII characters, no spaces"
                )
            key = value
    return CacheRequest(ttl, skip, key)


@dataclass(frozen=True, slots=True)
class Decision:
    """`status` is what the response will say before any lookup: None (caching does not apply: no
    header), "BYPASS" (asked to skip), or "LOOKUP" (look it up; the answer says HIT, MISS or EXPIRED)."""

    status: str | None
    ttl_s: int = 0
    client_key: str | None = None  # cf-aig-cache-key, when honoured


NO_CACHE = Decision(None)


@dataclass(slots=True)
class CacheState:
    """One exchange's part in the cache: what its response says and, for the leader of a miss, the
    answer being collected for storing."""

    ttl_s: int
    status: str | None = None  # HIT | MISS | EXPIRED | BYPASS once known
    client_key: str | None = None
    tenant: str = "-"  # tenant_of the API key upstream sees
    vary: tuple[str, ...] = ()  # the VARY_HEADERS' values, lower-cased
    key: str | None = None
    leader: bool = False
    chunks: list[bytes] | None = None  # a streamed answer's bytes as they pass (the leader's)
    entry: Entry | None = None  # a hit's stored answer: upstream's bytes, what its event is built from
    size: int = 0
    too_big: bool = False

    def collect(self, chunk: bytes, limit: int) -> None:
        if self.too_big or self.chunks is None:
            return
        self.size += len(chunk)
        if self.size > limit:
            self.too_big, self.chunks = True, None
        else:
            self.chunks.append(chunk)


def decide(policy: CachePolicy, req: CacheRequest, method: str) -> Decision:
    if method != "POST":  # every Cohere call worth caching is a POST; GETs are cheap and change
        return NO_CACHE
    if not policy.client_control:
        req = CacheRequest()
    asked = req.ttl_s is not None or req.key is not None
    if not (policy.enabled or asked):
        return NO_CACHE
    if req.skip:
        return Decision("BYPASS")
    # like Cloudflare: a custom key on a gateway without caching is kept five minutes
    default = policy.ttl_s if policy.enabled else CLIENT_KEY_TTL_S
    ttl = req.ttl_s if req.ttl_s is not None else default
    return Decision("LOOKUP", ttl, req.key)


def canonical_body(raw: bytes) -> bytes:
    """JSON with sorted keys and no insignificant whitespace, so `{"a":1, "b":2}` and `{"b":2,"a":1}`
    share an entry; a body that is not JSON is used byte for byte."""
    try:
        return orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        return raw


# Request headers that change the answer's bytes for the same body: v1 chat streams SSE instead of
# NDJSON when asked with the non-standard `Accepts: text/event-stream` (wire-facts), Accept is the
# standard way to ask, and Cohere-Version selects an older API behaviour.
VARY_HEADERS = ("accepts", "accept", "cohere-version")


def tenant_of(api_key: str | None) -> str:
    """The whole SHA-256 of the caller's API key: the events' 64-bit fingerprint is fine to tell keys
    apart in a dashboard, but tenant isolation should not rest on one a caller can see."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else "-"


def cache_key(
    *,
    account_id: str,
    gateway_id: str,
    tenant: str,
    path: str,
    query: str,
    model: str | None,
    body: bytes,
    vary: tuple[str, ...] = (),
    client_key: str | None = None,
) -> str:
    """SHA-256 over length-prefixed parts, so no two different part lists hash alike."""
    h = hashlib.sha256()
    parts: list[bytes] = [
        b"v1",
        account_id.encode(),
        gateway_id.encode(),
        tenant.encode(),
        path.encode(),
        query.encode(),
        *(v.encode("utf-8", "surrogateescape") for v in vary),
    ]
    if client_key is not None:
        parts += [b"client-key", client_key.encode()]
    else:
        parts += [b"body", (model or "").encode(), canonical_body(body)]
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return "cgw:" + h.hexdigest()


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    expires_at: float

    def encode(self) -> bytes:
        head = orjson.dumps(
            {
                "v": ENTRY_VERSION,
                "status": self.status,
                "headers": self.headers,
                "stored_at": self.stored_at,
                "expires_at": self.expires_at,
            }
        )
        return head + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """None for anything that is not an entry of this version (a corrupted or foreign value)."""
        head, sep, body = data.partition(b"\n")
        if not sep:
            return None
        try:
            meta = orjson.loads(head)
            if meta.get("v") != ENTRY_VERSION:
                return None
            return cls(
                int(meta["status"]),
                tuple((str(k), str(v)) for k, v in meta["headers"]),
                body,
                float(meta["stored_at"]),
                float(meta["expires_at"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None

    def fresh(self, now: float) -> bool:
        return now < self.expires_at


def make_entry(status: int, headers: Iterable[tuple[str, str]], body: bytes, ttl_s: int, now: float) -> Entry:
    kept = tuple((k, v) for k, v in headers if k.lower() not in _DROP_HEADERS)
    return Entry(status, kept, body, now, now + ttl_s)


def storable(status: int, body_size: int, policy: CachePolicy) -> bool:
    return 200 <= status < 300 and body_size <= policy.max_entry_bytes


# --- stores ------------------------------------------------------------------------------------------


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, expire_s: float) -> None: ...
    # the coalescing lock: `claim` sets `key` to `owner` only if no one holds it (atomically, for every
    # process of the store), `release` deletes it only if `owner` still holds it
    async def claim(self, key: str, owner: bytes, expire_s: float) -> bool: ...
    async def held(self, key: str) -> bool: ...
    async def release(self, key: str, owner: bytes) -> None: ...
    async def close(self) -> None: ...


def lock_key(key: str) -> str:
    return "cgw-lock:" + key.removeprefix("cgw:")


class DiskStore:
    """diskcache under `<data-dir>/cache`: SQLite index plus files, bounded in bytes with LRU eviction,
    safe for the several processes of `--workers N`, kept across restarts. Calls run in a thread."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        import diskcache

        directory.mkdir(parents=True, exist_ok=True)
        self.cache = diskcache.Cache(
            str(directory),
            size_limit=max_bytes,
            eviction_policy="least-recently-used",
            # the index is shared by processes: wait for a lock rather than fail at once
            timeout=1.0,
        )

    async def get(self, key: str) -> bytes | None:
        value = await asyncio.to_thread(self.cache.get, key, None, False, False, False, True)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, expire_s: float) -> None:
        ok = await asyncio.to_thread(self.cache.set, key, value, expire_s, False, None, True)
        if not ok:
            raise OSError("diskcache did not store the entry")

    async def claim(self, key: str, owner: bytes, expire_s: float) -> bool:
        # diskcache's add is one SQLite transaction: one process of --workers N wins
        return await asyncio.to_thread(self.cache.add, key, owner, expire_s, False, None, True)

    async def held(self, key: str) -> bool:
        return await asyncio.to_thread(self.cache.__contains__, key)

    async def release(self, key: str, owner: bytes) -> None:
        def release() -> None:
            with self.cache.transact(retry=True):
                if self.cache.get(key, retry=True) == owner:
                    self.cache.delete(key, retry=True)

        await asyncio.to_thread(release)

    async def close(self) -> None:
        await asyncio.to_thread(self.cache.close)


class RedisStore:
    """A shared Redis (`--cache-url redis://...`): several gateway instances see one cache. Eviction is
    Redis's own (`maxmemory-policy allkeys-lru` recommended); entries carry their TTL."""

    def __init__(self, url: str) -> None:
        import redis.asyncio as aredis

        self.client = aredis.Redis.from_url(
            url,
            socket_timeout=STORE_TIMEOUT_S,
            socket_connect_timeout=STORE_TIMEOUT_S,
            retry_on_timeout=False,
        )

    async def get(self, key: str) -> bytes | None:
        value = await self.client.get(key)
        return value if isinstance(value, bytes) else None

    async def set(self, key: str, value: bytes, expire_s: float) -> None:
        await self.client.set(key, value, px=max(1, int(expire_s * 1000)))

    async def claim(self, key: str, owner: bytes, expire_s: float) -> bool:
        return bool(await self.client.set(key, owner, px=max(1, int(expire_s * 1000)), nx=True))

    async def held(self, key: str) -> bool:
        return bool(await self.client.exists(key))

    async def release(self, key: str, owner: bytes) -> None:
        await self.client.eval(_RELEASE, 1, key, owner)

    async def close(self) -> None:
        await self.client.aclose()


# compare-and-delete in one step: a lock that expired and was claimed by another leader stays theirs
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def open_store(cache_url: str, data_dir: Path, max_bytes: int) -> Store | None:
    """`cache_url`: "" -> disk under data_dir, "redis://..."/"rediss://..." -> Redis, "none" -> no cache."""
    url = cache_url.strip()
    if url == "none":
        return None
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url)
    if url:
        raise ValueError(
            f"cache_url must be empty (disk), 'none' or redis://HOST:PORT[/DB], got {url[:80]!r}"
        )
    return DiskStore(data_dir, max_bytes)


# --- the cache the gateway uses ----------------------------------------------------------------------


class ResponseCache:
    """Lookups, stores and coalescing over one store, with counters for /metrics.

    Coalescing: the first miss of a key becomes its leader and goes upstream; identical requests arriving
    meanwhile wait for the leader's entry instead of calling upstream too. A leader whose answer cannot be
    stored releases its followers, who then go upstream themselves. In this process followers wait on
    the leader's future; across the processes sharing the store, the first to `claim` the key's lock in
    the store leads, and the first request of each other process polls the store until the answer is
    there or the lock is gone (LOCK_TTL_S at most), its own process's followers waiting on it.
    """

    def __init__(
        self,
        store: Store | None,
        counters: Counter[str] | None = None,
        clock: Callable[[], float] = time.time,
        shared: bool = True,
    ) -> None:
        self.store = store
        self.shared = shared  # other processes use the store too: coalesce with them through its lock
        self.clock = clock
        self.counters: Counter[str] = Counter() if counters is None else counters
        # key -> (the leader's answer to come, when it started); a stored answer stays here until the
        # store has it, so an identical request in between is a hit rather than a second upstream call
        self._leaders: dict[str, tuple[asyncio.Future[Entry | None], float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, bytes] = {}  # key -> owner token of the store locks this process holds
        self._last_error_log = 0.0

    def _failed(self, what: str, exc: BaseException) -> None:
        self.counters["store_errors"] += 1
        now = time.monotonic()
        if now - self._last_error_log > 10.0:  # one line per 10 s, not one per request
            self._last_error_log = now
            log.warning("cache store %s failed, serving from upstream: %r", what, exc)

    async def lookup(self, key: str) -> tuple[str, Entry | None]:
        """("HIT", entry) | ("MISS", None) | ("EXPIRED", None); never raises."""
        if self.store is None:
            return "MISS", None
        try:
            raw = await asyncio.wait_for(self.store.get(key), STORE_TIMEOUT_S)
        except Exception as exc:
            self._failed("read", exc)
            return "MISS", None
        entry = Entry.decode(raw) if raw is not None else None
        if entry is None:
            return "MISS", None
        if not entry.fresh(self.clock()):
            return "EXPIRED", None
        return "HIT", entry

    async def get_or_lead(self, key: str) -> tuple[str, Entry | None, bool]:
        """(status, entry, leader). A hit returns the entry; a follower of an in-flight identical miss
        waits for it; otherwise the caller leads (must call `finish(key, ...)` exactly once)."""
        status, entry = await self.lookup(key)
        if entry is not None:
            return status, entry, False
        lead = self._leaders.get(key)
        if lead is not None and time.monotonic() - lead[1] > COALESCE_WAIT_S:
            lead = None  # a leader that never finished (a bug): do not let it hold the key forever
        if lead is not None:
            pending = lead[0]
            self.counters["coalesced"] += 1  # waited for a leader instead of calling upstream too
            try:
                entry = await asyncio.wait_for(asyncio.shield(pending), COALESCE_WAIT_S)
            except TimeoutError:
                entry = None
            if entry is not None:
                return "HIT", entry, False
            return status, None, False
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._leaders[key] = (future, time.monotonic())
        try:
            entry = await self._lead_across(key)
        except BaseException:
            self._leaders.pop(key, None)
            future.set_result(None)
            raise
        if entry is not None:  # another process led, and its answer is in the store
            self._leaders.pop(key, None)
            future.set_result(entry)
            return "HIT", entry, False
        return status, None, True

    async def _lead_across(self, key: str) -> Entry | None:
        """None: this process leads (holding the store's lock when it could take it); an entry: another
        process held the lock and stored its answer meanwhile."""
        if self.store is None or not self.shared:
            return None
        lock, owner = lock_key(key), os.urandom(16)
        try:
            if await asyncio.wait_for(self.store.claim(lock, owner, LOCK_TTL_S), STORE_TIMEOUT_S):
                self._locks[key] = owner
                return None
        except Exception as exc:
            self._failed("lock", exc)
            return None
        self.counters["coalesced"] += 1
        deadline, pause = time.monotonic() + LOCK_TTL_S, POLL_S[0]
        while time.monotonic() < deadline:
            try:
                # the lock first: a leader stores its answer before it lets go, so once the lock is
                # gone the lookup after it sees the answer if there is one
                held = await asyncio.wait_for(self.store.held(lock), STORE_TIMEOUT_S)
            except Exception as exc:
                self._failed("lock", exc)
                return None
            _, entry = await self.lookup(key)
            if entry is not None or not held:
                return entry
            await asyncio.sleep(pause)
            pause = min(POLL_S[1], pause * 1.5)
        return None

    def finish(self, key: str, entry: Entry | None) -> None:
        """The leader's answer: store it (in the background: the client does not wait) and hand it to
        the followers; None releases them."""
        lead = self._leaders.get(key)
        if lead is not None and not lead[0].done():
            lead[0].set_result(entry)
        if entry is None or self.store is None:
            self._leaders.pop(key, None)
            self._background(self._release(key))
            return
        self._background(self._store(key, entry))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, key: str) -> None:
        owner = self._locks.pop(key, None)
        if owner is None or self.store is None:
            return
        try:
            await asyncio.wait_for(self.store.release(lock_key(key), owner), STORE_TIMEOUT_S)
        except Exception as exc:  # the lock expires by itself
            self._failed("unlock", exc)

    async def _store(self, key: str, entry: Entry) -> None:
        assert self.store is not None
        try:
            expire = max(1.0, entry.expires_at - self.clock()) + EXPIRED_GRACE_S
            await asyncio.wait_for(self.store.set(key, entry.encode(), expire), STORE_TIMEOUT_S)
            self.counters["stored"] += 1
        except Exception as exc:
            self._failed("write", exc)
        finally:
            self._leaders.pop(key, None)
            await self._release(key)  # after the write: a waiter that sees the lock gone finds the answer

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STORE_TIMEOUT_S)
        for pending, _ in self._leaders.values():
            if not pending.done():
                pending.set_result(None)
        for key in list(self._locks):
            await self._release(key)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
