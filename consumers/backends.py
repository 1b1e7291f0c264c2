"""Two ways to reach ClickHouse behind one small interface, so migrations, inserts and queries are
written once: a server through clickhouse-connect (HTTP/HTTPS), or the embedded engine (chdb) in a
data directory. Both take the same SQL, with server-side `{name:Type}` parameters.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

# Settings every batch insert carries. The token makes a re-insert of the same batch a no-op, in the
# table and in the materialized views fed by it (docs/storage.md). The views are written in parallel:
# an insert feeds 16 of them, and one after another they took about 30 % longer (bench/sink.py, steady).
DEDUP_SETTINGS = {
    "deduplicate_blocks_in_dependent_materialized_views": 1,
    "parallel_view_processing": 1,
}

FAULT_FILE_ENV = "COHERE_GATEWAY_TEST_CLICKHOUSE_DOWN_FILE"


class BackendUnavailable(RuntimeError):
    """ClickHouse could not be reached or refused the operation; the caller retries later."""


class BackendRejected(BackendUnavailable):
    """ClickHouse refused the data itself (a value it cannot parse or store, too many partitions in one
    insert): retrying the same insert fails the same way, so the caller splits it and sets aside the rows
    that still fail. A subclass of BackendUnavailable so a caller that does not split retries (and pauses)
    rather than dropping anything."""


# Error codes that mean "this data", not "this server, now": CANNOT_PARSE_TEXT, CANNOT_PARSE_QUOTED_STRING,
# CANNOT_PARSE_INPUT_ASSERTION_FAILED, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME, TYPE_MISMATCH,
# ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA, TOO_LARGE_STRING_SIZE,
# VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN, CANNOT_PARSE_BOOL. Schema and
# access errors are left out on purpose: every row would fail them, and they are fixed by an operator.
_DATA_ERROR_CODES = frozenset({6, 26, 27, 38, 41, 53, 69, 70, 72, 117, 131, 321, 349, 467})
_ERROR_CODE = re.compile(r"Code: (\d+)\.")


def is_data_error(text: str) -> bool:
    """Whether a ClickHouse error message blames the inserted data (see BackendRejected)."""
    if "Too many partitions for single INSERT block" in text:  # TOO_MANY_PARTS, for this block only
        return True
    m = _ERROR_CODE.search(text)
    return m is not None and int(m.group(1)) in _DATA_ERROR_CODES


class DataDirBusy(BackendUnavailable):
    """Another process has the embedded engine's data directory open (chdb allows one)."""


class Backend(Protocol):
    description: str

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None: ...

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    def insert_json_rows(
        self, table: str, rows: bytes, dedup_token: str | None = None, columns: tuple[str, ...] = ()
    ) -> None: ...

    def close(self) -> None: ...


def _parse_rows(data: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in data.splitlines() if line]


def insert_settings(dedup_token: str | None) -> dict[str, Any]:
    # A key no column takes is an error, not silently dropped: it means the row and the schema disagree.
    settings: dict[str, Any] = {
        "date_time_input_format": "best_effort",
        "input_format_skip_unknown_fields": 0,
    }
    if dedup_token is not None:
        settings |= DEDUP_SETTINGS | {"insert_deduplication_token": dedup_token}
    return settings


def _sql_literal(value: Any) -> str:
    if isinstance(value, int | float):
        return str(value)
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def insert_statement(table: str, dedup_token: str | None, columns: tuple[str, ...] = ()) -> str:
    """The INSERT head for the embedded engine, whose streaming insert takes settings in the SQL."""
    settings = ", ".join(f"{k} = {_sql_literal(v)}" for k, v in insert_settings(dedup_token).items())
    names = f" ({', '.join(columns)})" if columns else ""
    return f"INSERT INTO {table}{names} SETTINGS {settings}"


