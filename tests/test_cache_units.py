"""The response cache's pieces (addons/cache.py) without a proxy: key, policy, entries, and
`ResponseCache` over the real stores (diskcache on disk, a real redis-server). The clock is a parameter
of ResponseCache, so TTL expiry is tested without waiting a minute; the stores themselves are real."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from cohere_gateway.addons import cache as c
from cohere_gateway.addons.gateway_config import CachePolicy
from cohere_gateway.addons.routing import RouteError
from tests.fixtures.redis import start_redis

KEY_ARGS = dict(
    account_id="a", gateway_id="g", tenant=c.tenant_of("key-1"), path="/v2/chat", query="", model="m"
)


def test_key_covers_tenant_gateway_path_model_and_canonical_body() -> None:
    base = c.cache_key(**KEY_ARGS, body=b'{"model": "m", "messages": [1, 2]}')
    assert base == c.cache_key(**KEY_ARGS, body=b'{"messages":[1,2],"model":"m"}')  # canonical JSON
    for change in (
        {"tenant": c.tenant_of("key-2")},
        {"tenant": c.tenant_of(None)},
        {"vary": ("text/event-stream", "")},
        {"gateway_id": "g2"},
        {"account_id": "a2"},
        {"path": "/v2/embed"},
        {"query": "?x=1"},
        {"model": "m2"},
    ):
        assert c.cache_key(**(KEY_ARGS | change), body=b'{"model":"m","messages":[1,2]}') != base, change
    assert c.cache_key(**KEY_ARGS, body=b'{"messages":[2,1],"model":"m"}') != base
    assert c.cache_key(**KEY_ARGS, body=b"not json") != c.cache_key(**KEY_ARGS, body=b"not  json")


def test_client_key_replaces_body_but_stays_in_its_tenant() -> None:
    one = c.cache_key(**KEY_ARGS, body=b"{}", client_key="answer-a")
    assert one == c.cache_key(**(KEY_ARGS | {"model": "x"}), body=b'{"other":1}', client_key="answer-a")
    other_tenant = KEY_ARGS | {"tenant": c.tenant_of("key-2")}
    assert one != c.cache_key(**other_tenant, body=b"{}", client_key="answer-a")
    assert one != c.cache_key(**(KEY_ARGS | {"gateway_id": "h"}), body=b"{}", client_key="answer-a")


def test_parse_cache_headers() -> None:
    req = c.parse_cache_headers(
        [("CF-AIG-Cache-TTL", "3600"), ("cf-aig-skip-cache", "true"), ("cf-aig-cache-key", "k1")]
    )
    assert req == c.CacheRequest(3600, True, "k1")
    for name, value, says in [
        ("cf-aig-cache-ttl", "59", "60..2592000"),
        ("cf-aig-cache-ttl", "2592001", "60..2592000"),
        ("cf-aig-cache-ttl", "1h", "integer"),
        ("cf-aig-skip-cache", "yes", "true or false"),
        ("cf-aig-cache-key", "has space", "printable"),
        ("cf-aig-cache-key", "x" * 257, "1-256"),
    ]:
        with pytest.raises(RouteError, match=says) as info:
            c.parse_cache_headers([(name, value)])
        assert info.value.status == 400 and name in info.value.message


def test_decide() -> None:
    off, on = CachePolicy(), CachePolicy(enabled=True, ttl_s=900)
    assert c.decide(off, c.CacheRequest(), "POST") == c.NO_CACHE
    assert c.decide(on, c.CacheRequest(), "GET") == c.NO_CACHE
    assert c.decide(on, c.CacheRequest(), "POST") == c.Decision("LOOKUP", 900)
    assert c.decide(on, c.CacheRequest(ttl_s=60), "POST") == c.Decision("LOOKUP", 60)
    assert c.decide(on, c.CacheRequest(skip=True), "POST").status == "BYPASS"
    # a request may ask on a gateway without caching (Cloudflare: a custom key keeps 5 minutes)
    assert c.decide(off, c.CacheRequest(key="k"), "POST") == c.Decision("LOOKUP", 300, "k")
    assert c.decide(off, c.CacheRequest(ttl_s=120), "POST") == c.Decision("LOOKUP", 120)
    # an operator who turned client control off: the headers are ignored
    closed = CachePolicy(client_control=False)
    assert c.decide(closed, c.CacheRequest(ttl_s=120, key="k"), "POST") == c.NO_CACHE
    assert c.decide(CachePolicy(True, 900, False), c.CacheRequest(skip=True), "POST").status == "LOOKUP"


def test_entry_round_trip_drops_framing_and_per_exchange_headers() -> None:
    headers = [("Content-Type", "text/event-stream"), ("Content-Length", "5"), ("Set-Cookie", "s=1")]
    headers += [("cf-aig-log-id", "x"), ("X-Trace", "t")]
    entry = c.make_entry(200, headers, b"data: 1\n\n", 60, now=1000.0)
    assert entry.headers == (("Content-Type", "text/event-stream"), ("X-Trace", "t"))
    back = c.Entry.decode(entry.encode())
    assert back == entry and back.fresh(1059.9) and not back.fresh(1060.0)
    assert c.Entry.decode(b"garbage") is None and c.Entry.decode(b'{"v": 99}\nbody') is None
    assert not c.storable(500, 10, CachePolicy()) and not c.storable(200, 10, CachePolicy(max_entry_bytes=9))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def _exercise(store: c.Store) -> None:
    clock = Clock()
    rc = c.ResponseCache(store, clock=clock)
    status, entry, leader = await rc.get_or_lead("k")
    assert (status, entry, leader) == ("MISS", None, True)
    stored = c.make_entry(200, [("content-type", "application/json")], b'{"a":1}', 60, clock.now)
    rc.finish("k", stored)
    await asyncio.wait(list(rc._tasks))
    assert rc.counters["stored"] == 1
    assert await rc.lookup("k") == ("HIT", stored)
    clock.now += 61  # past the TTL: told EXPIRED (not MISS), and the next answer replaces it
    assert await rc.lookup("k") == ("EXPIRED", None)
    status, _, leader = await rc.get_or_lead("k")
    assert (status, leader) == ("EXPIRED", True)
    rc.finish("k", None)
    await rc.close()


def test_disk_store(tmp_path: Path) -> None:
    asyncio.run(_exercise(c.DiskStore(tmp_path / "cache", 10_000_000)))


def test_redis_store_and_its_expiry(redis_url: str) -> None:
    asyncio.run(_exercise(c.RedisStore(redis_url)))

    async def expiry() -> None:
        store = c.RedisStore(redis_url)
        await store.set("short", b"v", 0.05)
        assert await store.get("short") == b"v"
        for _ in range(100):  # redis expires the key itself
            if await store.get("short") is None:
                break
            await asyncio.sleep(0.01)
        assert await store.get("short") is None
        await store.close()

    asyncio.run(expiry())


def test_disk_store_is_bounded(tmp_path: Path) -> None:
    async def fill() -> int:
        store = c.DiskStore(tmp_path / "cache", 1_000_000)
        for i in range(40):
            await store.set(f"k{i}", bytes(100_000), 3600)
        volume = store.cache.volume()
        await store.close()
        return volume

    assert asyncio.run(fill()) <= 1_000_000 + 200_000  # diskcache culls as it goes (LRU)


def test_coalescing_makes_one_leader() -> None:
    async def run() -> None:
        rc = c.ResponseCache(c.DiskStore(Path(__import__("tempfile").mkdtemp()) / "c", 10**7))
        first = await rc.get_or_lead("k")
        assert first[2] is True
        followers = [asyncio.create_task(rc.get_or_lead("k")) for _ in range(5)]
        while rc.counters["coalesced"] < 5:  # all five wait for the leader
            await asyncio.sleep(0.001)
        entry = c.make_entry(200, [], b"x", 60, rc.clock())
        rc.finish("k", entry)
        results = await asyncio.gather(*followers)
        assert all(r == ("HIT", entry, False) for r in results)
        assert rc.counters["coalesced"] == 5
        # released without an answer: followers go upstream themselves, none of them leads
        await asyncio.wait(list(rc._tasks))
        again = await rc.get_or_lead("k2")
        waiting = asyncio.create_task(rc.get_or_lead("k2"))
        while rc.counters["coalesced"] < 6:
            await asyncio.sleep(0.001)
        rc.finish("k2", None)
        assert again[2] is True and (await waiting)[1:] == (None, False)
        await rc.close()

    asyncio.run(run())


def test_a_stopped_redis_is_a_miss_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def run(url: str) -> None:
        rc = c.ResponseCache(c.RedisStore(url))
        assert await rc.lookup("k") == ("MISS", None)
        rc.finish("k", c.make_entry(200, [], b"x", 60, rc.clock()))
        await asyncio.wait(list(rc._tasks))
        assert rc.counters["store_errors"] == 2 and rc.counters["stored"] == 0
        await rc.close()

    with start_redis() as server:
        url = server.url
    asyncio.run(run(url))  # the server is stopped now
    assert "cache store read failed" in caplog.text


@pytest.fixture(params=["disk", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], c.Store]:
    """A factory of stores over one place, as each process of --workers N (disk) or each gateway on one
    Redis opens its own."""
    if request.param == "disk":
        return lambda: c.DiskStore(tmp_path / "cache", 10**7)
    url = request.getfixturevalue("redis_url")
    return lambda: c.RedisStore(url)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_coalescing_across_caches_sharing_a_store(shared_store: Callable[[], c.Store]) -> None:
    async def run() -> None:
        key = "cgw:" + uuid.uuid4().hex
        one, two = c.ResponseCache(shared_store()), c.ResponseCache(shared_store())
        assert await one.get_or_lead(key) == ("MISS", None, True)
        waiting = asyncio.create_task(two.get_or_lead(key))
        follower = asyncio.create_task(two.get_or_lead(key))  # the other process's own follower
        await until(lambda: two.counters["coalesced"] == 2, "both to wait for the other cache's leader")
        assert not waiting.done() and not follower.done()
        entry = c.make_entry(200, [], b"x", 60, one.clock())
        one.finish(key, entry)
        assert await asyncio.wait_for(asyncio.gather(waiting, follower), 10) == [("HIT", entry, False)] * 2
        # released without an answer (an error upstream): the waiter goes upstream itself at once
        key = "cgw:" + uuid.uuid4().hex
        assert (await one.get_or_lead(key))[2] is True
        waiting = asyncio.create_task(two.get_or_lead(key))
        await until(lambda: two.counters["coalesced"] == 3, "the waiter")
        one.finish(key, None)
        assert await asyncio.wait_for(waiting, 10) == ("MISS", None, True)
        two.finish(key, None)
        for rc in (one, two):
            await rc.close()

    asyncio.run(run())


def test_a_leader_that_never_finishes_holds_others_only_until_its_lock_expires(
    shared_store: Callable[[], c.Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(c, "LOCK_TTL_S", 0.5)  # 30 s in production

    async def run() -> None:
        key = "cgw:" + uuid.uuid4().hex
        dead, alive = c.ResponseCache(shared_store()), c.ResponseCache(shared_store())
        assert (await dead.get_or_lead(key))[2] is True  # and then its process dies
        started = time.monotonic()
        assert await asyncio.wait_for(alive.get_or_lead(key), 10) == ("MISS", None, True)
        assert 0.4 < time.monotonic() - started < 5 and alive.counters["coalesced"] == 1
        alive.finish(key, None)
        for rc in (dead, alive):
            await rc.close()

    asyncio.run(run())
