"""The gateway's counters, kept and rendered by prometheus_client (served at /metrics).

With `proxy --workers N` every worker process counts its own exchanges, and any of them may answer a
scrape (the kernel picks). So the workers run prometheus_client's multiprocess mode: each keeps its
values in memory-mapped files under PROMETHEUS_MULTIPROC_DIR (`<data-dir>/worker-metrics`, emptied by
the supervisor at start, which also marks exited workers dead), and a scrape sums every worker's files:
/metrics shows the whole gateway, whichever worker answers. The publisher's counters live in the
delivery process; they are copied in once a second (`Metrics.observe_publisher`), so the other workers'
part of those is at most a second old.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge, generate_latest, multiprocess

from cohere_gateway.events import OUTCOMES

# prometheus_client reads this variable once, when it is first imported: the supervisor sets it in each
# worker's environment (addons/cli.py).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The text format Prometheus and the tests read; the library's default moved to 1.0.0.
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4
ROUTE_MODES = ("gateway", "compat", "transparent")
# The response cache's counters (addons/cache.py), always rendered so a dashboard sees zeros.
CACHE_COUNTERS = ("hit", "miss", "expired", "bypass", "coalesced", "stored", "store_errors")
CONFIG_RESULTS = ("reloaded", "refused")
# Who opened an upstream connection: mitmproxy (one per client connection) or the relay's pool (shared).
UPSTREAM_PATHS = ("mitmproxy", "pool")

# A `_created` sample per series doubles the text and no dashboard reads it.
prometheus_client.disable_created_metrics()


class LabelledCounts(Counter[Any]):
    """This process's counts by one label, as the `Counter` the hooks add to (`counts[label] += 1`);
    each addition is also made on the Prometheus counter, which is what /metrics renders."""

    def __init__(self, metric: prometheus_client.Counter, labels: Iterable[str] = ()) -> None:
        super().__init__()
        self._metric = metric
        # labels() validates and locks on every call; a request's counting should not pay for that.
        self._children: dict[Any, Any] = {}
        for label in labels:  # rendered as 0 before the first one counted
            self._children[label] = metric.labels(label)

    def __setitem__(self, key: Any, value: int) -> None:
        delta = value - self[key]
        if delta < 0:
            raise ValueError(f"counter {key!r} cannot go down ({self[key]} -> {value})")
        if delta:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._metric.labels(str(key))
            child.inc(delta)
        super().__setitem__(key, value)


class Metrics:
    """The gateway's counters. `directory` is set in the workers of `proxy --workers N`: then the values
    are prometheus_client's multiprocess files there and a scrape sums every worker's."""

    def __init__(self, directory: Path | None = None) -> None:
        if directory is not None and os.environ.get(MULTIPROC_ENV) != str(directory):
            raise RuntimeError(f"a gateway worker needs {MULTIPROC_ENV}={directory} before it starts")
        self.directory = directory
        # Each Gateway has its own registry, so several in one process (tests) count apart.
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, help_text: str, label: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, help_text, [label], registry=self.registry)

        def scalar(name: str, help_text: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, help_text, registry=self.registry)

        self.requests = LabelledCounts(
            counter(
                "cohere_gateway_requests", "Requests routed to the upstream, by route mode.", "route_mode"
            ),
            ROUTE_MODES,
        )
        self.exchanges = LabelledCounts(
            counter("cohere_gateway_exchanges", "Finished exchanges, by outcome.", "outcome"), OUTCOMES
        )
        self.rejected = LabelledCounts(  # keyed by status (int)
            counter(
                "cohere_gateway_rejected", "Requests answered by the gateway itself, by status.", "status"
            )
        )
        self.events_skipped = scalar(
            "cohere_gateway_events_skipped", "Exchanges not logged (cf-aig-collect-log: false)."
        )
        self.hook_errors = LabelledCounts(
            counter(
                "cohere_gateway_hook_errors", "Internal errors answered with a JSON 500, by hook.", "hook"
            )
        )
        self.connections_refused = scalar(
            "cohere_gateway_connections_refused", "Connections closed at once (max_connections)."
        )
        self.events_oversize = scalar(
            "cohere_gateway_events_oversize", "Events dropped: too large even without bodies."
        )
        self.cache = LabelledCounts(  # filled by addons/cache.py's ResponseCache
            counter(
                "cohere_gateway_cache",
                "Response cache lookups by result, entries stored, store errors.",
                "result",
            ),
            CACHE_COUNTERS,
        )
        self.config = LabelledCounts(
            counter(
                "cohere_gateway_config_reloads",
                "Configuration file changes: reloaded, or refused "
                "(the file did not parse or is gone; the configuration in force stays).",
                "result",
            ),
            CONFIG_RESULTS,
        )
        self.upstream_connections = LabelledCounts(
            counter(
                "cohere_gateway_upstream_connections",
                "New connections opened to the upstream (each a TCP handshake, and a TLS one for https), "
                "by path: mitmproxy's own (one per client connection) or the shared pool "
                "(upstream_pool; the relay of requests with a timeout or retries).",
                "path",
            ),
            UPSTREAM_PATHS,
        )
        self._publisher: dict[str, prometheus_client.Counter | Gauge] = {}
        self._published: dict[str, int] = {}
        if directory is not None:
            Gauge(
                "cohere_gateway_workers",
                "Worker processes running now (the counters above also keep those of exited workers).",
                registry=self.registry,
                multiprocess_mode="livesum",
            ).set(1)

    def observe_publisher(self, counts: dict[str, int]) -> None:
        """Bring the publisher's counters in: `*_pending` are gauges (summed over the running workers),
        the rest counters, advanced by what they grew since the last call."""
        for name, value in counts.items():
            metric = self._publisher.get(name)
            if metric is None:
                help_text = f"Event delivery: {name.replace('_', ' ')} (addons/delivery.py)."
                metric = self._publisher[name] = (
                    Gauge(
                        f"cohere_gateway_{name}",
                        help_text,
                        registry=self.registry,
                        multiprocess_mode="livesum",
                    )
                    if name.endswith("_pending")
                    else prometheus_client.Counter(
                        f"cohere_gateway_{name}", help_text, registry=self.registry
                    )
                )
            if isinstance(metric, Gauge):
                metric.set(value)
                continue
            seen = self._published.get(name, 0)
            # A restarted delivery process counts from zero again: all it counts then is new.
            metric.inc(value - seen if value >= seen else value)
            self._published[name] = value

    def render(self) -> bytes:
        if self.directory is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker, path=str(self.directory))
        return generate_latest(every_worker)


def mark_worker_dead(directory: Path, pid: int) -> None:
    """An exited worker's gauges stop counting (its counters stay in the sums)."""
    multiprocess.mark_process_dead(pid, str(directory))
