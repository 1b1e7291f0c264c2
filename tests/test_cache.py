"""The response cache end to end: real gateway processes (`cohere-gateway proxy`), the emulator as
upstream (its request log says whether upstream was called), a real redis-server, the official `cohere`
and `openai` SDKs as clients. Every test sends bodies of its own (a uuid in them), so tests never hit
each other's entries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cohere
import diskcache
import httpx
import orjson
import pytest
from openai import OpenAI
from prometheus_client.multiprocess import MultiProcessCollector

from cohere_gateway.addons.cache import EXPIRED_GRACE_S, Entry
from cohere_gateway.events import Usage
from tests.fixtures.emulator import EmulatorRequests
from tests.fixtures.gateway import EventReader, GatewayProcess, start_gateway
from tests.fixtures.kafka import create_topic
from tests.fixtures.redis import start_redis

KEY = "cache-key-" + uuid.uuid4().hex
CONFIG = """
[gateways."acct/*"]
cache = { enabled = true, ttl = 3600 }

[gateways."acct/nocache"]
cache = { enabled = false }
"""


def uid() -> str:
    return uuid.uuid4().hex


class Statuses:
    """cf-aig-cache-status of every response an SDK's httpx client received, in order."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def hook(self, response: httpx.Response) -> None:
        self.seen.append(response.headers.get("cf-aig-cache-status"))

    async def ahook(self, response: httpx.Response) -> None:
        self.hook(response)

    def client(self) -> httpx.Client:
        return httpx.Client(event_hooks={"response": [self.hook]}, timeout=30)

    def async_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(event_hooks={"response": [self.ahook]}, timeout=30)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache-config") / "gateways.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture(scope="module")
def gw(emulator_url: str, config_file: Path) -> Iterator[GatewayProcess]:
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(config_file))
    try:
        yield g
    finally:
        g.stop()


def metric(g: GatewayProcess, result: str) -> int:
    text = g.get("/metrics").decode()
    m = re.search(rf'cohere_gateway_cache_total{{result="{result}"}} (\d+)', text)
    return int(m.group(1)) if m else 0


