"""The clickhouse-connect backend (`ServerBackend`): URL parsing, the HTTP requests it sends, and its
errors. With `CLICKHOUSE_URL` set (or Docker), tests/test_storage.py and tests/test_consumer.py run against
a real server through this backend; here no ClickHouse server can run, so `StandInServer` stands in for
one: a local HTTP server on 127.0.0.1 that records every request and answers it the way ClickHouse's HTTP
interface does, by running the request's SQL in the embedded engine (chdb) - the same engine and SQL the
embedded backend uses. It checks the user, password and database a real server would check.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from cohere_gateway.events import encode
from consumers import queries, schema
from consumers.backends import (
    BackendUnavailable,
    ChdbBackend,
    ServerBackend,
    ServerConfig,
    parse_clickhouse_url,
)
from consumers.consumer import LOAD_INTENTS_SQL
from consumers.rows import EVENT_COLUMNS, convert
from tests.fixtures.clickhouse import make_event

USER, PASSWORD, DATABASE = "gateway", "s3cr3t p@ss/word", "analytics"
# Request parameters that are not ClickHouse settings (HTTP interface transport parameters).
TRANSPORT_PARAMS = {"database", "query_id", "session_id", "wait_end_of_query", "query", "default_format"}


# -- URL parsing ----------------------------------------------------------------------------------------


def test_url_with_every_part() -> None:
    cfg = parse_clickhouse_url("https://al%40ice:p%3Ass%2Fw@ch.example.com:9443/analytics?verify=false")
    assert cfg == ServerConfig(
        host="ch.example.com",
        port=9443,
        username="al@ice",
        password="p:ss/w",
        database="analytics",
        secure=True,
        verify=False,
    )


@pytest.mark.parametrize(
    ("url", "host", "port", "secure", "user", "database"),
    [
        ("http://localhost", "localhost", 8123, False, "default", "default"),
        ("https://ch.internal/", "ch.internal", 8443, True, "default", "default"),
        ("http://bob@10.0.0.5:18123/db1", "10.0.0.5", 18123, False, "bob", "db1"),
        ("http://[::1]:8123/x", "::1", 8123, False, "default", "x"),
        ("clickhouses://h", "h", 8443, True, "default", "default"),
    ],
)
def test_url_defaults(url: str, host: str, port: int, secure: bool, user: str, database: str) -> None:
    cfg = parse_clickhouse_url(url)
    assert (cfg.host, cfg.port, cfg.secure, cfg.username, cfg.password, cfg.database, cfg.verify) == (
        host,
        port,
        secure,
        user,
        "",
        database,
        True,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ch.example.com:8123", "must start with http:// or https://"),
        ("ftp://u:hunter2@h/db", "must start with http:// or https://, got 'ftp'"),
        ("http://u:hunter2@/db", "has no host"),
        ("http://u:hunter2@h:80x/db", "bad port"),
        ("http://u:hunter2@h:70000/db", "bad port"),
        ("http://u:hunter2@h/db/extra", "one database name"),
        ("http://u:hunter2@h/db?secure=1", "unknown option(s) secure; accepted: verify"),
    ],
)
def test_bad_urls_say_what_to_fix_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        parse_clickhouse_url(url)
    assert "hunter2" not in str(err.value)
    assert "example" in str(err.value) or "accepted" in str(err.value)


def test_password_never_in_repr_or_description() -> None:
    cfg = parse_clickhouse_url("https://alice:hunter2@h:8443/db")
    backend = ServerBackend(cfg)
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg) and "hunter2" not in backend.description
    assert repr(cfg) == "ServerConfig(https://alice@h:8443/db)"


# -- the stand-in server --------------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def sql(self) -> str:
        """The statement, with the `FORMAT x` clause clickhouse-connect appends split off."""
        return split_format(self.params.get("query", "") + self.body.decode(errors="replace"))[0]

    @property
    def settings(self) -> dict[str, str]:
        return {
            k: v
            for k, v in self.params.items()
            if k not in TRANSPORT_PARAMS and not k.startswith("param_") and k != "client_protocol_version"
        }

    @property
    def bound(self) -> dict[str, str]:
        return {k.removeprefix("param_"): v for k, v in self.params.items() if k.startswith("param_")}


def split_format(text: str) -> tuple[str, str]:
    if m := re.search(r"\n FORMAT (\w+)$", text):
        return text[: m.start()], m.group(1)
    return text, "TabSeparated"


class StandInServer:
    """ClickHouse's HTTP interface over the embedded engine: the SQL of each request runs in chdb and the
    answer goes back in the requested format, so clickhouse-connect's whole protocol (its version and
    settings queries at connect, server-side parameters, raw inserts with settings) is exercised."""

    def __init__(self, engine_dir: Path, port: int = 0) -> None:
        self.engine = ChdbBackend(engine_dir)
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    self.command,
                    dict(parse_qsl(urlsplit(self.path).query, keep_blank_values=True)),
                    dict(self.headers),
                    self.rfile.read(length),
                )
                with server.lock:
                    server.requests.append(request)
                status, code, body = server.answer(request)
                self.send_response(status)
                if code:
                    self.send_header("X-ClickHouse-Exception-Code", str(code))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.http.server_address[1])

    def url(self, user: str = USER, password: str = PASSWORD, database: str = DATABASE) -> str:
        from urllib.parse import quote

        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}"

    def answer(self, request: Request) -> tuple[int, int, bytes]:
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return (
                403,
                516,
                b"Code: 516. DB::Exception: gateway: Authentication failed: password is "
                + (b"incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)\n"),
            )
        if request.params.get("database", DATABASE) != DATABASE:
            name = request.params["database"].encode()
            return (
                404,
                81,
                b"Code: 81. DB::Exception: Database " + name + b" does not exist. (UNKNOWN_DATABASE)\n",
            )
        sql, fmt = split_format(request.params.get("query", "") + request.body.decode())
        try:
            if m := re.match(r"INSERT INTO (\w+)(?: \(([^)]*)\))? FORMAT JSONEachRow\n", sql):
                rows = sql[m.end() :].encode()
                columns = tuple(c.strip(" `") for c in m.group(2).split(",")) if m.group(2) else ()
                self._insert(m.group(1), rows, request.settings, columns)
                return 200, 0, b""
            result = self.engine._run(lambda: self.engine._conn.query(sql, fmt, params=request.bound or None))
            return 200, 0, result.bytes()
        except BackendUnavailable as exc:
            return 500, 62, f"Code: 62. DB::Exception: {exc}\n".encode()

    def _insert(self, table: str, rows: bytes, settings: dict[str, str], columns: tuple[str, ...]) -> None:
        # The embedded engine takes insert settings in the SQL; the token (with the view setting that
        # goes with it) is what changes the outcome, so the stand-in honours exactly that.
        self.engine.insert_json_rows(table, rows, settings.get("insert_deduplication_token"), columns)

    def statements(self) -> list[Request]:
        """Requests after clickhouse-connect's connect-time queries."""
        return [r for r in self.requests if not is_connect_query(r)]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.engine.close()


