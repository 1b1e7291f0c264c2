"""`python -m bench <scenario> [--quick] [--results PATH] [--no-record]`

Scenarios: overhead, streaming, publish, soak, lean (item 3 of the benchmark issue), read, cache (issue
16: the response cache), limits (issue 17: the CPU rate limits cost per request), streams (issue 19:
thousands of long streams on new connections), connections (issue 19: upstream handshakes of new client
connections against an HTTPS upstream with a round-trip time, the upstream pool off and on), plus sink
and spool when bench/sink.py and bench/spool.py exist; `all` runs every one in turn. `--quick` shrinks
every size so the whole suite finishes in a minute or two (the CI smoke run); the numbers are then not
budgets.
Exit status: 0 when every stated budget was met (or --quick), 1 when one was missed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.report import Outcome, Table, budget_table, verdict

# name -> module of bench/ with `run(quick: bool) -> Outcome`
OWN = {
    "overhead": "bench.overhead",
    "streaming": "bench.streaming",
    "publish": "bench.publish",
    "soak": "bench.soak",
    "lean": "bench.lean",
    "read": "bench.read",
    "cache": "bench.cache",
    "limits": "bench.limits",
    "streams": "bench.streams",
    "connections": "bench.connections",
}
# Modules written by other engineers (bench/sink.py, bench/spool.py), run when present.
EXTERNAL = ("sink", "spool")


def external_available(name: str) -> bool:
    return Path(__file__).with_name(f"{name}.py").exists()


def scenarios() -> list[str]:
    own = [n for n in OWN if importlib.util.find_spec(OWN[n]) is not None]
    return own + [n for n in EXTERNAL if external_available(n)]


def run_external(name: str, quick: bool) -> Outcome:
    """bench/<name>.py from another owner: its `run(quick) -> Outcome` when it has one, else its command
    line with --no-record (this entry point records), reading the JSON object it prints as one table row."""
    module = importlib.import_module(f"bench.{name}")
    if callable(getattr(module, "run", None)):
        result = module.run(quick)
        if isinstance(result, Outcome):
            return result
    cmd = [sys.executable, "-m", f"bench.{name}", "--no-record", *(["--quick"] if quick else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    out = proc.stdout
    fields = json.loads(out[out.index("{") : out.rindex("}") + 1])
    table = Table(f"{name} (bench/{name}.py)", list(fields), [[str(v) for v in fields.values()]])
    return Outcome([table, *external_budgets(name, fields)], [f"measured by bench/{name}.py"], None)


def external_budgets(name: str, fields: dict[str, object]) -> list[Table]:
    """The sink's budget, judged from the keys bench/sink.py prints: produce→visible p95 at 2k events/s.
    Its throughput (events/s per consumer process, CPU per event, embedded and into a server) are figures
    for sizing, not budgets: issue 19 retired issue 7's single-core ≥ 40k events/s, which the storage
    work alone (≈ 17 µs an event in-process) rules out."""
    if name != "sink" or "visible_p95_ms" not in fields:
        return []
    p95 = float(fields["visible_p95_ms"])  # type: ignore[arg-type]
    table = budget_table()
    table.add(
        f"produce→visible p95 at {fields.get('steady_rate', '?')} events/s",
        f"{p95:.0f} ms",
        "—",
        "≤ 400 ms",
        verdict(p95 <= 400),
    )
    return [table]


def runner(name: str) -> Callable[[bool], Outcome]:
    if name in OWN:
        return importlib.import_module(OWN[name]).run
    return lambda quick: run_external(name, quick)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    available = scenarios()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("scenario", choices=[*available, "all"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--results", type=Path, default=report.RESULTS, help="markdown file to append to")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to --results")
    args = parser.parse_args(argv)
    chosen = available if args.scenario == "all" else [args.scenario]
    missed = []
    for name in chosen:
        machine = report.machine()
        started = time.monotonic()
        outcome = runner(name)(args.quick)
        took = time.monotonic() - started
        for table in outcome.tables:
            print(table.text())
        notes = [*outcome.notes, f"wall time {took:.0f} s"]
        if args.quick:
            notes.append("--quick: smoke-run sizes; these numbers are not measurements")
        if outcome.tables and not args.no_record:
            command = report.command_line([name, *(["--quick"] if args.quick else [])])
            report.append(args.results, report.section(name, outcome.tables, command, machine, notes))
            print(f"appended to {args.results}")
        if outcome.budgets_met is False:
            missed.append(name)
    if missed and not args.quick:
        print(f"budgets missed in: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
