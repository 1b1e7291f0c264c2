"""Soak: memory of the gateway and the consumer while ≥ 200k requests flow through the whole pipeline
(client → gateway → Kafka → consumer → embedded ClickHouse). RSS is sampled at checkpoints once the
consumer has caught up, so a backlog does not pass for a leak; growth is judged from 50k to 200k.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench import targets
from bench.loadgen import encode_request, run_load
from bench.procstat import rss_bytes, tree_rss_bytes
from bench.report import Outcome, Table, budget_table, verdict
from bench.stats import growth, ms
from bench.workload import HEADERS, chat_body

GROWTH_LIMIT = 0.10
CONCURRENCY = 8


@dataclass(frozen=True)
class Sizes:
    checkpoints: tuple[int, ...]  # cumulative requests at which memory is sampled
    judged_from: int  # the checkpoint growth is measured from (to the last one)
    seconds_per_leg: float


FULL = Sizes((10_000, 50_000, 100_000, 150_000, 200_000), 50_000, 900.0)
QUICK = Sizes((300, 1_000), 300, 60.0)


def wait_caught_up(consumer: targets.Consumer, expected: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen = consumer.inserted()
    while seen < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = consumer.inserted()
    return seen


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    table = Table(
        f"Soak: POST /v2/chat through gateway → Kafka → consumer → chdb, concurrency {CONCURRENCY}",
        [
            "requests",
            "errors",
            "req/s (leg)",
            "p99 ms (leg)",
            "events inserted",
            "gateway RSS MiB (with its delivery process)",
            "consumer RSS MiB",
        ],
    )
    rss: dict[int, tuple[int, int]] = {}
    with targets.kafka() as kafka, targets.emulator() as direct:
        topic = kafka.topic("bench-soak")
        with (
            targets.gateway("gateway", direct.url, kafka.bootstrap, topic) as gw,
            targets.consumer(kafka.bootstrap, topic) as cons,
        ):
            assert gw.pid is not None
            request = encode_request(gw.url + gw.path_prefix + "/v2/chat", chat_body(), HEADERS)
            done = errors = 0
            for checkpoint in sizes.checkpoints:
                leg = asyncio.run(
                    run_load(
                        gw.url,
                        request,
                        concurrency=CONCURRENCY,
                        requests=checkpoint - done,
                        seconds=sizes.seconds_per_leg,
                    )
                )
                done += leg.completed + leg.errors
                errors += leg.errors
                inserted = wait_caught_up(cons, done, 120.0)
                rss[checkpoint] = (tree_rss_bytes(gw.pid), rss_bytes(cons.pid))
                table.add(
                    done,
                    errors,
                    f"{leg.rps:.0f}",
                    ms(leg.p(99)),
                    inserted,
                    f"{rss[checkpoint][0] / 2**20:.1f}",
                    f"{rss[checkpoint][1] / 2**20:.1f}",
                )
    budget = budget_table()
    first, last = rss[sizes.judged_from], rss[sizes.checkpoints[-1]]
    ok_all = True
    for i, name in enumerate(("gateway", "consumer")):
        g = growth(first[i], last[i])
        ok = g < GROWTH_LIMIT
        ok_all &= ok
        budget.add(
            f"{name} RSS growth {sizes.judged_from:,} → {sizes.checkpoints[-1]:,} requests",
            f"{g * 100:+.1f} %",
            f"{first[i] / 2**20:.1f} MiB at {sizes.judged_from:,}",
            f"< {GROWTH_LIMIT * 100:g} %",
            verdict(ok),
        )
    table.notes.append(
        "each checkpoint waits (≤ 120 s) for the consumer to have inserted every event sent so far; "
        "'events inserted' < 'requests' means it had not caught up by then"
    )
    return Outcome([table, budget], [], ok_all)