CONNECT_QUERIES = (
    "SELECT version(), timezone()",
    "SELECT name, value, readonly FROM system.settings LIMIT 10000",
    "SELECT 1 AS check",
)


def is_connect_query(r: Request) -> bool:
    return r.sql in CONNECT_QUERIES


@pytest.fixture
def server(tmp_path: Path) -> Iterator[StandInServer]:
    srv = StandInServer(tmp_path / "engine")
    yield srv
    srv.close()


@pytest.fixture
def backend(server: StandInServer) -> Iterator[ServerBackend]:
    b = ServerBackend(parse_clickhouse_url(server.url()))
    yield b
    b.close()


# -- requests ---------------------------------------------------------------------------------------------


def test_connect_checks_version_and_settings_with_basic_auth_and_no_session(
    server: StandInServer, backend: ServerBackend
) -> None:
    backend.command("SELECT 1")
    first = server.requests[0]
    assert first.sql == "SELECT version(), timezone()"
    assert "database" not in first.params  # asked before the database is known to exist
    assert server.requests[1].sql == CONNECT_QUERIES[1]
    auth = base64.b64decode(first.headers["Authorization"].removeprefix("Basic ")).decode()
    assert auth == f"{USER}:{PASSWORD}"
    assert all(r.headers["Authorization"] == first.headers["Authorization"] for r in server.requests)
    assert all("session_id" not in r.params for r in server.requests)  # works behind load balancers
    assert all(r.params["database"] == DATABASE for r in server.requests[1:])
    assert all(PASSWORD not in str(r.params) for r in server.requests)