def _cache_counts(path: Path, *results: str) -> Iterator[float]:
    """The cache lookups with one of `results` (hit, miss, ...) counted in one worker's multiprocess file."""
    for family in MultiProcessCollector.merge([str(path)]):
        for sample in family.samples:
            if sample.name == "cohere_gateway_cache_total" and sample.labels.get("result") in results:
                yield sample.value


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def post(g: GatewayProcess, path: str, body: dict, key: str = KEY, base: str = "", **headers: str):
    """(status, headers, body) of a raw POST through the gateway."""
    req = urllib.request.Request(
        (base or g.base()) + path,
        data=orjson.dumps(body),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def chat_body(text: str, **extra: Any) -> dict:
    return {"model": "command-r", "messages": [{"role": "user", "content": text}], **extra}


# --- the official SDKs: identical results on a miss and a hit ----------------------------------------


def test_cohere_v2_chat_embed_rerank_and_stream(
    gw: GatewayProcess, emulator_requests: EmulatorRequests
) -> None:
    st = Statuses()
    co = cohere.ClientV2(api_key=KEY, base_url=gw.base() + "/cohere", httpx_client=st.client())
    msg = [{"role": "user", "content": "hello " + uid()}]
    texts = ["a " + uid(), "b"]
    docs = ["x " + uid(), "y"]
    calls = [
        ("/v2/chat", lambda: co.chat(model="command-r", messages=msg).model_dump()),
        ("/v2/embed", lambda: co.embed(
            texts=texts, model="embed-v4.0", input_type="search_document", embedding_types=["float"]
        ).model_dump()),
        ("/v2/rerank", lambda: co.rerank(model="rerank-v3.5", query="q", documents=docs).model_dump()),
        ("/v2/chat", lambda: [e.model_dump() for e in co.chat_stream(model="command-r", messages=msg)]),
    ]  # fmt: skip
    for path, call in calls:
        emulator_requests.clear()
        first, second = call(), call()
        assert first == second, path
        assert st.seen[-2:] == ["MISS", "HIT"], path
        assert len(emulator_requests.for_path(path)) == 1, f"{path}: the hit reached upstream"


def test_cohere_v1_chat_and_ndjson_stream(gw: GatewayProcess, emulator_requests: EmulatorRequests) -> None:
    st = Statuses()
    co = cohere.Client(api_key=KEY, base_url=gw.base() + "/cohere", httpx_client=st.client())
    text = "v1 " + uid()
    first, second = co.chat(message=text, model="command-r"), co.chat(message=text, model="command-r")
    assert first.model_dump() == second.model_dump() and st.seen == ["MISS", "HIT"]
    events = [[e.model_dump() for e in co.chat_stream(message=text + "s", model="command-r")] for _ in "ab"]
    assert events[0] == events[1] and events[0][-1]["event_type"] == "stream-end"
    assert st.seen == ["MISS", "HIT", "MISS", "HIT"]
    assert len(emulator_requests.for_path("/v1/chat")) == 2
    texts, docs = ["v1 embed " + uid()], ["v1 doc " + uid(), "other"]
    embeds = [co.embed(texts=texts, model="embed-english-v3.0", input_type="search_document") for _ in "ab"]
    reranks = [co.rerank(query="q", documents=docs, model="rerank-v3.5") for _ in "ab"]
    assert embeds[0].model_dump() == embeds[1].model_dump()
    assert reranks[0].model_dump() == reranks[1].model_dump()
    assert st.seen[4:] == ["MISS", "HIT", "MISS", "HIT"]
    assert len(emulator_requests.for_path("/v1/embed")) == len(emulator_requests.for_path("/v1/rerank")) == 1
    # the same body asking for SSE (Cohere's `Accepts` header) is another answer, not the NDJSON one
    body = {"message": text + "s", "model": "command-r", "stream": True}
    sse = [post(gw, "/cohere/v1/chat", body, Accepts="text/event-stream") for _ in "ab"]
    assert [r[1]["cf-aig-cache-status"] for r in sse] == ["MISS", "HIT"]
    assert all(r[1]["Content-Type"].startswith("text/event-stream") and b"data: " in r[2] for r in sse)


def test_cohere_async_client(gw: GatewayProcess, emulator_requests: EmulatorRequests) -> None:
    st = Statuses()

    async def run() -> list[list[Any]]:
        co = cohere.AsyncClientV2(api_key=KEY, base_url=gw.base() + "/cohere", httpx_client=st.async_client())
        v1 = cohere.AsyncClient(api_key=KEY, base_url=gw.base() + "/cohere", httpx_client=st.async_client())
        msg = [{"role": "user", "content": "async " + uid()}]
        text, texts, docs = "async v1 " + uid(), ["async embed " + uid()], ["async doc " + uid(), "other"]
        calls = [
            lambda: co.chat(model="command-r", messages=msg),
            lambda: co.embed(texts=texts, model="embed-v4.0", input_type="search_document",
                             embedding_types=["float"]),
            lambda: co.rerank(model="rerank-v3.5", query="q", documents=docs),
            lambda: v1.chat(message=text, model="command-r"),
        ]  # fmt: skip
        answers = [[(await call()).model_dump() for _ in "ab"] for call in calls]
        answers += [
            [[e.model_dump() async for e in co.chat_stream(model="command-r", messages=msg)] for _ in "ab"],
            [[e.model_dump() async for e in v1.chat_stream(message=text, model="command-r")] for _ in "ab"],
        ]
        return answers

    for first, second in asyncio.run(run()):
        assert first == second
    assert st.seen == ["MISS", "HIT"] * 6
    assert len(emulator_requests.for_path("/v2/chat")) == len(emulator_requests.for_path("/v1/chat")) == 2
    assert len(emulator_requests.for_path("/v2/embed")) == len(emulator_requests.for_path("/v2/rerank")) == 1


def test_openai_sdk_on_the_compat_route(gw: GatewayProcess, emulator_requests: EmulatorRequests) -> None:
    st = Statuses()
    client = OpenAI(api_key=KEY, base_url=gw.base() + "/compat", http_client=st.client())
    msgs = [{"role": "user", "content": "compat " + uid()}]
    plain = [
        client.chat.completions.create(model="cohere/command-r", messages=msgs).model_dump() for _ in "ab"
    ]
    streamed = [
        [
            c.model_dump()
            for c in client.chat.completions.create(
                model="cohere/command-r", messages=msgs, stream=True, stream_options={"include_usage": True}
            )
        ]
        for _ in "ab"
    ]
    assert plain[0] == plain[1] and streamed[0] == streamed[1]
    assert streamed[0][-1]["usage"] is not None  # the replayed stream parsed through its usage chunk
    assert st.seen == ["MISS", "HIT"] * 2
    assert len(emulator_requests.all()) == 2


def test_openai_stream_without_usage_is_the_same_on_a_hit(
    emulator_url: str, kafka_bootstrap: str, emulator_requests: EmulatorRequests
) -> None:
    """A compat stream that did not ask for usage: the gateway asks upstream for it (to price the call)
    and strips it from the answer. The store keeps upstream's bytes, so a hit must strip them too, and
    its event must still carry the usage the hit saved."""
    topic = create_topic(kafka_bootstrap, "cache-usage-" + uid()[:12])
    g = start_gateway(emulator_url, kafka_bootstrap, topic, transparent=False, cache_ttl=600)
    events = EventReader(kafka_bootstrap, topic)
    try:
        st = Statuses()
        client = OpenAI(api_key=KEY, base_url=g.base() + "/compat", http_client=st.client())
        msgs = [{"role": "user", "content": "no usage " + uid()}]
        streamed = [
            [c.model_dump() for c in client.chat.completions.create(
                model="cohere/command-r", messages=msgs, stream=True)]
            for _ in "ab"
        ]  # fmt: skip
        assert st.seen == ["MISS", "HIT"] and len(emulator_requests.all()) == 1
        assert streamed[0] == streamed[1]
        assert all(chunk["choices"] and chunk["usage"] is None for chunk in streamed[1])
        # byte for byte, and the events: the miss billed its usage, the hit kept it as saved
        body = {"model": "cohere/command-r", "messages": [{"role": "user", "content": "raw " + uid()}],
                "stream": True}  # fmt: skip
        miss, hit = (post(g, "/compat/chat/completions", body) for _ in "ab")
        assert (miss[1]["cf-aig-cache-status"], hit[1]["cf-aig-cache-status"]) == ("MISS", "HIT")
        assert miss[2] == hit[2] and b"data: [DONE]" in hit[2] and b'"usage"' not in hit[2]
        m = events.wait_for(miss[1]["cf-aig-log-id"])
        h = events.wait_for(hit[1]["cf-aig-log-id"])
        assert m.usage.input_tokens and m.usage.output_tokens and m.cost_usd
        assert (h.cache_status, h.cost_usd, h.usage) == ("HIT", 0.0, Usage())
        assert (h.saved_input_tokens, h.saved_output_tokens) == (m.usage.input_tokens, m.usage.output_tokens)
        assert h.saved_cost_usd == m.cost_usd
    finally:
        events.close()
        g.stop()


# --- policy ------------------------------------------------------------------------------------------


def test_skip_custom_key_ttl_header_and_tenants(
    gw: GatewayProcess, emulator_requests: EmulatorRequests
) -> None:
    body = chat_body("policy " + uid())
    assert post(gw, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "MISS"
    assert post(gw, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "HIT"
    skipped = post(gw, "/cohere/v2/chat", body, **{"cf-aig-skip-cache": "true"})
    assert skipped[1]["cf-aig-cache-status"] == "BYPASS"
    # another tenant (API key), same body: its own miss, never the first tenant's answer
    other = post(gw, "/cohere/v2/chat", body, key="other-" + KEY)
    assert other[1]["cf-aig-cache-status"] == "MISS"
    assert len(emulator_requests.all()) == 3
    # a custom key names the entry whatever the body, within the tenant
    ck = {"cf-aig-cache-key": "answer-" + uid()}
    a = post(gw, "/cohere/v2/chat", chat_body("one " + uid()), **ck)
    b = post(gw, "/cohere/v2/chat", chat_body("two " + uid()), **ck)
    c = post(gw, "/cohere/v2/chat", chat_body("two"), key="other-" + KEY, **ck)
    assert (a[1]["cf-aig-cache-status"], b[1]["cf-aig-cache-status"], c[1]["cf-aig-cache-status"]) == (
        "MISS", "HIT", "MISS"
    )  # fmt: skip
    assert a[2] == b[2] != c[2]
    # bad header values are the client's mistake: 400 naming the header, upstream not called
    emulator_requests.clear()
    bad = post(gw, "/cohere/v2/chat", body, **{"cf-aig-cache-ttl": "59"})
    assert bad[0] == 400 and b"cf-aig-cache-ttl" in bad[2] and emulator_requests.all() == []


def test_a_gateway_without_caching_caches_only_what_asks(
    gw: GatewayProcess, emulator_requests: EmulatorRequests
) -> None:
    base = gw.base("acct", "nocache")
    body = chat_body("nocache " + uid())
    for _ in "ab":
        status, headers, _ = post(gw, "/cohere/v2/chat", body, base=base)
        assert status == 200 and "cf-aig-cache-status" not in headers
    assert len(emulator_requests.all()) == 2
    ttl = {"cf-aig-cache-ttl": "120"}
    statuses = [post(gw, "/cohere/v2/chat", body, base=base, **ttl)[1]["cf-aig-cache-status"] for _ in "ab"]
    assert statuses == ["MISS", "HIT"]


def test_errors_and_cut_streams_are_never_stored(
    gw: GatewayProcess, emulator_requests: EmulatorRequests
) -> None:
    body = chat_body("error " + uid())
    failed = post(gw, "/cohere/v2/chat", body, **{"x-emulator-fault": "status=500"})
    assert failed[0] == 500 and failed[1]["cf-aig-cache-status"] == "MISS"
    assert post(gw, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "MISS"  # the 500 was not kept
    stream = chat_body("cut " + uid(), stream=True)
    with pytest.raises((http.client.HTTPException, OSError)):
        status, _, data = post(gw, "/cohere/v2/chat", stream, **{"x-emulator-fault": "drop-mid-stream"})
        raise AssertionError(f"stream was not cut: {status} {data[-200:]!r}")
    again = post(gw, "/cohere/v2/chat", stream)
    assert again[1]["cf-aig-cache-status"] == "MISS" and b"message-end" in again[2]
    assert post(gw, "/cohere/v2/chat", stream)[1]["cf-aig-cache-status"] == "HIT"
    assert len(emulator_requests.all()) == 4


def test_concurrent_identical_requests_make_one_upstream_call(
    gw: GatewayProcess, emulator_requests: EmulatorRequests
) -> None:
    body = chat_body("herd " + uid())
    slow = {"x-emulator-fault": "delay-ms=400"}  # the leader is still upstream when the others arrive
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post(gw, "/cohere/v2/chat", body, **slow), range(8)))
    assert {r[0] for r in results} == {200} and len({r[2] for r in results}) == 1
    assert sorted(r[1]["cf-aig-cache-status"] for r in results) == ["HIT"] * 7 + ["MISS"]
    assert len(emulator_requests.all()) == 1


def herd(targets: list[tuple[GatewayProcess, str]], body: dict) -> list[tuple[int, dict, bytes]]:
    """The same request at once through each (gateway, base), while upstream is still answering the first."""
    slow = {"x-emulator-fault": "delay-ms=600"}
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        results = list(pool.map(lambda t: post(t[0], "/cohere/v2/chat", body, base=t[1], **slow), targets))
    assert {r[0] for r in results} == {200} and len({r[2] for r in results}) == 1
    assert sorted(r[1]["cf-aig-cache-status"] for r in results) == ["HIT"] * (len(targets) - 1) + ["MISS"]
    return results


def test_concurrent_identical_requests_on_two_workers_make_one_upstream_call(
    emulator_url: str, emulator_requests: EmulatorRequests
) -> None:
    g = start_gateway(emulator_url, "", "unused", transparent=False, workers=2, cache_ttl=600)
    try:

        def answered() -> dict[str, int]:  # lookups per worker: its prometheus_client file
            files = (g.data_dir / "worker-metrics").glob("counter_*.db")
            return {f.name: int(sum(_cache_counts(f, "hit", "miss"))) for f in files}

        for _ in range(6):  # until one herd was spread over both workers (the kernel picks per connection)
            before = answered()
            emulator_requests.clear()
            herd([(g, "")] * 8, chat_body("herd on workers " + uid()))
            assert len(emulator_requests.all()) == 1
            total = sum(before.values()) + 8
            wait_for(lambda: sum(answered().values()) == total, "the workers' counters")  # noqa: B023
            after = answered()
            if len(after) == 2 and all(after[w] > before.get(w, 0) for w in after):
                break
        else:
            raise AssertionError("no herd of 8 connections reached both workers: the test proves nothing")
    finally:
        g.stop()


# --- where it lives ----------------------------------------------------------------------------------


def test_workers_share_the_disk_cache(emulator_url: str, emulator_requests: EmulatorRequests) -> None:
    g = start_gateway(emulator_url, "", "unused", transparent=False, workers=2, cache_ttl=600)
    try:
        body = chat_body("workers " + uid())
        assert post(g, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "MISS"
        wait_for(lambda: metric(g, "stored") >= 1, "the entry to be stored")

        def hits_per_worker() -> list[int]:  # each worker's own counters: its prometheus_client file
            files = (g.data_dir / "worker-metrics").glob("counter_*.db")
            return [int(sum(_cache_counts(f, "hit"))) for f in files]

        deadline = time.monotonic() + 30
        while not (len(hits_per_worker()) == 2 and min(hits_per_worker()) >= 1):
            assert time.monotonic() < deadline, f"hits per worker: {hits_per_worker()}"
            # a fresh connection each time: the kernel spreads them over both workers
            assert post(g, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "HIT"
            time.sleep(0.05)
        assert len(emulator_requests.all()) == 1
    finally:
        g.stop()


def test_two_gateways_share_a_redis_cache(emulator_url: str, emulator_requests: EmulatorRequests) -> None:
    with start_redis() as redis:
        one = start_gateway(emulator_url, "", "unused", transparent=False, cache_ttl=600, cache_url=redis.url)
        two = start_gateway(emulator_url, "", "unused", transparent=False, cache_ttl=600, cache_url=redis.url)
        try:
            body = chat_body("redis " + uid())
            first = post(one, "/cohere/v2/chat", body)
            wait_for(lambda: metric(one, "stored") >= 1, "the entry to be stored")
            second = post(two, "/cohere/v2/chat", body)
            assert (first[1]["cf-aig-cache-status"], second[1]["cf-aig-cache-status"]) == ("MISS", "HIT")
            assert first[2] == second[2] and len(emulator_requests.all()) == 1
            # the same request at once through both: one upstream call (the other gateway waits for it)
            emulator_requests.clear()
            herd([(one, ""), (two, "")] * 4, chat_body("herd on redis " + uid()))
            assert len(emulator_requests.all()) == 1
            assert metric(one, "coalesced") + metric(two, "coalesced") == 7
            # Redis stops: every request is served from upstream, nothing fails, the errors are counted
            redis.stop()
            emulator_requests.clear()
            for _ in "ab":
                status, headers, _ = post(two, "/cohere/v2/chat", body)
                assert status == 200 and headers["cf-aig-cache-status"] == "MISS"
            assert len(emulator_requests.all()) == 2
            assert metric(two, "store_errors") >= 2
            assert "cache store read failed" in two.log_text()
        finally:
            one.stop()
            two.stop()


def test_a_full_disk_serves_from_upstream(
    emulator_url: str, emulator_requests: EmulatorRequests, tmp_path: Path
) -> None:
    data = tmp_path / "gw"
    (data / "cache").mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(data / "cache")])
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs as the cache directory (a real full disk)")
    try:
        g = start_gateway(emulator_url, "", "unused", transparent=False, data_dir=data, cache_ttl=600)
        try:
            texts = [f"text {i} " + uid() for i in range(96)]  # a response larger than the free space
            body = {
                "model": "embed-v4.0",
                "texts": texts,
                "input_type": "classification",
                "embedding_types": ["float"],
            }
            for _ in "ab":
                status, headers, _ = post(g, "/cohere/v2/embed", body)
                assert status == 200 and headers["cf-aig-cache-status"] == "MISS"
                wait_for(lambda: metric(g, "store_errors") >= 1, "the failed store to be counted")
            assert len(emulator_requests.all()) == 2
        finally:
            g.stop()
    finally:
        subprocess.run(["umount", str(data / "cache")], check=False)


# --- configuration reload and events -----------------------------------------------------------------


def test_hot_reload_changes_policy_without_a_restart(
    emulator_url: str, emulator_requests: EmulatorRequests, tmp_path: Path
) -> None:
    path = tmp_path / "gateways.toml"
    path.write_text('[gateways."*/*"]\ncache = { enabled = false }\n')
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(path))
    try:
        body = chat_body("reload " + uid())
        assert "cf-aig-cache-status" not in post(g, "/cohere/v2/chat", body)[1]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            # a request in flight across the reload finishes, under the policy it started with
            slow = pool.submit(
                post, g, "/cohere/v2/chat", chat_body("slow"), **{"x-emulator-fault": "delay-ms=4000"}
            )
            wait_for(lambda: len(emulator_requests.all()) == 2, "the slow request to reach upstream")
            path.write_text('[gateways."*/*"]\ncache = { enabled = true, ttl = 600 }\n')
            wait_for(lambda: "cf-aig-cache-status" in post(g, "/cohere/v2/chat", body)[1], "the reload")
            assert not slow.done(), "the slow request ended before the reload: the test proves nothing"
            status, headers, _ = slow.result(timeout=30)
            assert status == 200 and "cf-aig-cache-status" not in headers
        assert post(g, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "HIT"
        # a broken file is refused, logged, and the policy in force stays
        path.write_text('[gateways."*/*"]\ncache = { enabled = "maybe" }\n')
        wait_for(lambda: "configuration not reloaded" in g.log_text(), "the refusal in the log")
        assert "gateways.toml:2: " in g.log_text()
        text = g.get("/metrics").decode()
        assert 'cohere_gateway_config_reloads_total{result="reloaded"} 1' in text
        assert 'cohere_gateway_config_reloads_total{result="refused"} 1' in text
        assert post(g, "/cohere/v2/chat", body)[1]["cf-aig-cache-status"] == "HIT"
        assert g.proc.poll() is None
    finally:
        g.stop()


def test_hit_events_cost_nothing_and_keep_what_they_saved(
    emulator_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = create_topic(kafka_bootstrap, "cache-" + uid()[:12])
    path = tmp_path / "gateways.toml"
    strict_entry = "allow_log_opt_out = false\nmax_metadata_entries = 1\nlog_payloads = true\n"
    path.write_text('[gateways."acct/strict"]\n' + strict_entry)
    g = start_gateway(
        emulator_url, kafka_bootstrap, topic, transparent=False, cache_ttl=600, config=str(path)
    )
    events = EventReader(kafka_bootstrap, topic)
    try:
        body = chat_body("events " + uid())
        miss = post(g, "/cohere/v2/chat", body)
        hit = post(g, "/cohere/v2/chat", body)
        m = events.wait_for(miss[1]["cf-aig-log-id"])
        h = events.wait_for(hit[1]["cf-aig-log-id"])
        assert (m.cache_status, m.cost_source, m.saved_cost_usd) == ("MISS", "pricing", None)
        assert m.cost_usd and m.cost_usd > 0
        assert (h.cache_status, h.cost_usd, h.cost_source) == ("HIT", 0.0, "cache")
        assert h.saved_cost_usd == m.cost_usd and h.outcome == "ok"
        assert (h.saved_input_tokens, h.saved_output_tokens) == (m.usage.input_tokens, m.usage.output_tokens)
        assert m.usage.input_tokens and h.usage == Usage()  # nothing billed: sums of usage stay exact
        assert h.latency.upstream_ttfb_ms is None
        # what the client is told of the gateway's own time is what its event records, a hit's too
        for resp, event in ((miss, m), (hit, h)):
            assert float(resp[1]["x-cohere-gateway-overhead-ms"]) == event.latency.gateway_overhead_ms
        # the operator's override of cf-aig-collect-log: false, and the gateway's metadata limit
        strict = g.base("acct", "strict")
        kept = post(
            g, "/cohere/v2/chat", chat_body("x " + uid()), base=strict, **{"cf-aig-collect-log": "false"}
        )
        strict_event = events.wait_for(kept[1]["cf-aig-log-id"])
        assert strict_event.gateway_id == "strict" and strict_event.request_body  # this gateway logs bodies
        assert m.request_body is None  # the others follow --no-log-payloads
        meta = {"cf-aig-metadata": '{"a": 1, "b": 2}'}
        assert post(g, "/cohere/v2/chat", chat_body("y"), base=strict, **meta)[0] == 400
        assert post(g, "/cohere/v2/chat", chat_body("y"), **meta)[0] == 200
    finally:
        events.close()
        g.stop()


def test_gateway_tokens_from_the_configuration(
    emulator_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gateways.toml"
    entry = 'tokens_env = ["CACHE_TEST_GW_TOKEN"]\ncache = { enabled = true }\n'
    path.write_text('[gateways."acct/locked"]\n' + entry)
    token = "locked-token-" + uid()
    monkeypatch.setenv("CACHE_TEST_GW_TOKEN", token)  # start_gateway passes the environment on
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(path))
    try:
        locked = g.base("acct", "locked")
        body = chat_body("locked " + uid())
        assert post(g, "/cohere/v2/chat", body, base=locked)[0] == 401
        auth = {"cf-aig-authorization": f"Bearer {token}"}
        answers = [post(g, "/cohere/v2/chat", body, base=locked, **auth) for _ in "ab"]
        assert [a[1]["cf-aig-cache-status"] for a in answers] == ["MISS", "HIT"]
        assert post(g, "/cohere/v2/chat", body, base=locked)[0] == 401  # a hit needs the token too
        assert post(g, "/cohere/v2/chat", chat_body("t"))[0] == 200  # other gateways stay open
        assert token not in g.log_text()
    finally:
        g.stop()


def test_hits_count_against_the_rate_limit(emulator_url: str, tmp_path: Path) -> None:
    """A hit is a request like any other for the gateway's limits: over the limit it is refused (429),
    never served from the cache."""
    path = tmp_path / "gateways.toml"
    path.write_text(
        '[gateways."acct/limited"]\ncache = { enabled = true }\nrate_limits = [{ limit = 2, window = 600 }]\n'
    )
    g = start_gateway(emulator_url, "", "unused", transparent=False, config=str(path))
    try:
        base = g.base("acct", "limited")
        body = chat_body("limited " + uid())
        answers = [post(g, "/cohere/v2/chat", body, base=base) for _ in "abc"]
        assert [a[0] for a in answers] == [200, 200, 429]
        assert [a[1].get("cf-aig-cache-status") for a in answers[:2]] == ["MISS", "HIT"]
        assert "cf-aig-cache-status" not in answers[2][1] and metric(g, "hit") == 1
    finally:
        g.stop()


def test_the_requests_ttl_is_the_stored_entrys(gw: GatewayProcess) -> None:
    """TTL expiry itself is tested with a clock over the real stores (test_cache_units.py) rather than
    by waiting out Cloudflare's one-minute minimum; this proves a request's TTL reaches the store."""
    _, headers, answer = post(gw, "/cohere/v2/chat", chat_body("ttl " + uid()), **{"cf-aig-cache-ttl": "120"})
    assert headers["cf-aig-cache-status"] == "MISS"
    wait_for(lambda: metric(gw, "stored") >= 1, "the entry to be stored")
    store = diskcache.Cache(str(gw.data_dir / "cache"))  # diskcache is safe to open beside the gateway
    try:

        def entry_of_answer() -> tuple[Entry, float] | None:
            for key in store.iterkeys():
                raw, expire_time = store.get(key, expire_time=True)
                entry = Entry.decode(raw) if isinstance(raw, bytes) else None
                if entry is not None and entry.body == answer:
                    return entry, expire_time
            return None

        wait_for(lambda: entry_of_answer() is not None, "the answer in the store")
        entry, expire_time = entry_of_answer()  # type: ignore[misc]
        assert entry.expires_at - entry.stored_at == 120
        assert abs(expire_time - (entry.expires_at + EXPIRED_GRACE_S)) < 5  # the store drops it after that
    finally:
        store.close()