class ChdbBackend:
    """The embedded engine. One connection per process, used from the consumer loop and the read
    API's threads, so every call holds a lock (chdb connections are not safe to share concurrently)."""

    def __init__(self, path: Path) -> None:
        from chdb import connect

        path.mkdir(parents=True, exist_ok=True)
        self.description = f"chdb:{path}"
        try:
            self._conn = connect(str(path))
        except RuntimeError as exc:
            raise DataDirBusy(
                f"cannot open ClickHouse data directory {path}: {exc}. Only one process may open it; "
                "stop the process using it (usually `cohere-gateway consume`) or read through its API."
            ) from None
        self._lock = threading.Lock()

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._run(lambda: self._conn.query(sql, "TabSeparated", params=params))

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            result = self._run(lambda: self._conn.query(sql, "JSONEachRow", params=params))
        return _parse_rows(result.bytes())

    def insert_json_rows(
        self, table: str, rows: bytes, dedup_token: str | None = None, columns: tuple[str, ...] = ()
    ) -> None:
        statement = insert_statement(table, dedup_token, columns)
        with self._lock:

            def insert() -> None:
                with self._conn.send_insert(statement, "JSONEachRow") as ins:
                    ins.append(rows)
                    ins.finish()

            self._run(insert)

    def _run(self, fn: Any) -> Any:
        try:
            return fn()
        except RuntimeError as exc:  # ChdbError is a RuntimeError
            kind = BackendRejected if is_data_error(str(exc)) else BackendUnavailable
            raise kind(f"ClickHouse (embedded) error: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    username: str
    password: str
    database: str
    secure: bool
    verify: bool = True

    def __repr__(self) -> str:  # never print the password
        scheme = "https" if self.secure else "http"
        return f"ServerConfig({scheme}://{self.username}@{self.host}:{self.port}/{self.database})"


URL_EXAMPLE = "https://user:password@host:8443/database"
_URL_OPTIONS = ("verify",)


def parse_clickhouse_url(url: str) -> ServerConfig:
    """`http[s]://[user[:password]@]host[:port][/database][?verify=false]`. https means TLS; the port
    defaults to ClickHouse's HTTP ports, 8123 (http) and 8443 (https). Errors never repeat the URL:
    it may hold a password."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https", "clickhouse", "clickhouses"):
        raise ValueError(
            f"ClickHouse URL must start with http:// or https://, got {parts.scheme or 'no scheme'!r} "
            f"(example: {URL_EXAMPLE})"
        )
    if not parts.hostname:
        raise ValueError(f"ClickHouse URL has no host (example: {URL_EXAMPLE})")
    try:
        port = parts.port
    except ValueError as exc:  # not a number, or out of range
        raise ValueError(f"ClickHouse URL has a bad port: {exc} (example: {URL_EXAMPLE})") from None
    database = unquote(parts.path.strip("/"))
    if "/" in database:
        raise ValueError(
            f"ClickHouse URL path must be one database name, got {database!r} (example: {URL_EXAMPLE})"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    if unknown := sorted(set(query) - set(_URL_OPTIONS)):
        raise ValueError(
            f"ClickHouse URL has unknown option(s) {', '.join(unknown)}; accepted: "
            f"{', '.join(_URL_OPTIONS)} (e.g. ?verify=false for a self-signed certificate)"
        )
    secure = parts.scheme in ("https", "clickhouses")
    verify = query.get("verify", ["true"])[0].lower() not in ("false", "0", "no")
    return ServerConfig(
        host=parts.hostname,
        port=port or (8443 if secure else 8123),
        username=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        database=database or "default",
        secure=secure,
        verify=verify,
    )


def client_kwargs(cfg: ServerConfig) -> dict[str, Any]:
    return {
        "host": cfg.host,
        "port": cfg.port,
        "username": cfg.username,
        "password": cfg.password,
        "database": cfg.database,
        "secure": cfg.secure,
        "verify": cfg.verify,
        "compress": False,
        # No HTTP session: every request stands alone, so it works behind load balancers and proxies
        # (chproxy, ClickHouse Cloud) and a request never waits on a session held by an earlier one.
        "autogenerate_session_id": False,
    }


# ClickHouse error codes that mean "fix the configuration": AUTHENTICATION_FAILED, UNKNOWN_USER,
# WRONG_PASSWORD, REQUIRED_PASSWORD; UNKNOWN_DATABASE; ACCESS_DENIED.
_AUTH_CODES = frozenset({516, 192, 193, 194})
_UNKNOWN_DATABASE = 81
_ACCESS_DENIED = 497


def explain_server_error(exc: BaseException, cfg: ServerConfig) -> str:
    """What went wrong talking to the server, and what to check. Pure: looks at the exception only.
    Never includes the password (the server's own messages do not carry it either)."""
    where = f"ClickHouse at {cfg!r}"
    code = getattr(exc, "code", None)
    text = str(exc)
    if code in _AUTH_CODES or "AUTHENTICATION_FAILED" in text or "status 401" in text:
        return (
            f"{where} rejected user {cfg.username!r} (authentication failed): check the user name and "
            "password in --clickhouse / COHERE_GATEWAY_CLICKHOUSE"
        )
    if code == _UNKNOWN_DATABASE or "UNKNOWN_DATABASE" in text:
        return (
            f"{where}: database {cfg.database!r} does not exist: create it (CREATE DATABASE "
            f"{cfg.database}) or put an existing database in the URL path"
        )
    if code == _ACCESS_DENIED or "ACCESS_DENIED" in text:
        return (
            f"{where}: user {cfg.username!r} lacks a privilege it needs (the consumer creates tables, "
            f"inserts and selects in {cfg.database!r}): grant it, or use another user. Server said: "
            f"{_first_line(text)}"
        )
    cause = _root_cause(exc)
    reason = f"{type(cause).__name__}: {cause}" if cause is not exc else _first_line(text)
    if isinstance(cause, ssl.SSLError) or "SSL" in type(cause).__name__:
        return (
            f"cannot talk TLS to {where}: {reason}. Check http:// versus https:// and the port "
            "(8123 plain, 8443 TLS); for a self-signed certificate add ?verify=false"
        )
    if isinstance(cause, OSError | TimeoutError) or "Timeout" in type(cause).__name__:
        return (
            f"cannot connect to {where}: {reason}. Check that the server is running and that the host "
            "and port in --clickhouse are right (HTTP interface: 8123 plain, 8443 TLS)"
        )
    return f"{where}: {_first_line(text)}"


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception urllib3 and clickhouse-connect wrapped (e.g. ConnectionRefusedError)."""
    seen = {id(exc)}
    current = exc
    while True:
        nxt = current.__cause__ or current.__context__ or getattr(current, "reason", None)
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            return current
        seen.add(id(nxt))
        current = nxt


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


class ServerBackend:
    """A ClickHouse server over HTTP(S). `client` is injectable so the request building is testable
    without a server; normally it is built from the URL."""

    def __init__(self, cfg: ServerConfig, client: Any = None) -> None:
        self.description = repr(cfg)
        self._cfg = cfg
        self._client = client
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        if self._client is None:
            import clickhouse_connect

            try:
                self._client = clickhouse_connect.get_client(**client_kwargs(self._cfg))
            except Exception as exc:
                raise BackendUnavailable(explain_server_error(exc, self._cfg)) from None
        return self._client

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._run(lambda c: c.command(sql, parameters=params))

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return _parse_rows(self._run(lambda c: c.raw_query(sql, parameters=params, fmt="JSONEachRow")))

    def insert_json_rows(
        self, table: str, rows: bytes, dedup_token: str | None = None, columns: tuple[str, ...] = ()
    ) -> None:
        self._run(
            lambda c: c.raw_insert(
                table,
                column_names=list(columns) or None,
                insert_block=rows,
                settings=insert_settings(dedup_token),
                fmt="JSONEachRow",
            )
        )

    def _run(self, fn: Any) -> Any:
        with self._lock:
            client = self._get_client()
            try:
                return fn(client)
            except Exception as exc:
                kind = BackendRejected if is_data_error(str(exc)) else BackendUnavailable
                raise kind(explain_server_error(exc, self._cfg)) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class FaultInjectingBackend:
    """Test seam: while the file named by $COHERE_GATEWAY_TEST_CLICKHOUSE_DOWN_FILE exists, every
    operation fails as if ClickHouse were down; if the file names a table, only inserts into that table
    fail (ClickHouse failing between two statements of one flush). The embedded engine cannot be made
    unreachable from outside its process, so the fault tests use this; with a server, a stopped server
    does the same."""

    def __init__(self, inner: Backend, flag: Path) -> None:
        self._inner = inner
        self._flag = flag
        self.description = inner.description

    def _check(self, table: str | None = None) -> None:
        try:
            only = self._flag.read_text().strip()
        except FileNotFoundError:
            return
        if not only or only == table:
            raise BackendUnavailable(f"ClickHouse unavailable (fault injected via {self._flag})")

    def command(self, sql: str, params: dict[str, Any] | None = None) -> None:
        self._check()
        self._inner.command(sql, params)

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._check()
        return self._inner.query(sql, params)

    def insert_json_rows(
        self, table: str, rows: bytes, dedup_token: str | None = None, columns: tuple[str, ...] = ()
    ) -> None:
        self._check(table)
        self._inner.insert_json_rows(table, rows, dedup_token, columns)

    def close(self) -> None:
        self._inner.close()


def chdb_path(data_dir: Path) -> Path:
    return data_dir / "clickhouse"


def open_backend(clickhouse_url: str, data_dir: Path) -> Backend:
    """The server when a URL is given, else the embedded engine under <data_dir>/clickhouse."""
    backend: Backend
    if clickhouse_url:
        backend = ServerBackend(parse_clickhouse_url(clickhouse_url))
    else:
        backend = ChdbBackend(chdb_path(data_dir))
    if flag := os.environ.get(FAULT_FILE_ENV):
        backend = FaultInjectingBackend(backend, Path(flag))
    return backend
