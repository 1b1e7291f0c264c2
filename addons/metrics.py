"""The gateway's counters and their Prometheus text exposition (served at /metrics)."""

from __future__ import annotations

from collections import Counter

from cohere_gateway.events import OUTCOMES


class Metrics:
    """Plain counters; mitmproxy runs hooks on one event loop, so no locking is needed here."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by route mode
        self.exchanges: Counter[str] = Counter()  # by outcome
        self.rejected: Counter[int] = Counter()  # requests the gateway answered itself, by status
        self.events_skipped = 0  # cf-aig-collect-log: false

    def render(self, publisher: dict[str, int]) -> str:
        lines = [
            "# HELP cohere_gateway_requests_total Requests routed to the upstream, by route mode.",
            "# TYPE cohere_gateway_requests_total counter",
        ]
        for mode in ("gateway", "compat", "transparent"):
            lines.append(f'cohere_gateway_requests_total{{route_mode="{mode}"}} {self.requests[mode]}')
        lines += [
            "# HELP cohere_gateway_exchanges_total Finished exchanges, by outcome.",
            "# TYPE cohere_gateway_exchanges_total counter",
        ]
        for outcome in OUTCOMES:
            lines.append(f'cohere_gateway_exchanges_total{{outcome="{outcome}"}} {self.exchanges[outcome]}')
        lines += [
            "# HELP cohere_gateway_rejected_total Requests answered by the gateway itself, by status.",
            "# TYPE cohere_gateway_rejected_total counter",
        ]
        for status in sorted(self.rejected):
            lines.append(f'cohere_gateway_rejected_total{{status="{status}"}} {self.rejected[status]}')
        lines += [
            "# HELP cohere_gateway_events_skipped_total Exchanges not logged (cf-aig-collect-log: false).",
            "# TYPE cohere_gateway_events_skipped_total counter",
            f"cohere_gateway_events_skipped_total {self.events_skipped}",
        ]
        for name, value in sorted(publisher.items()):
            metric = f"cohere_gateway_{name}" + ("" if name.endswith("_pending") else "_total")
            kind = "gauge" if name.endswith("_pending") else "counter"
            lines += [f"# TYPE {metric} {kind}", f"{metric} {value}"]
        return "\n".join(lines) + "\n"
