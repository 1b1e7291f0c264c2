"""Streaming: a v2 chat SSE stream's first event and the gaps between events, direct vs through the gateway
(and through bare mitmdump, which buffers whole responses unless an addon streams them).

The emulator paces its stream (`--chunk-delay-ms`) and makes it long (`emulator:reply-tokens=N`), so the
direct gaps are the pacing; a proxy that holds chunks back shows as longer gaps and a later first event.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field

import aiohttp

from bench import targets
from bench.report import Outcome, Table, budget_table, verdict
from bench.stats import ms, percentile
from bench.workload import HEADERS, long_stream_body

FIRST_EVENT_SLACK_S = 0.005
GAP_SLACK_S = 0.005


@dataclass(frozen=True)
class Sizes:
    streams: int  # per target and round
    tokens: int
    chunk_delay_ms: float
    rounds: int


FULL = Sizes(streams=30, tokens=60, chunk_delay_ms=10.0, rounds=2)
QUICK = Sizes(streams=3, tokens=8, chunk_delay_ms=5.0, rounds=1)


@dataclass
class StreamTimes:
    headers: list[float] = field(default_factory=list)  # request sent -> response headers
    first_event: list[float] = field(default_factory=list)  # request sent -> first complete SSE event
    gaps: list[float] = field(default_factory=list)  # between consecutive events
    total: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    errors: int = 0


def event_ends(buffer: bytes) -> int:
    """Complete SSE events in `buffer` (each ends with a blank line)."""
    return buffer.count(b"\n\n")


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, out: StreamTimes) -> None:
    started = time.perf_counter()
    arrivals: list[float] = []
    pending = b""
    async with session.post(url, data=body, headers={**HEADERS, "Accept": "text/event-stream"}) as resp:
        out.headers.append(time.perf_counter() - started)
        if resp.status != 200:
            out.errors += 1
            await resp.read()
            return
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            pending += data
            done = event_ends(pending)
            if done:
                arrivals += [now] * done
                pending = pending[pending.rindex(b"\n\n") + 2 :]
    out.total.append(time.perf_counter() - started)
    out.events.append(len(arrivals))
    if arrivals:
        out.first_event.append(arrivals[0] - started)
        out.gaps += [b - a for a, b in itertools.pairwise(arrivals)]


async def measure(target: targets.Target, sizes: Sizes, out: StreamTimes) -> None:
    url = target.url + target.path_prefix + "/v2/chat"
    body = long_stream_body(sizes.tokens)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await one_stream(session, url, body, StreamTimes())  # warm-up: connection and first-use costs
        for _ in range(sizes.streams):
            await one_stream(session, url, body, out)


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    flags = ("--chunk-delay-ms", str(sizes.chunk_delay_ms))
    times: dict[str, StreamTimes] = {}
    with (
        targets.kafka() as kafka,
        targets.emulator(*flags) as direct,
        targets.bare_mitmdump(direct.url) as bare,
        targets.gateway("gateway", direct.url, kafka.bootstrap, kafka.topic("bench-stream")) as gw,
    ):
        tgts = [direct, bare, gw]
        for _ in range(sizes.rounds):
            for t in tgts:
                asyncio.run(measure(t, sizes, times.setdefault(t.name, StreamTimes())))
    table = Table(
        f"Streaming: v2 chat SSE, {sizes.tokens} tokens, emulator pacing {sizes.chunk_delay_ms:g} ms/event",
        [
            "target",
            "streams",
            "errors",
            "events/stream",
            "headers p50 ms",
            "first event p50 ms",
            "first event p99 ms",
            "gap p50 ms",
            "gap p99 ms",
            "gap max ms",
            "total p50 ms",
        ],
    )
    for t in tgts:
        s = times[t.name]
        table.add(
            t.name,
            len(s.total),
            s.errors,
            f"{min(s.events, default=0)}–{max(s.events, default=0)}",
            ms(percentile(s.headers, 50)),
            ms(percentile(s.first_event, 50)),
            ms(percentile(s.first_event, 99)),
            ms(percentile(s.gaps, 50)),
            ms(percentile(s.gaps, 99)),
            ms(max(s.gaps, default=math.nan)),
            ms(percentile(s.total, 50)),
        )
    table.notes.append(
        "bare mitmdump buffers the whole response before sending it (no addon sets flow.response.stream): "
        "its first event arrives with the last one. The gateway streams."
    )
    budget = budget_table()
    d, g = times["direct"], times["gateway"]
    first_ok = percentile(g.first_event, 50) <= percentile(d.first_event, 50) + FIRST_EVENT_SLACK_S
    budget.add(
        "gateway first event p50",
        f"{ms(percentile(g.first_event, 50))} ms",
        f"direct {ms(percentile(d.first_event, 50))} ms",
        f"≤ direct + {FIRST_EVENT_SLACK_S * 1000:g} ms",
        verdict(first_ok),
    )
    held_ok = (
        g.errors == 0
        and sorted(set(g.events)) == sorted(set(d.events))
        and percentile(g.gaps, 99) <= percentile(d.gaps, 99) + GAP_SLACK_S
    )
    budget.add(
        "chunks never held back: same events, gap p99",
        f"{ms(percentile(g.gaps, 99))} ms",
        f"direct {ms(percentile(d.gaps, 99))} ms",
        f"≤ direct + {GAP_SLACK_S * 1000:g} ms",
        verdict(held_ok),
    )
    notes = [
        f"sizes: {sizes.streams} streams per target and round, {sizes.rounds} interleaved round(s), "
        "one warm-up stream each, one stream at a time"
    ]
    return Outcome([table, budget], notes, first_ok and held_ok)
