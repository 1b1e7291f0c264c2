"""Gateway overhead: direct to the emulator vs bare `mitmdump --mode reverse:` vs the gateway (capture and
Kafka publishing on), at concurrency 1 and 32: req/s, p50/p99 latency, CPU per request of the proxy.

Rounds interleave the targets (round 1: direct, bare, gateway; round 2: ...) so drift of a shared machine
hits all of them alike; each target's samples are pooled over rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import checks, targets
from bench.loadgen import LoadResult, encode_request, run_load
from bench.procstat import CpuMeter
from bench.report import Outcome, Table, budget_table, verdict
from bench.stats import ms, ratio, us
from bench.workload import HEADERS, chat_body

CPU_RATIO_LIMIT = 1.10
CHECKS_SHARE_LIMIT = 0.03  # issue 13: the security checks' share of the gateway's CPU per request
P50_SLACK_S = 0.0002
P99_SLACK_S = 0.001


@dataclass(frozen=True)
class Sizes:
    requests: int  # per target, concurrency and round
    seconds: float  # cap per target, concurrency and round
    rounds: int
    warmup: int
    concurrencies: tuple[int, ...] = (1, 32)


FULL = Sizes(requests=4000, seconds=20.0, rounds=3, warmup=300)
QUICK = Sizes(requests=150, seconds=5.0, rounds=1, warmup=20)


@dataclass
class Measured:
    load: LoadResult = field(default_factory=LoadResult)
    proxy_cpu_s: float = 0.0

    @property
    def cpu_per_request(self) -> float:
        return self.proxy_cpu_s / self.load.completed if self.load.completed else math.nan

    def add(self, other: Measured) -> None:
        self.load = self.load.merge(other.load)
        self.proxy_cpu_s += other.proxy_cpu_s


async def measure(target: targets.Target, concurrency: int, sizes: Sizes) -> Measured:
    request = encode_request(target.url + target.path_prefix + "/v2/chat", chat_body(), HEADERS)
    await run_load(target.url, request, concurrency=concurrency, requests=sizes.warmup, seconds=sizes.seconds)
    meter = CpuMeter({"proxy": target.pid} if target.pid else {})
    meter.start()
    load = await run_load(
        target.url, request, concurrency=concurrency, requests=sizes.requests, seconds=sizes.seconds
    )
    used = meter.stop()
    return Measured(load, used.get("proxy", 0.0))


def run_rounds(tgts: list[targets.Target], sizes: Sizes) -> dict[tuple[str, int], Measured]:
    pooled: dict[tuple[str, int], Measured] = {}
    for _ in range(sizes.rounds):
        for c in sizes.concurrencies:
            for t in tgts:
                m = asyncio.run(measure(t, c, sizes))
                pooled.setdefault((t.name, c), Measured()).add(m)
    return pooled


def results_table(tgts: list[targets.Target], pooled: dict[tuple[str, int], Measured], sizes: Sizes) -> Table:
    table = Table(
        "Overhead: POST /v2/chat (emulator JSON reply), keep-alive HTTP/1.1",
        [
            "target",
            "conc.",
            "requests",
            "errors",
            "req/s",
            "p50 ms",
            "p99 ms",
            "proxy CPU µs/req",
            "client CPU µs/req",
        ],
    )
    for c in sizes.concurrencies:
        for t in tgts:
            m = pooled[(t.name, c)]
            load = m.load
            table.add(
                t.name,
                c,
                load.completed,
                load.errors,
                f"{load.rps:.0f}",
                ms(load.p(50)),
                ms(load.p(99)),
                us(m.cpu_per_request) if t.pid else "—",
                us(load.client_cpu_s / max(1, load.completed)),
            )
    table.notes.append(
        "proxy CPU = utime+stime of the proxy process and its children (all threads; the gateway's "
        "delivery process, so Kafka publishing, included) over the timed requests; 'direct' has no "
        "proxy. Client CPU is the load generator's own cost, "
        "the same code for every target."
    )
    return table


def budgets(pooled: dict[tuple[str, int], Measured], sizes: Sizes, gateway: str) -> tuple[Table, bool]:
    table = budget_table()
    ok_all = True
    for c in sizes.concurrencies:
        gw, bare = pooled[(gateway, c)], pooled[("bare mitmdump", c)]
        r = ratio(gw.cpu_per_request, bare.cpu_per_request)
        ok = r <= CPU_RATIO_LIMIT
        ok_all &= ok
        table.add(
            f"{gateway} CPU/request, conc. {c}",
            f"{us(gw.cpu_per_request)} µs ({r:.2f}×)",
            f"bare mitmdump {us(bare.cpu_per_request)} µs",
            f"≤ {CPU_RATIO_LIMIT:.2f}×",
            verdict(ok),
        )
        old = pooled.get((f"{gateway} (baseline install)", c))
        if old is not None:  # informational: the same gateway on another platform, same run
            table.add(
                f"{gateway} CPU/request vs baseline install, conc. {c}",
                f"{ratio(gw.cpu_per_request, old.cpu_per_request):.2f}×",
                f"baseline install {us(old.cpu_per_request)} µs",
                "—",
                "—",
            )
    gw, bare = pooled[(gateway, 1)].load, pooled[("bare mitmdump", 1)].load
    for q, slack in ((50, P50_SLACK_S), (99, P99_SLACK_S)):
        ok = gw.p(q) <= bare.p(q) + slack
        ok_all &= ok
        table.add(
            f"{gateway} p{q} latency, conc. 1",
            f"{ms(gw.p(q))} ms",
            f"bare mitmdump {ms(bare.p(q))} ms",
            f"≤ baseline + {slack * 1000:g} ms",
            verdict(ok),
        )
    return table, ok_all


def checks_budget(
    costs: list[checks.CheckCost],
    pooled: dict[tuple[str, int], Measured],
    sizes: Sizes,
    gateway: str,
    budget: Table,
) -> tuple[Table, bool]:
    """The checks' µs per request as a share of the gateway's CPU per request at each concurrency."""
    table = Table(
        "Security checks per request (bench/checks.py: the gateway's own functions on the same request)",
        ["check", "µs/request", *(f"share, conc. {c}" for c in sizes.concurrencies)],
    )
    total = sum(c.us_per_request for c in costs)
    per_request = {c: pooled[(gateway, c)].cpu_per_request * 1e6 for c in sizes.concurrencies}
    for cost in [*costs, checks.CheckCost("all checks", total)]:
        table.add(
            cost.name,
            f"{cost.us_per_request:.1f}",
            *(f"{cost.us_per_request / per_request[c]:.2%}" for c in sizes.concurrencies),
        )
    ok = True
    for c in sizes.concurrencies:
        share = total / per_request[c]
        ok &= share <= CHECKS_SHARE_LIMIT
        budget.add(
            f"security checks' share of {gateway} CPU/request, conc. {c}",
            f"{total:.1f} µs ({share:.2%})",
            f"{gateway} {per_request[c]:.0f} µs",
            f"≤ {CHECKS_SHARE_LIMIT:.0%}",
            verdict(share <= CHECKS_SHARE_LIMIT),
        )
    table.notes.append(checks.__doc__.split("\n\n")[1].replace("\n", " "))
    return table, ok


def publisher_counters(url: str) -> dict[str, int]:
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        return json.loads(r.read()).get("publisher", {})
    return {}


# Another installation to measure beside this one in the same run (e.g. the previous platform's:
# `git worktree add ../old <commit>` with its own venv): the bin/ directory holding its `mitmdump` and
# `cohere-gateway`. Its targets are named "... (baseline install)".
BASELINE_ENV = "BENCH_BASELINE_BIN"


def baseline_targets(
    stack: contextlib.ExitStack, upstream: str, kafka: targets.Kafka
) -> list[targets.Target]:
    bin_dir = os.environ.get(BASELINE_ENV)
    if not bin_dir:
        return []
    base = Path(bin_dir)
    return [
        stack.enter_context(
            targets.bare_mitmdump(upstream, str(base / "mitmdump"), "bare mitmdump (baseline install)")
        ),
        stack.enter_context(
            targets.gateway(
                "gateway (baseline install)",
                upstream,
                kafka.bootstrap,
                kafka.topic("bench-overhead"),
                command=[str(base / "cohere-gateway"), "proxy"],
            )
        ),
    ]


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    with contextlib.ExitStack() as stack:
        kafka = stack.enter_context(targets.kafka())
        direct = stack.enter_context(targets.emulator())
        bare = stack.enter_context(targets.bare_mitmdump(direct.url))
        gw = stack.enter_context(
            targets.gateway("gateway", direct.url, kafka.bootstrap, kafka.topic("bench-overhead"))
        )
        tgts = [direct, bare, gw, *baseline_targets(stack, direct.url, kafka)]
        pooled = run_rounds(tgts, sizes)
        counters = publisher_counters(gw.url)
        # After the load, so the timing loop does not compete with the targets for the cores.
        costs = checks.measure(encode_request(gw.url + gw.path_prefix + "/v2/chat", chat_body(), HEADERS))
    table = results_table(tgts, pooled, sizes)
    budget, ok = budgets(pooled, sizes, "gateway")
    checks_table, checks_ok = checks_budget(costs, pooled, sizes, "gateway", budget)
    ok &= checks_ok
    notes = [
        f"sizes: {sizes.requests} requests (≤ {sizes.seconds:g} s) per target, concurrency and round; "
        f"{sizes.rounds} interleaved round(s); {sizes.warmup} warm-up requests before each",
        "gateway publisher counters at the end: "
        + ", ".join(f"{k}={v}" for k, v in sorted(counters.items()) if k.startswith("events")),
    ]
    return Outcome([table, checks_table, budget], notes, ok)
