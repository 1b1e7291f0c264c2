"""The gateway's counters as Prometheus text, and how `--workers N` sums its workers' (pure code)."""

from __future__ import annotations

from pathlib import Path

import pytest

from addons.metrics import Metrics, merge, read_snapshots, render, write_snapshot


def _worker(requests: int, rejected_401: int) -> Metrics:
    m = Metrics()
    m.requests["gateway"] += requests
    m.exchanges["ok"] += requests
    m.rejected[401] += rejected_401
    m.events_skipped += 1
    return m


def test_merge_sums_every_counter_of_every_worker() -> None:
    a = _worker(3, 1).snapshot({"events_delivered": 3, "events_pending": 1})
    b = _worker(5, 0).snapshot({"events_delivered": 5, "events_pending": 0})
    text = render(merge([a, b]), workers=2)
    assert 'cohere_gateway_requests_total{route_mode="gateway"} 8' in text
    assert 'cohere_gateway_exchanges_total{outcome="ok"} 8' in text
    assert 'cohere_gateway_rejected_total{status="401"} 1' in text
    assert "cohere_gateway_events_skipped_total 2" in text
    assert "cohere_gateway_events_delivered_total 8" in text
    assert "# TYPE cohere_gateway_events_pending gauge\ncohere_gateway_events_pending 1" in text
    assert "cohere_gateway_workers 2" in text


def test_one_process_renders_its_own_counters_without_a_workers_gauge() -> None:
    text = render(_worker(2, 0).snapshot({}))
    assert 'cohere_gateway_requests_total{route_mode="gateway"} 2' in text
    assert 'cohere_gateway_requests_total{route_mode="compat"} 0' in text
    assert "cohere_gateway_workers" not in text


def test_snapshots_round_trip_through_the_shared_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for pid, requests in ((101, 4), (102, 6)):
        monkeypatch.setattr("os.getpid", lambda pid=pid: pid)
        write_snapshot(tmp_path, _worker(requests, 0).snapshot({}))
    (tmp_path / "103.json").write_text("{half a file")  # skipped, not fatal
    others = read_snapshots(tmp_path, skip_pid=101)
    assert [s["requests"] for s in others] == [{"gateway": 6}]
    assert not list(tmp_path.glob(".*.tmp"))
