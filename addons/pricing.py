"""Cost of an exchange from the versioned price table in pricing.json (data, not code: edit prices there).

Cost is computed from Cohere's *billed* units, at the price in force when the request started. Unknown is
never 0, which would read as "free" in every dashboard: an unknown model gives cost None with cost_source
"unknown_model", and a request that billed a unit its price entry does not price (an image on a model
priced for text only) or reported no usage gives cost None.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import orjson

from cohere_gateway.addons.headers import CustomCost
from cohere_gateway.events import Usage

DEFAULT_PRICING = Path(__file__).with_name("pricing.json")

# usage field -> (price field, units per price)
_UNITS: dict[str, tuple[str, float]] = {
    "input_tokens": ("input_per_1m", 1e6),
    "output_tokens": ("output_per_1m", 1e6),
    "search_units": ("search_per_1k", 1e3),
    "classifications": ("classifications_per_1k", 1e3),
    "images": ("per_image", 1.0),
    "image_tokens": ("image_tokens_per_1m", 1e6),
}
_PRICE_FIELDS = frozenset(price for price, _ in _UNITS.values())


@dataclass(frozen=True, slots=True)
class Price:
    since: date
    source: str
    rates: dict[str, float] = field(default_factory=dict)  # price field -> USD

    def cost(self, usage: Usage) -> float | None:
        """USD for the billed units in `usage`; None when it billed a unit this entry has no price for."""
        total = 0.0
        for unit, (rate_name, per) in _UNITS.items():
            count = getattr(usage, unit)
            if not count:
                continue
            rate = self.rates.get(rate_name)
            if rate is None:
                return None
            total += count * rate / per
        return total


@dataclass(frozen=True, slots=True)
class PricingTable:
    prices: dict[str, list[Price]]  # model -> entries, oldest first
    aliases: dict[str, str] = field(default_factory=dict)
    implied: dict[str, str] = field(default_factory=dict)  # "v1/chat" -> the model Cohere uses by default
    not_billable: frozenset[str] = frozenset()

    def lookup(self, model: str | None, at: datetime) -> Price | None:
        """The entry for `model` (or the model it is an alias of) in force at `at`."""
        if not model:
            return None
        entries = self.prices.get(self.aliases.get(model, model))
        if not entries:
            return None
        index = bisect.bisect_right([e.since for e in entries], at.astimezone(UTC).date()) - 1
        return entries[index] if index >= 0 else None

    def implied_model(self, api_version: str, endpoint: str) -> str | None:
        return self.implied.get(f"{api_version}/{endpoint}")


def load_pricing(path: Path = DEFAULT_PRICING) -> PricingTable:
    """Read and check the table: every entry names a known source and only known price fields."""
    data = orjson.loads(path.read_bytes())
    sources = data.get("sources", {})

    def source_of(entry: dict, what: str) -> str:
        name = entry.get("source")
        if name not in sources:
            raise ValueError(f"{path}: {what} cites source {name!r}, which `sources` does not list")
        return name

    prices: dict[str, list[Price]] = {}
    for entry in data["prices"]:
        model = entry["model"]
        unknown = set(entry) - _PRICE_FIELDS - {"model", "from", "source"}
        if unknown:
            raise ValueError(f"{path}: price of {model!r} has unknown fields {sorted(unknown)}")
        rates = {k: float(v) for k, v in entry.items() if k in _PRICE_FIELDS}
        since = date.fromisoformat(entry["from"])
        prices.setdefault(model, []).append(Price(since, source_of(entry, f"price of {model!r}"), rates))
    for model, entries in prices.items():
        entries.sort(key=lambda e: e.since)
        if len({e.since for e in entries}) != len(entries):
            raise ValueError(f"{path}: {model!r} has two prices from the same day")
    aliases = {}
    for alias, entry in data.get("aliases", {}).items():
        source_of(entry, f"alias {alias!r}")
        aliases[alias] = entry["model"]
    implied = {}
    for where, entry in data.get("implied_models", {}).items():
        source_of(entry, f"implied model of {where!r}")
        implied[where] = entry["model"]
    return PricingTable(prices, aliases, implied, frozenset(data.get("not_billable_endpoints", ())))


def _billed_nothing(usage: Usage) -> bool:
    return all(getattr(usage, unit) is None for unit in _UNITS)


def compute_cost(
    table: PricingTable,
    endpoint: str,
    model: str | None,
    usage: Usage,
    custom: CustomCost | None = None,
    *,
    at: datetime | None = None,
    billed: bool = True,
) -> tuple[float | None, str | None]:
    """(cost in USD, cost_source). (None, None) when a billable call reported no usage (e.g. a stream
    aborted before its end event). `at` is the request's start; `billed` False when Cohere bills nothing
    for the exchange (it answered an error status, or never received the request)."""
    if custom is not None:
        if custom.total_cost is not None:
            return custom.total_cost, "custom"
        # A price per token times no reported count is unknown, not zero.
        parts = [(usage.input_tokens, custom.per_token_in), (usage.output_tokens, custom.per_token_out)]
        priced = [(n, price) for n, price in parts if price is not None]
        if any(n is None for n, _ in priced):
            return None, "custom"
        return sum(n * price for n, price in priced), "custom"
    if not billed or endpoint.partition("/")[0] in table.not_billable:
        return 0.0, "not_billable"
    price = table.lookup(model, at or datetime.now(UTC))
    if price is None:
        return None, "unknown_model"
    if _billed_nothing(usage):
        return None, None
    cost = price.cost(usage)
    return (cost, "pricing") if cost is not None else (None, None)
