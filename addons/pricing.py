"""Cost of an exchange from the pricing table in pricing.json (data, not code: edit prices there).

Cost is computed from Cohere's *billed* units. An unknown model gives cost None with
cost_source "unknown_model" - never 0, which would read as "free" in every dashboard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import orjson

from cohere_gateway.events import Usage

from .headers import CustomCost

DEFAULT_PRICING = Path(__file__).with_name("pricing.json")
_DATED = re.compile(r"-\d{2}-\d{4}$")


@dataclass(frozen=True, slots=True)
class Price:
    input_per_1m: float = 0.0
    output_per_1m: float = 0.0
    search_per_1k: float = 0.0


@dataclass(frozen=True, slots=True)
class PricingTable:
    models: dict[str, Price]
    not_billable: frozenset[str]

    def lookup(self, model: str | None) -> Price | None:
        if not model:
            return None
        price = self.models.get(model)
        if price is None and _DATED.search(model):
            price = self.models.get(_DATED.sub("", model))
        return price


def load_pricing(path: Path = DEFAULT_PRICING) -> PricingTable:
    data = orjson.loads(path.read_bytes())
    models = {}
    for name, entry in data["models"].items():
        unknown = set(entry) - {"input_per_1m", "output_per_1m", "search_per_1k"}
        if unknown:
            raise ValueError(f"{path}: model {name!r} has unknown price fields {sorted(unknown)}")
        models[name] = Price(**{k: float(v) for k, v in entry.items()})
    return PricingTable(models, frozenset(data.get("not_billable_endpoints", ())))


def compute_cost(
    table: PricingTable,
    endpoint: str,
    model: str | None,
    usage: Usage,
    custom: CustomCost | None = None,
) -> tuple[float | None, str | None]:
    """(cost in USD, cost_source). (None, None) when a billable call reported no usage (e.g. a stream
    aborted before its end event)."""
    if custom is not None:
        if custom.total_cost is not None:
            return custom.total_cost, "custom"
        # A price per token times no reported count is unknown, not zero.
        parts = [(usage.input_tokens, custom.per_token_in), (usage.output_tokens, custom.per_token_out)]
        priced = [(n, price) for n, price in parts if price is not None]
        if any(n is None for n, _ in priced):
            return None, "custom"
        return sum(n * price for n, price in priced), "custom"
    if endpoint.partition("/")[0] in table.not_billable:
        return 0.0, "not_billable"
    price = table.lookup(model)
    if price is None:
        return None, "unknown_model"
    if usage.input_tokens is None and usage.output_tokens is None and usage.search_units is None:
        return None, None
    cost = (usage.input_tokens or 0) * price.input_per_1m / 1e6
    cost += (usage.output_tokens or 0) * price.output_per_1m / 1e6
    cost += (usage.search_units or 0) * price.search_per_1k / 1e3
    return cost, "pricing"
