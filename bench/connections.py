"""Connections (issue 19, item 2): what a new client connection costs against an HTTPS upstream with a
round-trip time, without and with the gateway's upstream pool (`--upstream-pool`).

The upstream is `streamload front` (bench/streamload/front.go) before the project's emulator: real TLS
1.3 (a certificate from a CA made at start, given to the gateway as `--upstream-ca`) over a modelled
link: every byte is delayed RTT/2 each way, and the first bytes of each connection one RTT more, standing
in for the TCP handshake a loopback connect skips. A request on a new upstream connection so takes 3 RTT
(TCP, TLS, the request), on a warm one 1 RTT. It does not model loss, bandwidth or congestion, nor TLS
session resumption (which would still cost a round trip). tc netem would be the real thing; the bench
machines' kernels lack the qdisc.

Targets in one run: the front directly (the client does the TLS), and three gateways in front of it,
`--upstream-pool off`, `new-connections` and `always`; each with clients that open a new connection per
request (as serverless functions do) and clients on kept-alive connections, both `streamload reqs` (Go,
so the client does not eat the CPU the gateway is measured on). Before every timed run a warm-up of the
same shape (not counted). Per row: requests, failures, latency p50/p99, what the gateway adds over the
direct client of the same kind, upstream handshakes per 1,000 requests (TLS handshakes counted at the
front; the gateway's own `cohere_gateway_upstream_connections_total` beside them), and the gateway's
CPU per request (its process tree). The gateways publish no events (no Kafka): what delivery costs is
the same for every gateway here and is in the `overhead` scenario.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench import targets
from bench.procstat import tree_cpu_seconds
from bench.report import Outcome, Table, budget_table, verdict
from bench.streams import build
from bench.workload import HEADERS, chat_body
from tests.fixtures.gateway import free_port

POOL_MODES = ("off", "new-connections", "always")
CLIENTS = ("new connection per request", "kept-alive connections")
# The goal for a request on a new client connection: no handshake. Judged on the default policy.
HANDSHAKES_PER_1000_LIMIT = 10.0
# A new client connection's p50 within half an RTT of a kept one's: an upstream handshake would add 2 RTT
# (TCP and TLS), what is left is the gateway's own work on a new client connection.
NEW_VS_KEPT_SLACK_RTT = 0.5


@dataclass(frozen=True)
class Sizes:
    requests: int  # per target, client kind and round
    concurrency: int
    rounds: int
    warmup: int  # requests before each timed run, same shape
    rtt_ms: float


FULL = Sizes(requests=1500, concurrency=8, rounds=2, warmup=64, rtt_ms=40.0)
QUICK = Sizes(requests=40, concurrency=4, rounds=1, warmup=8, rtt_ms=20.0)


@dataclass
class Front:
    url: str
    ca_file: Path
    stats_url: str

    def handshakes(self) -> int:
        deadline = time.monotonic() + 10
        while True:  # its stats listener starts beside the TLS one
            try:
                with urllib.request.urlopen(self.stats_url, timeout=5) as resp:
                    return int(json.loads(resp.read())["handshakes"])
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@contextlib.contextmanager
def front(binary: Path, emulator_url: str, rtt_ms: float, tmp: Path) -> Iterator[Front]:
    port, stats = free_port(), free_port()
    ca_file = tmp / "front-ca.pem"
    args = [str(binary), "front", "-addr", f"127.0.0.1:{port}", "-to", emulator_url.split("//", 1)[1],
            "-rtt-ms", str(rtt_ms), "-ca-out", str(ca_file), "-stats-addr", f"127.0.0.1:{stats}"]  # fmt: skip
    with targets.process("front", args, port):
        yield Front(f"https://127.0.0.1:{port}", ca_file, f"http://127.0.0.1:{stats}/stats")


@dataclass
class Run:
    requests: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_p50: list[float] = field(default_factory=list)  # one per round (ms)
    latencies_p99: list[float] = field(default_factory=list)
    handshakes: int = 0  # at the front
    counted: dict[str, int] = field(default_factory=dict)  # the gateway's own counter, by path
    cpu_s: float = 0.0

    @property
    def p50(self) -> float:
        return sorted(self.latencies_p50)[len(self.latencies_p50) // 2]

    @property
    def p99(self) -> float:
        return max(self.latencies_p99)


def upstream_connections(target: targets.Target) -> dict[str, int]:
    """The gateway's cohere_gateway_upstream_connections_total by path; {} for the direct target."""
    if target.pid is None or not target.path_prefix:
        return {}
    with urllib.request.urlopen(target.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    pattern = r'cohere_gateway_upstream_connections_total\{path="(\w+)"\} ([\d.]+)'
    return {m[1]: int(float(m[2])) for m in re.finditer(pattern, text)}


def reqs(binary: Path, target: targets.Target, ca: Path, body: Path, n: int, sizes: Sizes, new: bool) -> dict:
    args = [str(binary), "reqs", "-url", f"{target.url}{target.path_prefix}/v2/chat", "-body", str(body),
            "-requests", str(n), "-concurrency", str(sizes.concurrency), "-ca", str(ca)]  # fmt: skip
    args += ["-new-conn"] if new else []
    for name, value in HEADERS.items():
        args += ["-header", f"{name}: {value}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"streamload reqs exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def measure(binary: Path, target: targets.Target, fr: Front, body: Path, sizes: Sizes, new: bool,
            run: Run) -> None:  # fmt: skip
    reqs(binary, target, fr.ca_file, body, sizes.warmup, sizes, new)
    handshakes, counted = fr.handshakes(), upstream_connections(target)
    cpu0 = tree_cpu_seconds(target.pid) if target.path_prefix and target.pid else 0.0
    result = reqs(binary, target, fr.ca_file, body, sizes.requests, sizes, new)
    if target.path_prefix and target.pid:
        run.cpu_s += tree_cpu_seconds(target.pid) - cpu0
    run.handshakes += fr.handshakes() - handshakes
    for path, value in upstream_connections(target).items():
        run.counted[path] = run.counted.get(path, 0) + value - counted.get(path, 0)
    run.requests += result["requests"]
    run.failures += result["failures"]
    for error, count in result["errors"].items():
        run.errors[error] = run.errors.get(error, 0) + count
    run.latencies_p50.append(result["p50_ms"])
    run.latencies_p99.append(result["p99_ms"])


def _per_1000(count: int, requests: int) -> str:
    return f"{1000 * count / requests:.1f}" if requests else "—"


def run(quick: bool) -> Outcome:
    sizes = QUICK if quick else FULL
    default = _default_mode()
    runs: dict[tuple[str, str], Run] = {}
    with tempfile.TemporaryDirectory(prefix="bench-connections-") as tmp_name:
        tmp = Path(tmp_name)
        binary = build(tmp)
        body = tmp / "request.json"
        body.write_bytes(chat_body())
        with contextlib.ExitStack() as stack:
            emulator = stack.enter_context(targets.emulator())
            fr = stack.enter_context(front(binary, emulator.url, sizes.rtt_ms, tmp))
            tgts = {"direct": targets.Target("direct", fr.url, "", None)}
            for mode in POOL_MODES:
                ca = str(fr.ca_file)
                gw = targets.gateway(f"gateway, pool {mode}", fr.url, "", "unused", upstream_pool=mode,
                                     upstream_ca=ca)  # fmt: skip
                tgts[mode] = stack.enter_context(gw)
            for _ in range(sizes.rounds):  # rounds interleave the targets: drift hits them alike
                for client in CLIENTS:
                    for key, t in tgts.items():
                        r = runs.setdefault((key, client), Run())
                        measure(binary, t, fr, body, sizes, client == CLIENTS[0], r)
    table = Table(
        f"Connections: POST /v2/chat to an HTTPS upstream with {sizes.rtt_ms:g} ms RTT (TLS 1.3), "
        f"concurrency {sizes.concurrency}",
        ["target", "clients", "requests", "failures", "p50 / p99 ms", "added p50 / p99 ms",
         "upstream handshakes /1000 req", "gateway counted (mitmproxy / pool)", "gateway CPU µs/req"],
    )  # fmt: skip
    for client in CLIENTS:
        base = runs[("direct", client)]
        for key, t in tgts.items():
            r = runs[(key, client)]
            gateway = key != "direct"
            table.add(
                t.name,
                client,
                r.requests,
                r.failures if not r.errors else f"{r.failures} {r.errors}",
                f"{r.p50:.1f} / {r.p99:.1f}",
                f"{r.p50 - base.p50:+.1f} / {r.p99 - base.p99:+.1f}" if gateway else "—",
                _per_1000(r.handshakes, r.requests),
                f"{r.counted.get('mitmproxy', 0)} / {r.counted.get('pool', 0)}" if gateway else "—",
                f"{1e6 * r.cpu_s / r.requests:.0f}" if gateway and r.requests else "—",
            )
    table.notes.append(f"--upstream-pool's default: {default}")
    table.notes.append(
        "p50 is the median of the rounds' p50s, p99 the largest of their p99s; handshakes are the front's "
        "completed TLS handshakes over the timed requests (the direct client's own, for 'direct')"
    )
    budgets, met = _budgets(runs, sizes, default)
    notes = [
        f"sizes: {sizes.requests} requests per target, client kind and round, {sizes.rounds} interleaved "
        f"round(s), {sizes.warmup} warm-up requests before each; RTT {sizes.rtt_ms:g} ms",
        "upstream: bench/streamload front (Go) before the emulator; client: bench/streamload reqs (Go)",
    ]
    return Outcome([table, budgets], notes, None if quick else met)


def _default_mode() -> str:
    from cohere_gateway.settings import ProxySettings

    return ProxySettings.upstream_pool


def _budgets(runs: dict[tuple[str, str], Run], sizes: Sizes, default: str) -> tuple[Table, bool]:
    table = budget_table()
    fresh, kept = runs[(default, CLIENTS[0])], runs[(default, CLIENTS[1])]
    off_kept = runs[("off", CLIENTS[1])]
    rate = 1000 * fresh.handshakes / fresh.requests if fresh.requests else float("inf")
    slack = NEW_VS_KEPT_SLACK_RTT * sizes.rtt_ms
    checks = [
        ("upstream handshakes per 1,000 requests on new client connections, default",
         f"{rate:.1f}", "—", f"≤ {HANDSHAKES_PER_1000_LIMIT:g}", rate <= HANDSHAKES_PER_1000_LIMIT),
        ("p50 of a request on a new client connection, default",
         f"{fresh.p50:.1f} ms", f"kept-alive client, pool off: {off_kept.p50:.1f} ms",
         f"≤ baseline + {slack:g} ms (RTT/2)", fresh.p50 <= off_kept.p50 + slack),
        ("failures, default", str(fresh.failures + kept.failures), "—", "0",
         fresh.failures + kept.failures == 0),
    ]  # fmt: skip
    met = True
    for label, measured, baseline, limit, ok in checks:
        table.add(label, measured, baseline, limit, verdict(ok))
        met = met and ok
    return table, met
