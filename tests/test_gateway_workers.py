"""`proxy --workers N`: N gateway processes share one port, each with its own spool, and stop together."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
import uuid

import cohere

from tests.fixtures.gateway import EventReader, start_gateway


def test_workers_share_the_port_and_every_exchange_is_one_event(
    emulator_url: str, kafka_bootstrap: str, kafka_topic: str
) -> None:
    gw = start_gateway(
        emulator_url, kafka_bootstrap, kafka_topic, transparent=False, workers=2, listen_backlog=555
    )
    reader = EventReader(kafka_bootstrap, kafka_topic)
    try:
        # Each worker's listener queues --listen-backlog connections (`ss` shows it as Send-Q).
        port = gw.url.rsplit(":", 1)[1]
        listed = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[2] for line in listed.splitlines()] == ["555", "555"], listed
        pids = set()
        for _ in range(40):  # a new connection each time: the kernel spreads them over the workers
            with urllib.request.urlopen(gw.url + "/healthz", timeout=10) as resp:
                pids.add(json.load(resp)["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, f"only {pids} answered"
        assert gw.proc.pid not in pids  # the supervisor itself serves nothing

        tag = uuid.uuid4().hex[:8]
        for i in range(12):
            co = cohere.ClientV2(api_key="k", base_url=f"{gw.base('acct', 'gw')}/cohere")  # new connection
            co.chat(
                model="command-r",
                messages=[{"role": "user", "content": f"hello {i}"}],
                request_options={"additional_headers": {"cf-aig-event-id": f"{tag}-{i}"}, "max_retries": 0},
            )
        events = reader.wait_until(lambda e: (e.client_event_id or "").startswith(tag), n=12)
        assert sorted(e.client_event_id for e in events) == sorted(f"{tag}-{i}" for i in range(12))
        spools = sorted(p.name for p in (gw.data_dir / "spool").iterdir())
        assert spools == ["w0", "w1"]

        # Whichever worker answers /metrics shows the whole gateway: its own counters plus the other's
        # (prometheus_client's multiprocess files; it writes counts as floats, 12.0).
        gateway_requests = 'cohere_gateway_requests_total{route_mode="gateway"}'
        wanted = {(f"{gateway_requests} 12", "cohere_gateway_workers 2")}

        def scrapes() -> set[tuple[str, str]]:
            texts = [gw.get("/metrics").decode().splitlines() for _ in range(8)]  # new connections
            return {
                (
                    next(x for x in t if x.startswith(gateway_requests)).removesuffix(".0"),
                    next(x for x in t if x.startswith("cohere_gateway_workers ")).removesuffix(".0"),
                )
                for t in texts
            }

        deadline = time.monotonic() + 15
        while (seen := scrapes()) != wanted and time.monotonic() < deadline:
            time.sleep(0.2)
        assert seen == wanted
    finally:
        reader.close()
        code = gw.stop(signal.SIGTERM)
    assert code == 0, gw.log_text()
