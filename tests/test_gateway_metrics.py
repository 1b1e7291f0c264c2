"""The gateway's counters as Prometheus text, and how `--workers N` sums its workers' (prometheus_client's
multiprocess mode: each worker below is a real process of its own, as under the supervisor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cohere_gateway.addons.metrics import MULTIPROC_ENV, Metrics, mark_worker_dead

# One worker: counts `requests` exchanges, `rejected_401` refusals and one skipped event, brings in the
# publisher's counters, and prints its pid and the scrape it would answer.
WORKER = """
import os, sys, orjson
from pathlib import Path
from cohere_gateway.addons.metrics import Metrics
requests, rejected_401, publisher = int(sys.argv[2]), int(sys.argv[3]), orjson.loads(sys.argv[4])
m = Metrics(Path(sys.argv[1]))
m.requests["gateway"] += requests
m.exchanges["ok"] += requests
m.rejected[401] += rejected_401
m.events_skipped.inc()
m.observe_publisher(publisher)
print(os.getpid())
sys.stdout.write(m.render().decode())
"""


def _worker(directory: Path, requests: int, rejected_401: int, publisher: str = "{}") -> tuple[int, str]:
    env = os.environ | {MULTIPROC_ENV: str(directory)}
    args = [sys.executable, "-c", WORKER, str(directory), str(requests), str(rejected_401), publisher]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid, text = done.stdout.split("\n", 1)
    return int(pid), text


def test_merge_sums_every_counter_of_every_worker(tmp_path: Path) -> None:
    _worker(tmp_path, 3, 1, '{"events_delivered": 3, "events_pending": 1}')
    _, text = _worker(tmp_path, 5, 0, '{"events_delivered": 5, "events_pending": 0}')
    assert 'cohere_gateway_requests_total{route_mode="gateway"} 8' in text
    assert 'cohere_gateway_exchanges_total{outcome="ok"} 8' in text
    assert 'cohere_gateway_rejected_total{status="401"} 1' in text
    assert "cohere_gateway_events_skipped_total 2" in text
    assert "cohere_gateway_events_delivered_total 8" in text
    assert "# TYPE cohere_gateway_events_pending gauge\ncohere_gateway_events_pending 1" in text
    assert "cohere_gateway_workers 2" in text


def test_an_exited_workers_counters_stay_and_its_gauges_go(tmp_path: Path) -> None:
    first, _ = _worker(tmp_path, 3, 0, '{"events_pending": 4}')
    second, _ = _worker(tmp_path, 5, 0, '{"events_pending": 2}')
    for pid in (first, second):
        mark_worker_dead(tmp_path, pid)
    _, text = _worker(tmp_path, 1, 0)
    assert 'cohere_gateway_requests_total{route_mode="gateway"} 9' in text
    assert "cohere_gateway_workers 1" in text
    assert "cohere_gateway_events_pending" not in text  # the exited workers' gauges are gone


def test_one_process_renders_its_own_counters_without_a_workers_gauge() -> None:
    m = Metrics()
    m.requests["gateway"] += 2
    m.exchanges["ok"] += 2
    text = m.render().decode()
    assert 'cohere_gateway_requests_total{route_mode="gateway"} 2' in text
    assert 'cohere_gateway_requests_total{route_mode="compat"} 0' in text
    assert 'cohere_gateway_cache_total{result="hit"} 0' in text  # every cache result, before the first
    assert "cohere_gateway_workers" not in text
    assert m.exchanges == {"ok": 2}  # what the hooks added, as a plain Counter of this process


def test_two_gateways_in_one_process_count_apart() -> None:
    a, b = Metrics(), Metrics()
    a.hook_errors["request"] += 1
    assert 'cohere_gateway_hook_errors_total{hook="request"} 1' in a.render().decode()
    assert "cohere_gateway_hook_errors_total{" not in b.render().decode()


def test_publisher_counters_advance_by_what_they_grew() -> None:
    m = Metrics()
    m.observe_publisher({"events_delivered": 3, "events_pending": 5})
    m.observe_publisher({"events_delivered": 7, "events_pending": 1})
    m.observe_publisher({"events_delivered": 2, "events_pending": 0})  # a restarted delivery process
    text = m.render().decode()
    assert "cohere_gateway_events_delivered_total 9.0" in text
    assert "cohere_gateway_events_pending 0.0" in text


def test_a_counter_cannot_go_down() -> None:
    m = Metrics()
    m.cache["hit"] += 2
    with pytest.raises(ValueError, match="cannot go down"):
        m.cache["hit"] = 1


def test_a_worker_without_the_multiprocess_directory_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
        Metrics(tmp_path)
