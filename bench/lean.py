"""Item 3 of the benchmark issue: go past bare mitmdump.

`cohere-gateway proxy` runs the gateway addon on a lean mitmproxy addon chain (addons/cli.py) rather than
mitmdump's ~30 default addons, and `--workers N` runs N such processes on one port. This scenario shows
both gains against the same-run baselines: bare mitmdump, the same lean chain without the gateway addon
(bench/lean_gateway.py: the share of mitmdump's default chain), and the gateway with one and two workers.
"""

from __future__ import annotations

import contextlib

from bench import overhead, targets
from bench.report import Outcome, Table, verdict
from bench.stats import ratio, us


def run(quick: bool) -> Outcome:
    sizes = overhead.QUICK if quick else overhead.FULL
    with targets.kafka() as kafka, targets.emulator() as direct, contextlib.ExitStack() as stack:
        topic = kafka.topic("bench-lean")
        tgts = [
            direct,
            stack.enter_context(targets.bare_mitmdump(direct.url)),
            stack.enter_context(targets.lean_bare("lean bare", direct.url)),
            stack.enter_context(targets.gateway("gateway", direct.url, kafka.bootstrap, topic)),
            stack.enter_context(
                targets.gateway("gateway --workers 2", direct.url, kafka.bootstrap, topic, workers=2)
            ),
        ]
        pooled = overhead.run_rounds(tgts, sizes)
    table = overhead.results_table(tgts, pooled, sizes)
    table.title = "Lean addon chain and workers: POST /v2/chat, keep-alive HTTP/1.1"
    table.notes.append(
        "lean bare = Core, Proxyserver, NextLayer, TlsConfig, ErrorCheck without the gateway addon "
        "(bench/lean_gateway.py), the chain `cohere-gateway proxy` runs; --workers 2 = two gateway "
        "processes on one port (SO_REUSEPORT), CPU summed over the process tree."
    )
    budget, ok = overhead.budgets(pooled, sizes, "gateway")
    gain = Table("Gain of a second worker", ["conc.", "req/s ×", "CPU/request ×"])
    for c in sizes.concurrencies:
        one, two = pooled[("gateway", c)], pooled[("gateway --workers 2", c)]
        gain.add(
            c,
            f"{ratio(two.load.rps, one.load.rps):.2f}",
            f"{ratio(two.cpu_per_request, one.cpu_per_request):.2f}",
        )
    scale = ratio(pooled[("gateway --workers 2", 32)].load.rps, pooled[("gateway", 32)].load.rps)
    budget.add(
        "workers: ×2 throughput at conc. 32 (informational)", f"{scale:.2f}× of one worker",
        f"gateway {pooled[('gateway', 32)].load.rps:.0f} req/s", "> 1× with a free core",
        verdict(scale > 1.0),
    )  # fmt: skip
    lean_bare = pooled[("lean bare", 32)].cpu_per_request
    notes = [
        f"lean bare vs bare mitmdump CPU/request at conc. 32: {us(lean_bare)} vs "
        f"{us(pooled[('bare mitmdump', 32)].cpu_per_request)} µs — the share of mitmdump's default chain",
    ]
    return Outcome([table, gain, budget], notes, ok)
