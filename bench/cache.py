"""Response cache (issue 16): what a hit adds, what the cache costs a miss, and what a hit saves.

1. A hit against a local 200: the same POST /v2/chat answered by the emulator directly and as a cache
   HIT of the gateway (disk cache), concurrency 1: p50/p99 and what the hit adds to them.
2. The miss path's CPU: every request a body never sent before, through a gateway with the cache on
   (lookup, leading the miss, collecting and storing the answer) and the same gateway with it off, at
   concurrency 1 and 32; rounds interleave the two and alternate which goes first.
3. Against an upstream that takes its time (emulator `--latency-ms`): a hit and a miss through the same
   gateway. Budget: the hit is faster by at least the upstream's own latency (p50).

Every timed run is checked against the gateway's /metrics: a hit run must have been all hits, a miss run
all misses, or the scenario fails rather than report numbers of something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from bench import targets
from bench.loadgen import Request, encode_request, run_load
from bench.overhead import Measured
from bench.procstat import CpuMeter
from bench.report import Outcome, Table, budget_table, verdict
from bench.stats import ms, ratio, us
from bench.workload import HEADERS, chat_body

UPSTREAM_LATENCY_MS = 50
TTL_S = 3600


@dataclass(frozen=True)
class Sizes:
    requests: int  # per target, concurrency and round (local upstream)
    seconds: float  # cap per target, concurrency and round
    rounds: int
    warmup: int
    slow_requests: int  # per target and round against the upstream with latency
    concurrencies: tuple[int, ...] = (1, 32)


FULL = Sizes(requests=3000, seconds=20.0, rounds=3, warmup=200, slow_requests=200)
QUICK = Sizes(requests=60, seconds=5.0, rounds=1, warmup=10, slow_requests=10)


def cache_counters(target: targets.Target) -> dict[str, int]:
    """The gateway's cohere_gateway_cache_total by result; {} for a target that is not a gateway."""
    if target.pid is None or not target.path_prefix:
        return {}
    with urllib.request.urlopen(target.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {m[1]: int(m[2]) for m in re.finditer(r'cohere_gateway_cache_total\{result="(\w+)"\} (\d+)', text)}


def chat_url(target: targets.Target) -> str:
    return target.url + target.path_prefix + "/v2/chat"


def same_body(target: targets.Target, text: str) -> bytes:
    return encode_request(chat_url(target), chat_body(text), HEADERS)


def new_bodies(target: targets.Target, run: str) -> Callable[[], bytes]:
    """Each call a request whose body no earlier request had: a miss, every time."""
    counter = itertools.count()
    return lambda: encode_request(chat_url(target), chat_body(f"cache bench {run} {next(counter)}"), HEADERS)


async def measure(
    target: targets.Target, request: Request, concurrency: int, requests: int, seconds: float,
    warmup: int, expect: str | None,
) -> Measured:  # fmt: skip
    """One timed run after its warm-up; `expect` ("hit"/"miss"): what every timed request must have been."""
    if warmup:
        await run_load(target.url, request, concurrency=concurrency, requests=warmup, seconds=seconds)
    before = cache_counters(target)
    meter = CpuMeter({"proxy": target.pid} if target.pid else {})
    meter.start()
    load = await run_load(target.url, request, concurrency=concurrency, requests=requests, seconds=seconds)
    used = meter.stop()
    if expect is not None:
        after = cache_counters(target)
        counted = {k: after.get(k, 0) - before.get(k, 0) for k in ("hit", "miss", "expired", "bypass")}
        wanted = {k: (load.completed + load.errors if k == expect else 0) for k in counted}
        if counted != wanted:
            raise RuntimeError(f"{target.name}: expected every timed request a {expect}, counted {counted}")
    return Measured(load, used.get("proxy", 0.0))


def prime(target: targets.Target, request: bytes) -> None:
    """One miss that stores the answer, then wait until the store has it (a hit from then on)."""
    asyncio.run(run_load(target.url, request, concurrency=1, requests=1, seconds=30))
    deadline = time.monotonic() + 30
    while cache_counters(target).get("stored", 0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: the primed answer was never stored")
        time.sleep(0.05)


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    run_id = uuid.uuid4().hex[:8]
    local: dict[str, Measured] = {}
    misses: dict[tuple[str, int], Measured] = {}
    slow: dict[str, Measured] = {}
    with contextlib.ExitStack() as stack:
        kafka = stack.enter_context(targets.kafka())
        direct = stack.enter_context(targets.emulator())
        lagging = stack.enter_context(targets.emulator("--latency-ms", str(UPSTREAM_LATENCY_MS)))
        topic = kafka.topic("bench-cache")
        on = stack.enter_context(targets.gateway("gateway, cache on", direct.url, kafka.bootstrap, topic,
                                                 cache_ttl=TTL_S))  # fmt: skip
        off = stack.enter_context(targets.gateway("gateway, cache off", direct.url, kafka.bootstrap, topic,
                                                  cache_ttl=0))  # fmt: skip
        far = stack.enter_context(targets.gateway("gateway, cache on, slow upstream", lagging.url,
                                                  kafka.bootstrap, topic, cache_ttl=TTL_S))  # fmt: skip
        hit_text = f"cache bench hit {run_id}"
        prime(on, same_body(on, hit_text))
        prime(far, same_body(far, hit_text))
        n, s, w = sizes.requests, sizes.seconds, sizes.warmup
        for r in range(sizes.rounds):
            # 1. a hit against the emulator answering the same request itself
            for name, target, request, expect in (
                ("direct", direct, same_body(direct, hit_text), None),
                ("gateway HIT", on, same_body(on, hit_text), "hit"),
                ("gateway, cache off", off, same_body(off, hit_text), None),
            ):
                local.setdefault(name, Measured()).add(
                    asyncio.run(measure(target, request, 1, n, s, w, expect))
                )
            # 2. misses, cache on and off, in alternating order
            pair = [(on, "miss"), (off, None)]
            for c in sizes.concurrencies:
                for target, expect in pair if r % 2 == 0 else pair[::-1]:
                    request = new_bodies(target, f"{run_id} r{r} c{c} {target.name}")
                    m = asyncio.run(measure(target, request, c, n, s, w, expect))
                    misses.setdefault((target.name, c), Measured()).add(m)
            # 3. against the upstream with latency
            k, ws = sizes.slow_requests, max(1, w // 10)
            for name, target, request, expect in (
                (f"direct (+{UPSTREAM_LATENCY_MS} ms)", lagging, same_body(lagging, hit_text), None),
                ("gateway MISS", far, new_bodies(far, f"{run_id} r{r} slow"), "miss"),
                ("gateway HIT", far, same_body(far, hit_text), "hit"),
            ):
                slow.setdefault(name, Measured()).add(
                    asyncio.run(measure(target, request, 1, k, 60, ws, expect))
                )
    tables = [local_table(local), miss_table(misses, sizes), slow_table(slow)]
    budget, ok = budgets(local, misses, slow, sizes)
    notes = [
        f"sizes: {sizes.requests} requests (≤ {sizes.seconds:g} s) per target, concurrency and round; "
        f"{sizes.slow_requests} against the upstream with {UPSTREAM_LATENCY_MS} ms latency; "
        f"{sizes.rounds} interleaved round(s); {sizes.warmup} warm-up requests before each",
        "cache: the default disk store (diskcache under --data-dir), TTL "
        f"{TTL_S} s; all three gateways publish their events to Kafka",
    ]
    return Outcome([*tables, budget], notes, ok)


# every table puts errors in the same column, as the CI smoke run reads them
COLUMNS = ["target", "conc.", "requests", "errors", "p50 ms", "p99 ms"]


def local_table(local: dict[str, Measured]) -> Table:
    table = Table(
        "Cache hit vs a local 200: POST /v2/chat, one body, concurrency 1, keep-alive HTTP/1.1",
        [*COLUMNS, "added p50 ms", "added p99 ms", "proxy CPU µs/req"],
    )
    base = local["direct"].load
    for name, m in local.items():
        load = m.load
        added = name != "direct"
        table.add(
            name,
            1,
            load.completed,
            load.errors,
            ms(load.p(50)),
            ms(load.p(99)),
            ms(load.p(50) - base.p(50)) if added else "—",
            ms(load.p(99) - base.p(99)) if added else "—",
            us(m.cpu_per_request) if added else "—",
        )
    table.notes.append(
        "direct: the emulator answering itself (no proxy); gateway HIT: every timed request answered from "
        "the cache (checked in /metrics); gateway, cache off: the same request forwarded, for comparison"
    )
    return table


def miss_table(misses: dict[tuple[str, int], Measured], sizes: Sizes) -> Table:
    table = Table(
        "Miss path: every request a new body, cache on vs off (same run, paired)",
        [*COLUMNS[:4], "req/s", *COLUMNS[4:], "proxy CPU µs/req"],
    )
    for c in sizes.concurrencies:
        for name in ("gateway, cache on", "gateway, cache off"):
            m = misses[(name, c)]
            load = m.load
            label = "gateway MISS (cache on)" if name.endswith("on") else name
            table.add(label, c, load.completed, load.errors, f"{load.rps:.0f}", ms(load.p(50)),
                      ms(load.p(99)), us(m.cpu_per_request))  # fmt: skip
    table.notes.append(
        "proxy CPU = utime+stime of the gateway and its children (the delivery process) over the timed "
        "requests; with the cache on it includes the lookup, the store's write (a worker thread) and "
        "collecting the answer. Cache off: the same command with caching disabled (`--cache-ttl 0`, the "
        "default), the store opened but never consulted"
    )
    return table


def slow_table(slow: dict[str, Measured]) -> Table:
    table = Table(
        f"Upstream with {UPSTREAM_LATENCY_MS} ms latency (emulator --latency-ms): hit vs miss, concurrency 1",
        COLUMNS,
    )
    for name, m in slow.items():
        load = m.load
        table.add(name, 1, load.completed, load.errors, ms(load.p(50)), ms(load.p(99)))
    return table


def budgets(
    local: dict[str, Measured],
    misses: dict[tuple[str, int], Measured],
    slow: dict[str, Measured],
    sizes: Sizes,
) -> tuple[Table, bool]:
    table = budget_table()
    hit, base = local["gateway HIT"].load, local["direct"].load
    for q in (50, 99):
        table.add(f"hit p{q} added over a local 200", f"{ms(hit.p(q) - base.p(q))} ms",
                  f"direct {ms(base.p(q))} ms", "—", "—")  # fmt: skip
    for c in sizes.concurrencies:
        on, off = misses[("gateway, cache on", c)], misses[("gateway, cache off", c)]
        table.add(
            f"miss CPU/request, cache on vs off, conc. {c}",
            f"{us(on.cpu_per_request)} µs ({ratio(on.cpu_per_request, off.cpu_per_request):.2f}×)",
            f"cache off {us(off.cpu_per_request)} µs",
            "—",
            "—",
        )
    far_hit, far_miss = slow["gateway HIT"].load, slow["gateway MISS"].load
    saved = far_miss.p(50) - far_hit.p(50)
    ok = saved >= UPSTREAM_LATENCY_MS / 1000
    table.add(
        f"hit faster than a miss, upstream latency {UPSTREAM_LATENCY_MS} ms (p50)",
        f"{ms(saved)} ms faster (hit {ms(far_hit.p(50))} ms)",
        f"miss {ms(far_miss.p(50))} ms",
        f"≥ {UPSTREAM_LATENCY_MS} ms",
        verdict(ok),
    )
    return table, ok
