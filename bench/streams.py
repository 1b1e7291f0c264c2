"""Streams (issue 19): many long paced v2 chat streams open at once, each on a new client connection,
direct vs through the gateway (`--workers 1` and 2) in the same run.

The load and the upstream are native (bench/streamload, Go, built here with `go build`), so neither eats
the CPU the gateway is measured on: `streamload serve` replays a stream recorded from the project's
emulator (Cohere's wire format, usage included) one event every `chunk_delay_ms`; `streamload load`
opens the streams spread over a ramp and times every event. Per target and size: failures, first event
and inter-event gap p50/p99 (added over direct), the gateway's CPU over the run (share of one core per
worker), its RSS growth per open stream (peak over idle, the delivery process included), and event-loop
lag (a /healthz probe through the same listener every 100 ms, p99).

`python -m bench.streams` runs other sizes (`--streams`, `--workers`) and, with `--pin`, keeps the gateway
on one core and everything else (load, upstream, Kafka, this process) on the other: on a host that runs
all of them, it tells the gateway's own gap from the one a saturated host adds. Host CPU (all cores, over
the plateau) is reported so the two can be told apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import targets
from bench.procstat import host_cpu_busy, tree_cpu_seconds, tree_rss_bytes
from bench.report import Outcome, Table, budget_table, verdict
from bench.stats import percentile
from bench.workload import HEADERS, long_stream_body
from tests.fixtures.gateway import free_port, gateway_command

TOOL = Path(__file__).with_name("streamload")
GAP_SLACK_MS = 5.0
RSS_PER_STREAM_KB = 30.0
CPU_CEILING = 0.8


@dataclass(frozen=True)
class Sizes:
    streams: tuple[int, ...]
    tokens: int  # events per stream: the reply's tokens plus the stream's framing events
    chunk_delay_ms: float
    arrivals_per_s: int  # new streams (connections) a second while they open
    workers: tuple[int, ...]

    def ramp_ms(self, streams: int) -> int:
        return round(1000 * streams / self.arrivals_per_s)


# Streams of ~40 s (80 events, 0.5 s apart) arriving at 150 a second: every stream of a size is open at
# once, the new-connection rate stays what a core can take, and 5,000 open streams make 10k events/s.
FULL = Sizes(streams=(100, 1000, 5000), tokens=80, chunk_delay_ms=500.0, arrivals_per_s=150, workers=(1, 2))
QUICK = Sizes(streams=(20,), tokens=5, chunk_delay_ms=5.0, arrivals_per_s=100, workers=(1,))


def build(out: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(
            "the streams bench builds bench/streamload with Go >= 1.19: "
            "install it (apt-get install golang-go)"
        )
    binary = out / "streamload"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=TOOL, check=True, timeout=600)
    return binary


def record_stream(tokens: int) -> bytes:
    """One v2 chat stream as the emulator sends it: the bytes the native upstream replays."""
    with targets.emulator() as emulator:
        request = urllib.request.Request(
            f"{emulator.url}/v2/chat", data=long_stream_body(tokens), headers=HEADERS, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()


@contextmanager
def upstream(binary: Path, stream: Path, delay_ms: float) -> Iterator[targets.Target]:
    port = free_port()
    args = [str(binary), "serve", "-addr", f"127.0.0.1:{port}", "-body", str(stream)]
    with targets.process("direct", [*args, "-chunk-delay-ms", str(delay_ms)], port) as target:
        yield target


@dataclass
class Run:
    target: str
    streams: int
    result: dict
    # CPU seconds / wall seconds of the gateway's process tree while every stream is open (after the
    # ramp, before the first stream ends): the steady state, not the connection storm of the ramp
    cpu_core: float | None = None
    rss_per_stream_kb: float | None = None
    lag_p99_ms: float | None = None
    probe_failures: int = 0
    host_cpu: float | None = None  # busy share of all the host's cores over the same plateau


PROBE_TIMEOUT_S = 10.0


def _probe(url: str, stop: threading.Event, lags: list[float], failed: list[int]) -> None:
    """/healthz through the gateway's listener every 100 ms: its latency is the event loop's lag. A probe
    that fails or times out counts as PROBE_TIMEOUT_S, so an overloaded loop does not read as a quick one."""
    while not stop.wait(0.1):
        started = time.perf_counter()
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=PROBE_TIMEOUT_S).read()
        except OSError:
            failed.append(1)
            lags.append(PROBE_TIMEOUT_S)
            continue
        lags.append(time.perf_counter() - started)


def load(binary: Path, target: targets.Target, request: Path, streams: int, sizes: Sizes, events: int) -> Run:
    """`streams` streams through `target`; a stream with fewer than `events` events is a failure."""
    ramp_s = sizes.ramp_ms(streams) / 1000
    args = [str(binary), "load", "-url", f"{target.url}{target.path_prefix}/v2/chat", "-body", str(request)]
    args += ["-streams", str(streams), "-ramp-ms", str(sizes.ramp_ms(streams)), "-events", str(events)]
    for name in ("Authorization", "User-Agent"):
        args += ["-header", f"{name}: {HEADERS[name]}"]
    pid = target.pid if target.name != "direct" else None
    idle_rss = tree_rss_bytes(pid) if pid else 0
    peak_rss = idle_rss
    # The plateau: every stream opened (the ramp and a second), none ended yet.
    plateau = (ramp_s + 1.0, ramp_s + 1.0 + max(1.0, events * sizes.chunk_delay_ms / 1000 - 3.0))
    cpu_marks: dict[int, tuple[float, float]] = {}
    host_marks: dict[int, tuple[float, float]] = {}
    stop, lags, failed = threading.Event(), [], []
    probe = threading.Thread(target=_probe, args=(target.url, stop, lags, failed), daemon=True)
    if pid:
        probe.start()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        started = time.monotonic()
        while proc.poll() is None:
            if pid:
                peak_rss = max(peak_rss, tree_rss_bytes(pid))
                elapsed = time.monotonic() - started
                for i, mark in enumerate(plateau):
                    if elapsed >= mark and i not in cpu_marks:
                        cpu_marks[i] = (time.monotonic(), tree_cpu_seconds(pid))
                        host_marks[i] = host_cpu_busy()
            time.sleep(0.1)
        stop.set()
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"streamload load exited with {proc.returncode}: {err.read()[-2000:]}")
        result = json.loads(out.read())
    run = Run(target.name, streams, result, probe_failures=len(failed))
    if pid:
        if len(cpu_marks) == 2:
            (t0, c0), (t1, c1) = cpu_marks[0], cpu_marks[1]
            run.cpu_core = (c1 - c0) / (t1 - t0)
            (b0, a0), (b1, a1) = host_marks[0], host_marks[1]
            run.host_cpu = (b1 - b0) / max(1e-9, a1 - a0)
        run.rss_per_stream_kb = (peak_rss - idle_rss) / 1024 / max(1, int(result["peak_open"]))
        run.lag_p99_ms = percentile(lags, 99) * 1000 if lags else None
    return run


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


# --pin: the gateway on one core, everything else on the others (the host has at least two).
GATEWAY_CORE = 1


def run(
    quick: bool, sizes: Sizes | None = None, pin: bool = False, options: dict[str, str | bool] | None = None
) -> Outcome:
    sizes = sizes or (QUICK if quick else FULL)
    runs: list[Run] = []
    # Everything this process starts inherits its cores: the gateway alone is moved to GATEWAY_CORE.
    own = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, own - {GATEWAY_CORE})
    command = ["taskset", "-c", str(GATEWAY_CORE), *gateway_command()] if pin else None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
            binary = build(Path(tmp))
            stream, request = Path(tmp) / "stream.sse", Path(tmp) / "request.json"
            recorded = record_stream(sizes.tokens)
            events = recorded.strip().count(b"\n\n") + 1
            stream.write_bytes(recorded)
            request.write_bytes(long_stream_body(sizes.tokens))
            with targets.kafka() as kafka, upstream(binary, stream, sizes.chunk_delay_ms) as direct:
                topic = kafka.topic("bench-streams")
                for n in sizes.streams:
                    runs.append(load(binary, direct, request, n, sizes, events))
                    for w in sizes.workers:
                        # A fresh gateway per size, so its RSS growth is this size's alone; its connection
                        # cap (--max-connections, default 1,024 a worker) raised to hold every stream.
                        with targets.gateway(
                            f"gateway ×{w}",
                            direct.url,
                            kafka.bootstrap,
                            topic,
                            command=command,
                            workers=w,
                            max_connections=n + 100,
                            **(options or {}),
                        ) as gw:
                            runs.append(load(binary, gw, request, n, sizes, events))
    finally:
        os.sched_setaffinity(0, own)
    table = Table(
        f"Streams: v2 chat SSE, {sizes.tokens}-token replies, {sizes.chunk_delay_ms:g} ms between events, "
        f"each on a new connection, {sizes.arrivals_per_s} new a second",
        [
            "target",
            "streams",
            "peak open",
            "failures",
            "first event p50 / p99 ms",
            "gap p50 / p99 / max ms",
            "gateway CPU, all open (cores)",
            "RSS per open stream KB",
            "/healthz p99 ms (loop lag)",
            "host CPU, all open",
        ],
    )
    for r in runs:
        res = r.result
        table.add(
            r.target,
            r.streams,
            res["peak_open"],
            res["failures"] if not res["errors"] else f"{res['failures']} {res['errors']}",
            f"{res['first_p50_ms']:.1f} / {res['first_p99_ms']:.1f}",
            f"{res['gap_p50_ms']:.1f} / {res['gap_p99_ms']:.1f} / {res['gap_max_ms']:.1f}",
            _fmt(r.cpu_core, 2),
            _fmt(r.rss_per_stream_kb),
            _fmt(r.lag_p99_ms) + (f" ({r.probe_failures} failed)" if r.probe_failures else ""),
            "—" if r.host_cpu is None else f"{r.host_cpu:.0%}",
        )
    budgets = budget_table()
    met = True
    directs = {r.streams: r for r in runs if r.target == "direct"}
    for r in runs:
        if r.target == "direct":
            continue
        base = directs[r.streams].result
        added = r.result["gap_p99_ms"] - base["gap_p99_ms"]
        workers = int(r.target.rsplit("×", 1)[1])
        cpu_ok = r.cpu_core is not None and r.cpu_core / workers < CPU_CEILING
        checks = [
            (f"{r.target}, {r.streams} streams: failures", str(r.result["failures"]), "—", "0",
             r.result["failures"] == 0),
            (f"{r.target}, {r.streams} streams: added gap p99 (CPU {_fmt(r.cpu_core, 2)} cores)",
             f"{added:+.1f} ms", f"direct {base['gap_p99_ms']:.1f} ms",
             f"≤ +{GAP_SLACK_MS:g} ms, CPU < {CPU_CEILING:.0%} a worker", added <= GAP_SLACK_MS and cpu_ok),
            (f"{r.target}, {r.streams} streams: RSS per open stream", f"{_fmt(r.rss_per_stream_kb)} KB", "—",
             f"≤ {RSS_PER_STREAM_KB:g} KB", (r.rss_per_stream_kb or 0) <= RSS_PER_STREAM_KB),
        ]  # fmt: skip
        for name, measured, baseline, limit, ok in checks:
            budgets.add(name, measured, baseline, limit, verdict(ok))
            met = met and ok
    notes = [
        "load and upstream: bench/streamload (Go), built in the run; the upstream replays a stream recorded "
        "from the emulator",
        "gateway CPU = CPU seconds of its process tree (workers, delivery processes) over the load's wall"
        " time",
        *([f"pinned: the gateway on core {GATEWAY_CORE}; load, upstream, Kafka elsewhere"] if pin else []),
        *([f"gateway options: {options}"] if options else []),
    ]
    return Outcome([table, budgets], notes, None if quick else met)


def main(argv: list[str] | None = None) -> int:
    """Other sizes than the recorded run's, printed only: for finding where a limit lies."""
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=main.__doc__)
    parser.add_argument("--streams", default="1000", help="comma-separated stream counts (default 1000)")
    parser.add_argument("--workers", default="1", help="comma-separated --workers values (default 1)")
    parser.add_argument("--tokens", type=int, default=FULL.tokens, help="events per stream, about")
    parser.add_argument("--chunk-delay-ms", type=float, default=FULL.chunk_delay_ms)
    parser.add_argument("--arrivals-per-s", type=int, default=FULL.arrivals_per_s)
    parser.add_argument("--pin", action="store_true", help=f"the gateway alone on core {GATEWAY_CORE}")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                        help="a gateway option (upstream_pool=off, pool_streams=true)")  # fmt: skip
    args = parser.parse_args(argv)
    sizes = Sizes(
        streams=tuple(int(n) for n in args.streams.split(",")),
        tokens=args.tokens,
        chunk_delay_ms=args.chunk_delay_ms,
        arrivals_per_s=args.arrivals_per_s,
        workers=tuple(int(w) for w in args.workers.split(",")),
    )
    options: dict[str, str | bool] = {}
    for option in args.set:
        name, value = option.split("=", 1)
        # a boolean option is a flag of its own (--no-pool-streams), not a value
        options[name] = {"true": True, "false": False}.get(value.lower(), value)
    outcome = run(False, sizes, args.pin, options)
    for table in outcome.tables:
        print(table.text())
    for note in outcome.notes:
        print(f"- {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
