"""CPU time and memory of another process, read from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of `pid` so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces; the fields after its closing parenthesis do not.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (e.g. the workers of a multi-process gateway)."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def _tree_sum(pid: int, measure: Callable[[int], float]) -> float:
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, ProcessLookupError):  # exited between listing and reading
            total += measure(p)
    return total


def tree_cpu_seconds(pid: int) -> float:
    return _tree_sum(pid, cpu_seconds)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid} (a zombie?)")


def tree_rss_bytes(pid: int) -> int:
    """RSS of `pid` and its descendants (the gateway with its delivery process)."""
    return int(_tree_sum(pid, rss_bytes))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


class CpuMeter:
    """CPU seconds a set of processes (each with its descendants) spend between `start()` and `stop()`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: tree_cpu_seconds(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used


def host_cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all the host's cores so far: two readings give its busy share between."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return float(total - idle), float(total)
