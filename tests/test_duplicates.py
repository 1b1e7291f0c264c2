"""The same event_id at several Kafka offsets counts once in every read query.

Real parts: a Kafka broker, `cohere-gateway consume` as a subprocess, ClickHouse (chdb or the server at
CLICKHOUSE_URL), the consumer's read API and `report --json` as a subprocess. Duplicates are the exact
bytes of an earlier message, produced again at random distances: in the same batch, a few offsets later,
in another partition, and after the first copy was written and committed (a spool replay hours later
looks the same to the consumer: the lookup does not depend on time)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from cohere_gateway.events import Event, encode
from tests import accounting, test_consumer
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_consumer import ConsumerProcess, produce, wait_for

# The consumer tests' fixtures: a consumer subprocess per test, in its own consumer group.
running = test_consumer.running
group = test_consumer.group

SINCE = "3h"


def varied_event(i: int, base: datetime) -> Event:
    """The fixture's event, plus what it lacks: unpriced successes, implied models, images."""
    ev = make_event(i, base)
    extra: dict[str, Any] = {}
    if i % 5 == 1:  # a success whose cost is unknown (unknown model)
        extra |= {"cost_usd": None, "cost_source": "unknown_model"}
    if i % 8 == 2:
        extra |= {"model_implied": True}
    if ev.endpoint == "embed" and i % 2:
        extra["usage"] = msgspec.structs.replace(ev.usage, images=i % 4 + 1, image_tokens=1000 + i)
    return msgspec.structs.replace(ev, **extra)


def messages(events: list[Event]) -> list[tuple[bytes | None, bytes | None]]:
    return [(f"{ev.account_id}/{ev.gateway_id}".encode(), encode(ev)) for ev in events]


def with_duplicates(rnd: random.Random, events: list[Event], earlier: list[Event], n: int) -> list[Event]:
    """`events` with `n` copies inserted at random positions: of events of this list (before or after
    the original, near or far) and of `earlier` ones (already stored)."""
    out = list(events)
    for _ in range(n):
        source = rnd.choice(earlier) if earlier and rnd.random() < 0.4 else rnd.choice(events)
        out.insert(rnd.randrange(len(out) + 1), source)
    return out


def api(consumer: ConsumerProcess, path: str) -> Any:
    status, body = consumer.get(path)
    assert status == 200, body
    return body


def by_key(rows: list[dict[str, Any]], *names: str) -> dict[Any, dict[str, Any]]:
    return {(r[names[0]] if len(names) == 1 else tuple(r[n] for n in names)): r for r in rows}