def test_migrations_and_retention_send_the_sql_verbatim(
    server: StandInServer, backend: ServerBackend
) -> None:
    assert schema.migrate(backend) == [m.version for m in schema.load_migrations()]
    schema.apply_retention(backend, raw_days=7, aggregate_days=30)

    sent = [r for r in server.statements() if r.method == "POST"]
    expected = [schema.MIGRATIONS_TABLE_SQL]  # exactly: not even whitespace changes
    expected.append("SELECT version, checksum FROM schema_migrations FINAL")
    for mig in schema.load_migrations():
        expected += mig.statements()
        expected.append(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES "
            "({version:UInt32}, {name:String}, {checksum:String})"
        )
    sqls = [r.sql for r in sent]
    assert sqls[: len(expected)] == expected
    recorded = [r.bound for r in sent if r.sql.startswith("INSERT INTO schema_migrations")]
    assert recorded == [
        {"version": str(m.version), "name": m.name, "checksum": m.checksum} for m in schema.load_migrations()
    ]
    assert "ALTER TABLE events MODIFY TTL toDateTime(start_time) + toIntervalDay(7)" in sqls
    # The stand-in ran them in the embedded engine, so the schema is really there, with the new TTL.
    assert schema.current_ttl_days(backend, "events") == 7
    assert schema.migrate(backend) == []


def insert_batch(backend: ServerBackend, first: int, count: int, token: str | None) -> None:
    base = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    rows = [convert(encode(make_event(i, base)), 0, i) for i in range(first, first + count)]
    assert all(isinstance(r, bytes) for r in rows)
    backend.insert_json_rows(
        "events", b"".join(r for r in rows if isinstance(r, bytes)), token, EVENT_COLUMNS
    )


def test_insert_carries_the_dedup_token_and_view_dedup_setting(
    server: StandInServer, backend: ServerBackend
) -> None:
    schema.migrate(backend)
    server.requests.clear()
    insert_batch(backend, 0, 40, "topic:0:0-39:1700000000000")
    insert_batch(backend, 0, 40, "topic:0:0-39:1700000000000")  # a replay after a crash

    inserts = [r for r in server.requests if r.sql.startswith("INSERT INTO events")]
    assert len(inserts) == 2
    head, _, rows = inserts[0].body.partition(b"\n")
    assert (
        head
        == b"INSERT INTO events ("
        + b", ".join(b"`%s`" % c.encode() for c in EVENT_COLUMNS)
        + b") FORMAT JSONEachRow"
    )
    assert rows.count(b"\n") == 40
    assert inserts[0].params["database"] == DATABASE
    assert (
        inserts[0].settings.items()
        >= {
            "insert_deduplication_token": "topic:0:0-39:1700000000000",
            "deduplicate_blocks_in_dependent_materialized_views": "1",
            "date_time_input_format": "best_effort",
        }.items()
    )
    assert inserts[0].headers["Content-Type"] == "application/octet-stream"
    # The engine behind the stand-in honoured the token: the replay was a no-op, views included.
    raw = backend.query("SELECT count() AS n FROM events")[0]["n"]
    agg = backend.query("SELECT sum(requests) AS n FROM events_by_minute")[0]["n"]
    assert (int(raw), int(agg)) == (40, 40)


