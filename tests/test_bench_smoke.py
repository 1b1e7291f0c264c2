"""CI smoke run of the benchmark suite: every scenario at `--quick` sizes against real processes (the
session Kafka broker, emulator, gateway, mitmdump, consumer), recorded into a temporary RESULTS file.

No timing is asserted: speed belongs to the full runs recorded in bench/RESULTS.md. What is asserted is
that each scenario ran its targets without errors, produced its tables, and recorded a reproducible
section (command, commit, machine) without touching the real RESULTS.md.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from bench import report
from bench.__main__ import OWN, main, scenarios
from bench.loadgen import read_response
from bench.stats import percentile

# (scenario, a row label every run must contain in its tables)
EXPECTED_ROWS = {
    "overhead": ("direct", "bare mitmdump", "gateway", "all checks"),
    "streaming": ("direct", "bare mitmdump", "gateway"),
    "publish": (
        "live: Kafka acks=all, idempotent",
        "spool: Kafka down, fsync interval",
        "off",
        "live",
        "spool",
    ),
    "soak": ("300", "1000"),
    "lean": ("lean bare", "gateway", "gateway --workers 2"),
    "read": ("summary", "recent (latest 100)", "event by id"),
    "cache": ("direct", "gateway HIT", "gateway MISS (cache on)", "gateway, cache off", "gateway MISS"),
    "limits": ("no rules", "3 rules, memory", "3 rules, Redis"),
    "streams": ("direct", "gateway ×1"),
    "connections": ("direct", "gateway, pool off", "gateway, pool new-connections", "gateway, pool always"),
}


@pytest.fixture
def shared_kafka(kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Scenarios use the session broker instead of starting their own (targets.kafka honours this)."""
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    return kafka_bootstrap


def table_rows(section: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| budget")
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", scenarios())
def test_scenario_quick_run_records_its_tables(
    scenario: str,
    shared_kafka: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    results = tmp_path / "RESULTS.md"
    # The default file stands in for bench/RESULTS.md (shared, appended to by others at any time):
    # a run told to write elsewhere must not create it.
    default = tmp_path / "default-RESULTS.md"
    monkeypatch.setattr(report, "RESULTS", default)

    assert main([scenario, "--quick", "--results", str(results)]) == 0

    text = results.read_text()
    assert text.startswith(f"### {scenario} — ")
    assert f"- command: `python -m bench {scenario} --quick`" in text
    assert re.search(r"- commit: (\w+|unknown)", text)
    assert "- machine: " in text and "cores" in text
    rows = table_rows(text)
    labels = {r[0] for r in rows}
    assert rows, f"{scenario} recorded no table rows"
    for expected in EXPECTED_ROWS.get(scenario, ()):  # sink/spool (other owners) are checked for rows only
        assert expected in labels, f"{scenario}: no row {expected!r} in\n{text}"
    failed = failure_counts(text)
    assert all(n == "0" for n in failed), f"{scenario} saw failed requests:\n{text}"
    assert f"appended to {results}" in capsys.readouterr().out
    assert not default.exists()


FAILURE_COLUMNS = ("errors", "failures")


def failure_counts(text: str) -> list[str]:
    """Every cell of an `errors` or `failures` column, in every table of the section."""
    counts: list[str] = []
    col = None
    for line in text.splitlines():
        if not line.startswith("|"):
            col = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if col is None:
            col = next((cells.index(name) for name in FAILURE_COLUMNS if name in cells), -1)
        elif col >= 0 and len(cells) > col and cells[col].isdigit():
            counts.append(cells[col])
    return counts


def test_failure_counts_are_read_from_every_table() -> None:
    text = "| a | errors |\n|---|---|\n| x | 0 |\n\n| b | failures |\n|---|---|\n| y | 3 |\n"
    assert failure_counts(text) == ["0", "3"]


def test_no_record_prints_without_writing(shared_kafka: str, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    assert main(["streaming", "--quick", "--no-record", "--results", str(results)]) == 0
    assert not results.exists()


def test_every_scenario_is_offered() -> None:
    assert set(OWN) <= set(scenarios())
    with pytest.raises(SystemExit) as exc:
        main(["no-such-scenario"])
    assert exc.value.code == 2


def test_read_response_handles_length_and_chunked_bodies() -> None:
    async def parse(raw: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_response(reader)

    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    chunked = (
        b"HTTP/1.1 429 Too Many\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
    )
    assert asyncio.run(parse(plain)) == (200, b"hello")
    assert asyncio.run(parse(chunked)) == (429, b"abcde")


def test_percentile_is_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) != percentile([], 50)  # NaN
