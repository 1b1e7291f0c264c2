"""`cohere-gateway clickhouse start|stop|status`: the pinned chdb engine as a real ClickHouse server,
reached by clickhouse-connect (the project's ServerBackend), as real subprocesses."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cohere_gateway import localclickhouse, settings
from cohere_gateway.consumers import schema
from cohere_gateway.consumers.backends import BackendUnavailable, ServerBackend, parse_clickhouse_url
from tests.fixtures.kafka import free_port_pair

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse/battery@staple"


def test_the_private_engine_function_is_where_the_pinned_chdb_has_it() -> None:
    """Fails loudly when a chdb upgrade moves `chdb._chdb.query`: re-check the server before re-pinning."""
    assert callable(localclickhouse.engine_query())
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {m.group(1): m.group(2) for d in deps if (m := re.match(r"([\w-]+)==([\w.]+)", d))}
    assert {name: pins.get(name) for name in localclickhouse.PINNED} == localclickhouse.PINNED
    from importlib import metadata

    assert {name: metadata.version(name) for name in localclickhouse.PINNED} == localclickhouse.PINNED


def test_a_moved_engine_function_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chdb without the function (simulated: removed from the real module) fails before any process."""
    from chdb import _chdb

    monkeypatch.delattr(_chdb, "query")
    with pytest.raises(localclickhouse.ClickHouseSetupError) as err:
        localclickhouse.engine_query()
    assert "chdb._chdb.query" in str(err.value)
    assert "chdb==4.4.0" in str(err.value) and "chdb-core==26.9.0" in str(err.value)
    assert "--clickhouse URL" in str(err.value)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cohere_gateway.cli", "clickhouse", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (env or {}),
    )


def test_start_status_stop_and_the_data_survives_a_restart(tmp_path: Path) -> None:
    port = free_port_pair()
    data_dir = tmp_path / "server"
    env = {
        settings.env_name(settings.ClickHouseSettings, "password"): PASSWORD,
        settings.env_name(settings.ClickHouseSettings, "data_dir"): str(data_dir),
        settings.env_name(settings.ClickHouseSettings, "port"): str(port),
        settings.env_name(settings.ClickHouseSettings, "tcp_port"): str(port + 1),
    }
    assert cli("status", env=env).returncode == 1
    try:
        started = cli("start", env=env)
        assert started.returncode == 0, started.stderr
        assert f"--clickhouse http://gateway:PASSWORD@127.0.0.1:{port}/default" in started.stdout
        assert PASSWORD not in started.stdout + started.stderr
        status = cli("status", env=env)
        assert status.returncode == 0 and "answering /ping" in status.stdout
        elsewhere = cli("status", env={k: v for k, v in env.items() if not k.endswith("_PORT")})
        assert f"HTTP http://127.0.0.1:{port}, answering" in elsewhere.stdout  # the port it was started on
        with socket.create_connection(("127.0.0.1", port + 1), timeout=5):
            pass  # the native protocol listens too

        url = localclickhouse.Server("127.0.0.1", port, port + 1, "gateway", 0, data_dir).url(PASSWORD)
        backend = ServerBackend(parse_clickhouse_url(url))
        schema.migrate(backend)
        backend.command("CREATE TABLE kept (x UInt32) ENGINE = MergeTree ORDER BY x")
        backend.command("INSERT INTO kept SELECT number FROM numbers(1000)")
        backend.close()
        # Only the password's hash is on disk.
        assert not [p for p in data_dir.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]

        stopped = cli("stop", env=env)
        assert stopped.returncode == 0 and "ClickHouse stopped." in stopped.stdout
        assert cli("status", env=env).returncode == 1
        assert "server.pid" not in os.listdir(data_dir)
        with pytest.raises(BackendUnavailable, match="cannot connect"):
            ServerBackend(parse_clickhouse_url(url)).command("SELECT 1")

        localclickhouse.start(data_dir, port, port + 1, password=PASSWORD)  # the same, without a CLI
        backend = ServerBackend(parse_clickhouse_url(url))
        assert backend.query("SELECT count() AS n, sum(x) AS s FROM kept") == [{"n": 1000, "s": 499500}]
        assert schema.migrate(backend) == []  # the schema survived too
        backend.close()
    finally:
        localclickhouse.stop(data_dir)
    assert "Code: 76" not in (data_dir / "server.out").read_text()  # no second engine on the directory


def test_default_user_can_do_nothing_but_listen(clickhouse_server_url: str) -> None:
    """The engine's own session needs a passwordless `default`; over HTTP it must not read or write."""
    if os.environ.get("CLICKHOUSE_URL") or os.environ.get("COHERE_GATEWAY_TEST_DOCKER") == "1":
        pytest.skip("not the local server")
    cfg = parse_clickhouse_url(clickhouse_server_url)

    def as_default(sql: str) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{cfg.port}/", data=sql.encode())
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    for sql in ("SELECT * FROM system.users", "CREATE DATABASE stolen", "SELECT * FROM system.processes"):
        status, body = as_default(sql)
        assert status != 200 and "ACCESS_DENIED" in body, (sql, body)
    assert as_default("SELECT count() FROM system.databases") == (200, "0\n")  # sees no database


def test_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(localclickhouse.ClickHouseSetupError, match=f"Port {port} is in use"):
            localclickhouse.start(tmp_path / "a", port, free_port_pair())
    with pytest.raises(localclickhouse.ClickHouseSetupError, match="cannot be 'default'"):
        localclickhouse.start(tmp_path / "b", free_port_pair(), free_port_pair(), user="default")
    with pytest.raises(localclickhouse.ClickHouseSetupError, match="set a --password"):
        localclickhouse.start(tmp_path / "c", free_port_pair(), free_port_pair(), host="0.0.0.0")
    assert not localclickhouse.stop(tmp_path / "a")  # nothing was left running
