"""The clickhouse-connect backend (`ServerBackend`): URL parsing, and what it says when the server cannot
be used, against a real ClickHouse server (tests/fixtures/clickhouse.py). Its inserts, deduplication and
queries are tested with the rest of storage: tests/test_storage.py and the consumer, report and read-API
tests run against both backends.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from cohere_gateway.consumers.backends import (
    BackendUnavailable,
    ServerBackend,
    ServerConfig,
    client_kwargs,
    parse_clickhouse_url,
)
from tests.fixtures.clickhouse import LocalServer, server_database
from tests.fixtures.kafka import dead_bootstrap, free_port_pair

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


def test_client_sends_no_session_and_no_compression() -> None:
    """Each request stands alone (works behind load balancers and chproxy); bodies stay plain JSON."""
    kwargs = client_kwargs(parse_clickhouse_url("http://u:p@h:8123/db"))
    assert kwargs["autogenerate_session_id"] is False and kwargs["compress"] is False


# -- errors, from a real server -----------------------------------------------------------------------------


@pytest.fixture
def database_url(clickhouse_server_url: str) -> Iterator[str]:
    with server_database(clickhouse_server_url) as url:
        yield url


def with_auth(
    url: str, user: str | None = None, password: str | None = None, database: str | None = None
) -> str:
    parts = urlsplit(url)
    cfg = parse_clickhouse_url(url)
    user = cfg.username if user is None else user
    password = cfg.password if password is None else password
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}:{cfg.port}"
    return urlunsplit((parts.scheme, netloc, "/" + (database or cfg.database), "", ""))


def test_the_real_server_answers_with_the_password_user(database_url: str) -> None:
    backend = ServerBackend(parse_clickhouse_url(database_url))
    try:
        row = backend.query("SELECT currentUser() AS user, currentDatabase() AS db")[0]
        assert row == {
            "user": parse_clickhouse_url(database_url).username,
            "db": urlsplit(database_url).path[1:],
        }
    finally:
        backend.close()


def test_connection_refused_says_check_the_server_and_port(caplog: pytest.LogCaptureFixture) -> None:
    address = dead_bootstrap()
    backend = ServerBackend(parse_clickhouse_url(f"http://gateway:hunter2@{address}/analytics"))
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as err:
        backend.command("SELECT 1")
    message = str(err.value)
    assert message.startswith(f"cannot connect to ClickHouse at ServerConfig(http://gateway@{address}/")
    assert "Connection refused" in message and "server is running" in message and "port" in message
    assert "hunter2" not in message and "hunter2" not in caplog.text
    with pytest.raises(BackendUnavailable, match="cannot connect"):  # and again: it keeps retrying cleanly
        backend.query("SELECT 1")


def test_wrong_password_says_check_the_credentials(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = ServerBackend(parse_clickhouse_url(with_auth(database_url, password="hunter2")))
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendUnavailable) as err:
        backend.command("SELECT 1")
    user = parse_clickhouse_url(database_url).username
    assert f"rejected user {user!r} (authentication failed)" in str(err.value)
    assert "check the user name and password" in str(err.value)
    assert "hunter2" not in str(err.value) and "hunter2" not in caplog.text


def test_unknown_user_says_check_the_credentials(database_url: str) -> None:
    backend = ServerBackend(parse_clickhouse_url(with_auth(database_url, user="mallory")))
    with pytest.raises(BackendUnavailable, match=r"rejected user 'mallory' \(authentication failed\)"):
        backend.command("SELECT 1")


def test_unknown_database_says_create_it(database_url: str) -> None:
    backend = ServerBackend(parse_clickhouse_url(with_auth(database_url, database="nope")))
    with pytest.raises(BackendUnavailable, match=r"database 'nope' does not exist: create it"):
        backend.command("SELECT 1")


def test_https_to_a_plain_http_port_says_check_the_scheme(database_url: str) -> None:
    if not database_url.startswith("http://"):
        pytest.skip("the server under test speaks TLS")
    backend = ServerBackend(parse_clickhouse_url(database_url.replace("http://", "https://", 1)))
    with pytest.raises(BackendUnavailable, match=r"cannot talk TLS to .* Check http:// versus https://"):
        backend.command("SELECT 1")


def test_a_failed_connect_is_retried_on_the_next_call(tmp_path: Path) -> None:
    """The consumer retries storage with backoff; a server that comes up later must be picked up."""
    port = free_port_pair()
    server = LocalServer(tmp_path / "server", port, port + 1)
    backend = ServerBackend(parse_clickhouse_url(server.url()))
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        backend.command("SELECT 1")
    server.start()
    try:
        assert backend.query("SELECT 1 AS one") == [{"one": 1}]
    finally:
        backend.close()
        server.stop()