def test_an_insert_without_a_token_has_no_dedup_settings(
    server: StandInServer, backend: ServerBackend
) -> None:
    schema.migrate(backend)
    server.requests.clear()
    intent = b'{"topic":"t","partition":0,"first_offset":0,"last_offset":9,"first_timestamp_ms":5}\n'
    backend.insert_json_rows("consumer_batches", intent)
    (insert,) = [r for r in server.requests if r.sql.startswith("INSERT")]
    assert insert.settings["date_time_input_format"] == "best_effort"
    assert not {"insert_deduplication_token", "deduplicate_blocks_in_dependent_materialized_views"} & set(
        insert.settings
    )
    rows = backend.query(LOAD_INTENTS_SQL, {"topic": "t", "partition": 0, "from_offset": 0})
    assert [int(r["last_offset"]) for r in rows] == [9]
    select = server.requests[-1]
    assert select.sql == LOAD_INTENTS_SQL
    assert select.bound == {"topic": "t", "partition": "0", "from_offset": "0"}


def test_query_layer_sends_its_sql_files_verbatim(server: StandInServer, backend: ServerBackend) -> None:
    schema.migrate(backend)
    insert_batch(backend, 0, 120, "q:0:0-119:1")
    server.requests.clear()
    summary = queries.run(backend, "summary", {"since": "2h", "by": "model", "account_id": "acct-a"})
    assert summary["total"]["requests"] == 60  # the engine behind the stand-in answered, filtered
    for name in ("timeseries", "errors", "top_api_keys", "recent"):
        queries.run(backend, name, {"since": "2h"})
    queries.run(backend, "top_metadata", {"since": "2h", "key": "user"})
    sent = {r.sql for r in server.statements()}
    shipped = {
        p.read_text().rstrip(";") for p in Path(queries.__file__).parent.joinpath("query_sql").glob("*.sql")
    }
    assert len(sent) >= 6 and sent <= shipped, sent - shipped
    # Server-side parameters travel as param_<name>, the empty filter as an empty value.
    first = server.statements()[0]
    assert first.bound["account_id"] == "acct-a" and first.bound["gateway_id"] == ""


# -- errors -----------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_says_check_the_server_and_port(caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    backend = ServerBackend(parse_clickhouse_url(f"http://{USER}:hunter2@127.0.0.1:{port}/{DATABASE}"))
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as err:
        backend.command("SELECT 1")
    message = str(err.value)
    assert message.startswith(f"cannot connect to ClickHouse at ServerConfig(http://{USER}@127.0.0.1:{port}/")
    assert "Connection refused" in message and "server is running" in message and "port" in message
    assert "hunter2" not in message and "hunter2" not in caplog.text
    with pytest.raises(BackendUnavailable, match="cannot connect"):  # and again: it keeps retrying cleanly
        backend.query("SELECT 1")


def test_wrong_password_says_check_the_credentials(
    server: StandInServer, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ServerBackend(parse_clickhouse_url(server.url(password="hunter2")))
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as err:
        backend.command("SELECT 1")
    assert "rejected user 'gateway' (authentication failed)" in str(err.value)
    assert "check the user name and password" in str(err.value)
    assert "hunter2" not in str(err.value) and "hunter2" not in caplog.text
    assert not server.statements()  # nothing ran


def test_unknown_database_says_create_it(server: StandInServer) -> None:
    backend = ServerBackend(parse_clickhouse_url(server.url(database="nope")))
    with pytest.raises(BackendUnavailable, match=r"database 'nope' does not exist: create it"):
        backend.command("SELECT 1")


def test_https_to_a_plain_http_port_says_check_the_scheme(server: StandInServer) -> None:
    backend = ServerBackend(parse_clickhouse_url(server.url().replace("http://", "https://", 1)))
    with pytest.raises(BackendUnavailable, match=r"cannot talk TLS to .* Check http:// versus https://"):
        backend.command("SELECT 1")


def test_a_failed_connect_is_retried_on_the_next_call(tmp_path: Path) -> None:
    """The consumer retries storage with backoff; a server that comes up later must be picked up."""
    srv = StandInServer(tmp_path / "engine")
    port = srv.port
    srv.http.shutdown()
    srv.http.server_close()
    backend = ServerBackend(parse_clickhouse_url(srv.url()))
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        backend.command("SELECT 1")
    srv.engine.close()
    again = StandInServer(tmp_path / "engine", port=port)
    try:
        backend.command("SELECT 1")
        assert any(r.sql == "SELECT 1" for r in again.requests)
    finally:
        backend.close()
        again.close()
