"""The gateway's counters and their Prometheus text exposition (served at /metrics).

With `proxy --workers N` every worker process counts its own exchanges, and any of them may answer a
scrape (the kernel picks). So each worker also writes its counters to a shared directory once a second
(`write_snapshot`), and a scrape sums them all (`merge`): /metrics shows the whole gateway, whichever
worker answers; the other workers' part is at most a second old.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from cohere_gateway.events import OUTCOMES

# {"requests": {mode: n}, "exchanges": {outcome: n}, "rejected": {status: n}, "events_skipped": n,
#  "publisher": {counter: n}}: plain JSON, so workers can share it through files.
Snapshot = dict[str, Any]
_GROUPS = ("requests", "exchanges", "rejected", "hook_errors", "publisher", "cache", "config")
_SCALARS = ("events_skipped", "connections_refused", "events_oversize")
# The response cache's counters (addons/cache.py), always rendered so a dashboard sees zeros.
CACHE_COUNTERS = ("hit", "miss", "expired", "bypass", "coalesced", "stored", "store_errors")


class Metrics:
    """Plain counters; mitmproxy runs hooks on one event loop, so no locking is needed here."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by route mode
        self.exchanges: Counter[str] = Counter()  # by outcome
        self.rejected: Counter[int] = Counter()  # requests the gateway answered itself, by status
        self.events_skipped = 0  # cf-aig-collect-log: false
        self.hook_errors: Counter[str] = Counter()  # internal errors answered 500, by hook
        self.connections_refused = 0  # over max_connections
        self.events_oversize = 0  # too large to deliver even without bodies
        self.cache: Counter[str] = Counter()  # filled by addons/cache.py's ResponseCache
        self.config: Counter[str] = Counter()  # configuration file reloads: "reloaded" | "refused"

    def snapshot(self, publisher: dict[str, int]) -> Snapshot:
        return {
            "requests": dict(self.requests),
            "exchanges": dict(self.exchanges),
            "rejected": {str(status): n for status, n in self.rejected.items()},
            "events_skipped": self.events_skipped,
            "hook_errors": dict(self.hook_errors),
            "connections_refused": self.connections_refused,
            "events_oversize": self.events_oversize,
            "publisher": dict(publisher),
            "cache": dict(self.cache),
            "config": dict(self.config),
        }


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several workers' snapshots."""
    groups: dict[str, Counter[str]] = {group: Counter() for group in _GROUPS}
    scalars = dict.fromkeys(_SCALARS, 0)
    for snap in snapshots:
        for group, counts in groups.items():
            counts.update(snap.get(group, {}))
        for name in _SCALARS:
            scalars[name] += snap.get(name, 0)
    return {group: dict(counts) for group, counts in groups.items()} | scalars


def write_snapshot(directory: Path, snap: Snapshot) -> None:
    """This process's snapshot as `<pid>.json`, replaced atomically so a reader never sees half."""
    tmp = directory / f".{os.getpid()}.json.tmp"
    tmp.write_bytes(orjson.dumps(snap))
    os.replace(tmp, directory / f"{os.getpid()}.json")


def read_snapshots(directory: Path, skip_pid: int) -> list[Snapshot]:
    """The other workers' snapshots; a file that cannot be read (being replaced, garbage) is skipped."""
    out = []
    for path in directory.glob("*.json"):
        if path.stem == str(skip_pid):
            continue
        try:
            out.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            continue
    return out


def render(snap: Snapshot, workers: int | None = None) -> str:
    requests, exchanges, rejected = snap["requests"], snap["exchanges"], snap["rejected"]
    lines = [
        "# HELP cohere_gateway_requests_total Requests routed to the upstream, by route mode.",
        "# TYPE cohere_gateway_requests_total counter",
    ]
    for mode in ("gateway", "compat", "transparent"):
        lines.append(f'cohere_gateway_requests_total{{route_mode="{mode}"}} {requests.get(mode, 0)}')
    lines += [
        "# HELP cohere_gateway_exchanges_total Finished exchanges, by outcome.",
        "# TYPE cohere_gateway_exchanges_total counter",
    ]
    for outcome in OUTCOMES:
        lines.append(f'cohere_gateway_exchanges_total{{outcome="{outcome}"}} {exchanges.get(outcome, 0)}')
    lines += [
        "# HELP cohere_gateway_rejected_total Requests answered by the gateway itself, by status.",
        "# TYPE cohere_gateway_rejected_total counter",
    ]
    for status in sorted(rejected, key=int):
        lines.append(f'cohere_gateway_rejected_total{{status="{status}"}} {rejected[status]}')
    lines += [
        "# HELP cohere_gateway_events_skipped_total Exchanges not logged (cf-aig-collect-log: false).",
        "# TYPE cohere_gateway_events_skipped_total counter",
        f"cohere_gateway_events_skipped_total {snap['events_skipped']}",
        "# HELP cohere_gateway_hook_errors_total Internal errors answered with a JSON 500, by hook.",
        "# TYPE cohere_gateway_hook_errors_total counter",
        *(
            f'cohere_gateway_hook_errors_total{{hook="{h}"}} {n}'
            for h, n in sorted(snap["hook_errors"].items())
        ),
        "# HELP cohere_gateway_connections_refused_total Connections closed at once (max_connections).",
        "# TYPE cohere_gateway_connections_refused_total counter",
        f"cohere_gateway_connections_refused_total {snap['connections_refused']}",
        "# HELP cohere_gateway_events_oversize_total Events dropped: too large even without bodies.",
        "# TYPE cohere_gateway_events_oversize_total counter",
        f"cohere_gateway_events_oversize_total {snap['events_oversize']}",
    ]
    cache = snap.get("cache", {})
    lines += [
        "# HELP cohere_gateway_cache_total Response cache lookups by result, entries stored, store errors.",
        "# TYPE cohere_gateway_cache_total counter",
    ]
    for name in CACHE_COUNTERS:
        lines.append(f'cohere_gateway_cache_total{{result="{name}"}} {cache.get(name, 0)}')
    config = snap.get("config", {})
    lines += [
        "# HELP cohere_gateway_config_reloads_total Configuration file changes: reloaded, or refused "
        "(the file did not parse or is gone; the configuration in force stays).",
        "# TYPE cohere_gateway_config_reloads_total counter",
    ]
    for name in ("reloaded", "refused"):
        lines.append(f'cohere_gateway_config_reloads_total{{result="{name}"}} {config.get(name, 0)}')
    for name, value in sorted(snap["publisher"].items()):
        metric = f"cohere_gateway_{name}" + ("" if name.endswith("_pending") else "_total")
        kind = "gauge" if name.endswith("_pending") else "counter"
        lines += [f"# TYPE {metric} {kind}", f"{metric} {value}"]
    if workers is not None:
        lines += [
            "# HELP cohere_gateway_workers Worker processes whose counters are summed above.",
            "# TYPE cohere_gateway_workers gauge",
            f"cohere_gateway_workers {workers}",
        ]
    return "\n".join(lines) + "\n"
