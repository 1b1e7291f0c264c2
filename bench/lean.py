"""Item 3 of the benchmark issue: go past bare mitmdump.

Compares bare mitmdump and the gateway as shipped (`cohere-gateway proxy` = mitmdump's ~30 default addons
+ the gateway addon) with: the shipped gateway with kafka-python's debug logging silenced
(bench/gateway_quiet_logs.py), and the prototype in bench/lean_gateway.py: the same gateway addon on a
lean addon chain, in one process and as two worker processes sharing the port (SO_REUSEPORT). Same load
and rounds as `overhead`.
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
            stack.enter_context(targets.lean_gateway("lean bare", direct.url, "", topic, gateway=False)),
            stack.enter_context(targets.gateway("gateway", direct.url, kafka.bootstrap, topic)),
            stack.enter_context(
                targets.gateway_quiet_logs("gateway, kafka logs quiet", direct.url, kafka.bootstrap, topic)
            ),
            stack.enter_context(targets.lean_gateway("lean gateway", direct.url, kafka.bootstrap, topic)),
            stack.enter_context(
                targets.lean_gateway("lean gateway ×2", direct.url, kafka.bootstrap, topic, workers=2)
            ),
        ]
        pooled = overhead.run_rounds(tgts, sizes)
    table = overhead.results_table(tgts, pooled, sizes)
    table.title = "Lean addon chain and workers: POST /v2/chat, keep-alive HTTP/1.1"
    table.notes.append(
        "gateway, kafka logs quiet = the shipped gateway with kafka-python's loggers at WARNING "
        "(bench/gateway_quiet_logs.py): mitmdump sets the root logger to DEBUG, which makes every debug call "
        "of kafka-python's producer build and discard a log record."
    )
    table.notes.append(
        "lean = bench/lean_gateway.py: Core, Proxyserver, NextLayer, TlsConfig, ErrorCheck (+ the gateway "
        "addon) instead of mitmdump's default chain; ×2 = two such processes on one port (SO_REUSEPORT), "
        "CPU summed over both."
    )
    budget, ok = overhead.budgets(pooled, sizes, "lean gateway")
    gain = Table("Gain over the shipped gateway", ["variant", "conc.", "req/s ×", "CPU/request ×"])
    for c in sizes.concurrencies:
        base = pooled[("gateway", c)]
        for name in ("gateway, kafka logs quiet", "lean gateway", "lean gateway ×2"):
            m = pooled[(name, c)]
            gain.add(
                name, c, f"{ratio(m.load.rps, base.load.rps):.2f}",
                f"{ratio(m.cpu_per_request, base.cpu_per_request):.2f}",
            )  # fmt: skip
    scale = ratio(pooled[("lean gateway ×2", 32)].load.rps, pooled[("lean gateway", 32)].load.rps)
    budget.add(
        "workers: ×2 throughput at conc. 32 (informational)", f"{scale:.2f}× of one worker",
        f"lean gateway {pooled[('lean gateway', 32)].load.rps:.0f} req/s", "> 1× with a free core",
        verdict(scale > 1.0),
    )  # fmt: skip
    lean_bare = pooled[("lean bare", 32)].cpu_per_request
    notes = [
        f"lean bare vs bare mitmdump CPU/request at conc. 32: {us(lean_bare)} vs "
        f"{us(pooled[('bare mitmdump', 32)].cpu_per_request)} µs — the share of mitmdump's default chain",
    ]
    return Outcome([table, gain, budget], notes, ok)
