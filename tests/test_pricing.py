"""The versioned price table: effective dates, aliases, every billed unit, implied models, and unknown
cost never 0. Pure functions over the shipped pricing.json (and small tables written here)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from cohere_gateway.addons.pricing import DEFAULT_PRICING, compute_cost, load_pricing
from cohere_gateway.events import Usage

PRICING = load_pricing()
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def write_table(tmp_path: Path, prices: list[dict], **extra: object) -> Path:
    path = tmp_path / "pricing.json"
    path.write_bytes(
        orjson.dumps({"sources": {"s": "https://example.invalid/prices"}, "prices": prices} | extra)
    )
    return path


def test_a_request_is_priced_at_the_price_in_force_when_it_started(tmp_path: Path) -> None:
    table = load_pricing(
        write_table(
            tmp_path,
            [
                {"model": "m", "from": "2025-01-01", "input_per_1m": 1.0, "source": "s"},
                {"model": "m", "from": "2025-07-01", "input_per_1m": 2.0, "source": "s"},
            ],
        )
    )
    usage = Usage(input_tokens=1_000_000)
    assert compute_cost(table, "chat", "m", usage, at=datetime(2025, 3, 1, tzinfo=UTC)) == (1.0, "pricing")
    assert compute_cost(table, "chat", "m", usage, at=datetime(2025, 6, 30, 23, 59, tzinfo=UTC))[0] == 1.0
    assert compute_cost(table, "chat", "m", usage, at=datetime(2025, 7, 1, tzinfo=UTC))[0] == 2.0
    # before the first price: no price was in force, so the cost is unknown
    assert compute_cost(table, "chat", "m", usage, at=datetime(2024, 12, 31, tzinfo=UTC)) == (
        None,
        "unknown_model",
    )


def test_every_entry_cites_a_listed_source(tmp_path: Path) -> None:
    data = orjson.loads(DEFAULT_PRICING.read_bytes())
    for entry in [*data["prices"], *data["aliases"].values(), *data["implied_models"].values()]:
        assert entry["source"] in data["sources"], entry
    with pytest.raises(ValueError, match="cites source 'nowhere'"):
        load_pricing(write_table(tmp_path, [{"model": "m", "from": "2025-01-01", "source": "nowhere"}]))
    with pytest.raises(ValueError, match="unknown fields"):
        load_pricing(
            write_table(tmp_path, [{"model": "m", "from": "2025-01-01", "per_kg": 1, "source": "s"}])
        )


def test_aliases_are_priced_as_the_models_they_name() -> None:
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert compute_cost(PRICING, "chat", "command-r", usage, at=NOW)[0] == pytest.approx(0.50 + 1.50)
    assert compute_cost(PRICING, "chat", "command-r-plus", usage, at=NOW)[0] == pytest.approx(3.00 + 15.00)
    assert compute_cost(PRICING, "chat", "command-r-08-2024", usage, at=NOW)[0] == pytest.approx(0.15 + 0.60)


def test_every_billed_unit_is_priced_or_the_cost_is_unknown() -> None:
    # Embed v4 image tokens are priced; an Embed v3 image has no list price here: unknown, never $0.
    cost, source = compute_cost(
        PRICING, "embed", "embed-v4.0", Usage(input_tokens=1_000_000, image_tokens=1_000_000), at=NOW
    )
    assert source == "pricing" and cost == pytest.approx(0.12 + 0.47)
    assert compute_cost(PRICING, "embed", "embed-english-v3.0", Usage(images=1), at=NOW) == (None, None)
    assert compute_cost(PRICING, "rerank", "rerank-v3.5", Usage(search_units=1000), at=NOW)[0] == 2.0
    # a reported zero is a known zero
    assert compute_cost(PRICING, "embed", "embed-english-v3.0", Usage(input_tokens=0, images=0), at=NOW) == (
        0.0,
        "pricing",
    )


def test_what_cohere_does_not_bill_costs_zero_and_says_so() -> None:
    assert compute_cost(PRICING, "chat", "command-a-03-2025", Usage(), at=NOW, billed=False) == (
        0.0,
        "not_billable",
    )
    assert compute_cost(PRICING, "chat", "no-such-model", Usage(), at=NOW, billed=False) == (
        0.0,
        "not_billable",
    )


def test_implied_models_of_v1_endpoints() -> None:
    assert PRICING.implied_model("v1", "chat") == "command-r-plus-08-2024"
    assert PRICING.implied_model("v2", "chat") is None  # v2 requires a model
    assert PRICING.implied_model("compat", "chat.completions") is None
