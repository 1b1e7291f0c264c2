"""The addon in a stock `mitmdump -s addons/mitmdump_script.py` (docs/gateway.md), a real mitmdump process in
front of the emulator: the script loads, the official SDK's request is answered through it, and its event
reaches Kafka. (Loading addons/gateway.py itself by path failed: mitmproxy does not register a script as a
module, and the gateway's dataclasses need theirs.)"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from tests.fixtures.gateway import EventReader, free_port
from tests.fixtures.kafka import create_topic
from tests.fixtures.processes import stop

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "addons" / "mitmdump_script.py"


def test_a_stock_mitmdump_runs_the_gateway_from_its_script(
    emulator_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    import cohere

    topic = create_topic(kafka_bootstrap, f"stock-{uuid.uuid4().hex[:8]}", 1)
    port = free_port()
    log = tmp_path / "mitmdump.log"
    args = [
        str(Path(sys.executable).with_name("mitmdump")),
        "-s", str(SCRIPT),
        "--mode", f"reverse:{emulator_url}@127.0.0.1:{port}",
        "--set", f"confdir={tmp_path}",
        "--set", f"upstream={emulator_url}",
        "--set", f"kafka_bootstrap={kafka_bootstrap}",
        "--set", f"topic={topic}",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline, healthy = time.monotonic() + 30, False
        while not healthy and proc.poll() is None and time.monotonic() < deadline:
            url = f"http://127.0.0.1:{port}/healthz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
                healthy = b'"ok"' in answer.read()
            time.sleep(0.05)
        text = log.read_text()
        assert healthy and "error in script" not in text, text

        client = cohere.ClientV2(api_key="sk-stock", base_url=f"http://127.0.0.1:{port}/v1/acct/stock/cohere")
        reply = client.chat(model="command-a-03-2025", messages=[{"role": "user", "content": "hi"}])
        assert reply.usage is not None and reply.usage.billed_units is not None

        reader = EventReader(kafka_bootstrap, topic)
        try:
            [event] = reader.wait_until(lambda e: e.gateway_id == "stock", 1, timeout=30)
        finally:
            reader.close()
        assert event.status_code == 200 and event.model == "command-a-03-2025"
    finally:
        stop(proc)