def check_every_query(consumer: ConsumerProcess, storage: Storage, events: list[Event]) -> None:
    fields, total_fields = accounting.FIELDS, accounting.TOTAL_FIELDS
    for by in ("model", "account_id", "gateway_id", "endpoint", "outcome", "none"):
        rows = api(consumer, f"/api/totals?since={SINCE}&by={by}")
        assert not accounting.mismatches(by_key(rows, "key"), accounting.totals(events, by), total_fields), by
        summary = api(consumer, f"/api/summary?since={SINCE}&by={by}")
        assert not accounting.mismatches(
            {"": summary["total"]}, accounting.totals(events, "none"), total_fields
        ), summary
    for by in ("none", "model"):
        rows = api(consumer, f"/api/timeseries?since={SINCE}&by={by}&step_s=60")
        for row in rows:
            row["bucket"] = row["bucket"][:19]
        got = by_key(rows, "bucket", "key")
        assert not accounting.mismatches(got, accounting.timeseries(events, by), fields), by

    rows = api(consumer, f"/api/errors?since={SINCE}")
    assert not accounting.mismatches(
        by_key(rows, "error_type", "status_code", "outcome"), accounting.errors(events)
    )
    rows = api(consumer, f"/api/top_api_keys?since={SINCE}&limit=100")
    got = by_key(rows, "api_key_fingerprint")
    assert not accounting.mismatches(got, accounting.top_api_keys(events), fields)
    rows = api(consumer, f"/api/top_metadata?since={SINCE}&key=user&limit=100")
    assert not accounting.mismatches(by_key(rows, "value"), accounting.top_metadata(events, "user"), fields)

    recent = api(consumer, f"/api/recent?since={SINCE}&limit=10000")
    assert sorted(r["event_id"] for r in recent) == sorted(ev.event_id for ev in events)

    command = [sys.executable, "-m", "cohere_gateway.cli", "report", *storage.cli_args]
    report = subprocess.run(
        [*command, "--since", SINCE, "--by", "model", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert not accounting.mismatches({"": data["total"]}, accounting.totals(events, "none"), total_fields)
    assert not accounting.mismatches(
        by_key(data["groups"], "key"), accounting.totals(events, "model"), total_fields
    )


def test_duplicates_at_random_distances_count_once_in_every_query(
    running: Callable[..., ConsumerProcess], storage: Storage, kafka_bootstrap: str, kafka_topic: str
) -> None:
    rnd = random.Random(14)
    base = (datetime.now(UTC) - timedelta(hours=2)).replace(second=0, microsecond=0)
    first = [varied_event(i, base) for i in range(400)]
    second = [varied_event(i, base) for i in range(400, 700)]
    consumer = running()
    produce(kafka_bootstrap, kafka_topic, messages(with_duplicates(rnd, first, [], 120)))
    wait_for(
        lambda: consumer.metric("cohere_gateway_consumer_buffered") == 0 and consumer.landed() >= 400,
        "the first wave",
    )
    # Copies of stored events (written and committed long before, as after a spool replay), mixed with
    # new events and their own copies.
    produce(kafka_bootstrap, kafka_topic, messages(with_duplicates(rnd, second, first, 200)))
    produced = 400 + 120 + 300 + 200
    wait_for(
        lambda: (
            consumer.metric("cohere_gateway_consumer_events_inserted_total")
            + consumer.metric("cohere_gateway_consumer_duplicates_total")
            >= produced
        ),
        "every message",
    )
    assert consumer.metric("cohere_gateway_consumer_duplicates_total") == 320
    check_every_query(consumer, storage, accounting.distinct(first + second))


def test_the_lookup_finds_ids_of_any_shape(clickhouse_backend: Any) -> None:
    """Ids the gateway does not make (commas, quotes, backslashes, newlines, non-ASCII) travel hex-encoded;
    each is found exactly, never split or confused with another."""
    from cohere_gateway.consumers import dedup
    from tests.test_storage import insert_events

    base = datetime.now(UTC) - timedelta(hours=1)
    odd = ["a,b", "it's", 'q"uote', "back\\slash", "new\nline", "tab\tx", "ünï", "", "plain-id_1.2:3"]
    events = [make_event(i, base, event_id=event_id) for i, event_id in enumerate(odd)]
    insert_events(clickhouse_backend, events, "odd-ids")
    assert dedup.stored_ids(clickhouse_backend, [*odd, "a", "b", "it", "other"]) == set(odd)


def test_a_large_flushs_lookup_stays_within_the_servers_parameter_limit(clickhouse_backend: Any) -> None:
    """A flush of 20,000 UUIDv7 ids (a backlog drained with --batch-size 20000) in one parameter is about
    740 KB; a ClickHouse server refuses any parameter over 128 KiB ("Field value too long"), which left a
    consumer retrying the same flush forever. Every stored id is still found, and only those."""
    from cohere_gateway.consumers import dedup
    from cohere_gateway.events import new_event_id
    from tests.test_storage import insert_events

    base = datetime.now(UTC) - timedelta(hours=1)
    ids = [new_event_id() for _ in range(20_000)]
    stored = [*ids[::997], "odd,id\\n"]  # spread over every chunk, and one hex-encoded
    insert_events(clickhouse_backend, [make_event(i, base, event_id=e) for i, e in enumerate(stored)], "big")
    assert dedup.stored_ids(clickhouse_backend, [*ids, "odd,id\\n"]) == set(stored)
    assert len(list(dedup.lookup_params(ids))) > 1
