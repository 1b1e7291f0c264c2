"""`cohere-gateway report` as a real subprocess, opening the embedded data directory itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from consumers import schema
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_storage import insert_events


def test_report_json_and_table_from_the_data_directory(storage: Storage) -> None:
    backend = storage.open()
    schema.migrate(backend)
    events = [make_event(i, datetime.now(UTC) - timedelta(minutes=20)) for i in range(90)]
    insert_events(backend, events, "r-1")
    storage.close()  # the report process opens the directory itself
    base = [sys.executable, "-m", "cohere_gateway.cli", "report", *storage.cli_args, "--since", "1h"]
    out = subprocess.run([*base, "--by", "endpoint", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["total"]["requests"] == 90
    assert {g["key"]: g["requests"] for g in data["groups"]} == {"chat": 30, "embed": 30, "rerank": 30}
    wide = os.environ | {"COLUMNS": "200"}
    table = subprocess.run([*base, "--by", "model"], capture_output=True, text=True, timeout=120, env=wide)
    assert table.returncode == 0 and "TOTAL" in table.stdout and "command-r" in table.stdout
    bad = subprocess.run([*base[:-1], "soon"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "duration 'soon' not understood" in bad.stderr
