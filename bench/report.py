"""Tables: printed to the terminal and appended to bench/RESULTS.md with what reproduces them."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procstat import cpu_model

RESULTS = Path(__file__).with_name("RESULTS.md")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        lines = [f"#### {self.title}", "", "| " + " | ".join(self.columns) + " |"]
        lines.append("|" + "|".join("---" for _ in self.columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        lines += ["", *(f"- {n}" for n in self.notes)] if self.notes else []
        return "\n".join(lines) + "\n"

    def text(self) -> str:
        widths = [
            max(len(c), *(len(r[i]) for r in self.rows)) if self.rows else len(c)
            for i, c in enumerate(self.columns)
        ]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [self.title, fmt.format(*self.columns), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row) for row in self.rows]
        out += [f"  * {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def git_commit() -> str:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted changes" if dirty else "")


def machine() -> str:
    load = os.getloadavg()[0]
    return (
        f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {load:.2f} at start"
    )


def command_line(argv: list[str] | None = None) -> str:
    return "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])


def section(scenario: str, tables: list[Table], command: str, started_machine: str, notes: list[str]) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        f"### {scenario} — {when}",
        "",
        f"- command: `{command}`",
        f"- commit: {git_commit()}",
        f"- machine: {started_machine}",
        *(f"- {n}" for n in notes),
        "",
    ]
    return "\n".join(head) + "\n".join(t.markdown() for t in tables) + "\n"


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as out:
        out.write(text)


@dataclass
class Outcome:
    """What a scenario hands back: its tables (budgets included) and notes for the RESULTS.md header."""

    tables: list[Table]
    notes: list[str] = field(default_factory=list)
    budgets_met: bool | None = None  # None: the scenario states no budget


def budget_table() -> Table:
    return Table(
        "Budgets (ratios within this run)", ["budget", "measured", "baseline (same run)", "limit", "met"]
    )


def verdict(ok: bool) -> str:
    return "yes" if ok else "**NO**"
