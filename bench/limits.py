"""Rate limits' cost: CPU per request of the gateway with three active rules (a request limit, a sliding
token limit and a daily budget, none ever reached) counted in the process and in Redis
(`--state-url`), against the same gateway with no rule, in the same run (issue 17's bench item).

The three gateways run side by side and the rounds interleave them (round 1: none, memory, Redis;
round 2: ...), so drift of a shared machine hits them alike; samples are pooled per target. Publishing
is off in all three (no Kafka): what differs is the rules alone. Redis's own CPU is reported beside the
gateway's, since with --state-url the counting happens there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import targets
from bench.loadgen import LoadResult, encode_request, run_load
from bench.overhead import FULL, QUICK, Sizes
from bench.procstat import CpuMeter
from bench.report import Outcome, Table, budget_table
from bench.stats import ms, ratio, us
from bench.workload import HEADERS, chat_body
from tests.fixtures.redis import start_redis

# Limits far beyond any run: every rule counts every request, none refuses one.
RULES = """
[gateways."*/*"]
rate_limits = [
  { limit = 1000000000, window = 3600 },
  { limit = 1000000000000, window = 3600, unit = "tokens", technique = "sliding" },
]
budgets = [{ usd = 1000000, period = "day" }]
"""
NO_RULES = '[gateways."*/*"]\nlog_payloads = false\n'
NONE, MEMORY, REDIS = "no rules", "3 rules, memory", "3 rules, Redis"


@dataclass
class Measured:
    load: LoadResult = field(default_factory=LoadResult)
    proxy_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    def per_request(self, seconds: float) -> float:
        return seconds / self.load.completed if self.load.completed else math.nan


async def measure(target: targets.Target, redis_pid: int, concurrency: int, sizes: Sizes) -> Measured:
    request = encode_request(target.url + target.path_prefix + "/v2/chat", chat_body(), HEADERS)
    await run_load(target.url, request, concurrency=concurrency, requests=sizes.warmup, seconds=sizes.seconds)
    assert target.pid is not None
    meter = CpuMeter({"proxy": target.pid, "redis": redis_pid})
    meter.start()
    load = await run_load(
        target.url, request, concurrency=concurrency, requests=sizes.requests, seconds=sizes.seconds
    )
    used = meter.stop()
    return Measured(load, used["proxy"], used["redis"])


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    pooled: dict[tuple[str, int], Measured] = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-limits-")))
        (tmp / "rules.toml").write_text(RULES)
        (tmp / "none.toml").write_text(NO_RULES)
        redis = stack.enter_context(start_redis())
        upstream = stack.enter_context(targets.emulator())

        def gateway(name: str, config: str, **options: str) -> targets.Target:
            return stack.enter_context(
                targets.gateway(name, upstream.url, "", "unused", config=str(tmp / config), **options)
            )

        tgts = [
            gateway(NONE, "none.toml"),
            gateway(MEMORY, "rules.toml"),
            gateway(REDIS, "rules.toml", state_url=redis.url),
        ]
        for _ in range(sizes.rounds):
            for c in sizes.concurrencies:
                for t in tgts:
                    m = asyncio.run(measure(t, redis.proc.pid, c, sizes))
                    acc = pooled.setdefault((t.name, c), Measured())
                    acc.load = acc.load.merge(m.load)
                    acc.proxy_cpu_s += m.proxy_cpu_s
                    acc.redis_cpu_s += m.redis_cpu_s
    table = Table(
        "Rate limits: POST /v2/chat (emulator JSON reply), keep-alive HTTP/1.1, publishing off",
        ["target", "conc.", "requests", "errors", "req/s", "p50 ms", "p99 ms", "gateway CPU µs/req",
         "redis CPU µs/req"],
    )  # fmt: skip
    for c in sizes.concurrencies:
        for t in tgts:
            m = pooled[(t.name, c)]
            table.add(
                t.name,
                c,
                m.load.completed,
                m.load.errors,
                f"{m.load.rps:.0f}",
                ms(m.load.p(50)),
                ms(m.load.p(99)),
                us(m.per_request(m.proxy_cpu_s)),
                us(m.per_request(m.redis_cpu_s)) if t.name == REDIS else "—",
            )
    table.notes.append(
        "rules: a request limit (fixed window), a sliding token limit and a daily budget, on every "
        "request and never reached. gateway CPU = utime+stime of the gateway process and its children "
        "over the timed requests; redis CPU = the redis-server's over the same requests."
    )
    ratios = budget_table()
    for c in sizes.concurrencies:
        none = pooled[(NONE, c)]
        base = none.per_request(none.proxy_cpu_s)
        for name in (MEMORY, REDIS):
            m = pooled[(name, c)]
            own = m.per_request(m.proxy_cpu_s)
            extra = f" (+ redis {us(m.per_request(m.redis_cpu_s))} µs)" if name == REDIS else ""
            ratios.add(
                f"gateway CPU/request, {name}, conc. {c}",
                f"{us(own)} µs ({ratio(own, base):.2f}×){extra}",
                f"no rules {us(base)} µs",
                "— (measured, no budget stated)",
                "—",
            )
    notes = [
        f"sizes: {sizes.requests} requests (≤ {sizes.seconds:g} s) per target, concurrency and round; "
        f"{sizes.rounds} interleaved round(s); {sizes.warmup} warm-up requests before each",
    ]
    return Outcome([table, ratios], notes, None)
