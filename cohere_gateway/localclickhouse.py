"""A local ClickHouse server without Docker: the pinned chdb engine serving ClickHouse's own HTTP and
native (TCP) protocols, for tests and local use of the clickhouse-connect path.

chdb is clickhouse-local in a library. clickhouse-local opens the server's listeners on
`SYSTEM START LISTEN HTTP/TCP` and keeps them open while a query of its session runs, so the server
process runs those two statements and then one query that sleeps until it is killed. There is no public
API for this: it runs through `chdb._chdb.query`, a private function of the pinned chdb, checked by
`engine_query()` at start (and by tests/test_localclickhouse.py). Ports and users come from `config.xml`
and `users.xml` in the process's working directory, which clickhouse-local reads when the session opens;
`import chdb` opens a session of its own, so it must run before the process changes into that directory.

Each server lives in its own data directory: `config.xml`, `users.xml`, the engine's files in `db/`,
`server.pid` and `server.out`, so several servers (tests, a developer's shell) run side by side on
different ports. One server per process: the engine holds one session per process.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from cohere_gateway import settings
from cohere_gateway.localkafka import _alive, _log_tail, _port_free

# The versions whose private function this module was checked against (pyproject.toml pins them).
PINNED = {"chdb": "4.4.0", "chdb-core": "26.9.0"}
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 2
PASSWORD_ENV = settings.env_name(settings.ClickHouseSettings, "password")

# The query that keeps the listeners open: one row a second for ~3000 years, stopped by KILL QUERY.
SERVE_SQL = (
    "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
    "SELECT sleepEachRow(1) FROM numbers(100000000000) "
    "SETTINGS function_sleep_max_microseconds_per_block = 0, max_block_size = 1 FORMAT Null"
)
# Ended from outside (the engine runs one query per session at a time): only the serving query is Local.
STOP_SQL = "KILL QUERY WHERE interface = 'Local' AND query LIKE '%sleepEachRow%'"

Progress = Callable[[str], None]


class ClickHouseSetupError(RuntimeError):
    """Something the user must fix (free a port, reinstall the pinned chdb, ...); the message says what."""


@dataclass(frozen=True)
class Server:
    host: str
    http_port: int
    tcp_port: int
    user: str
    pid: int
    data_dir: Path

    def url(self, password: str = "", database: str = "default") -> str:
        """The --clickhouse URL for this server (with the password only when given)."""
        auth = quote(self.user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"http://{auth}@{_url_host(self.host)}:{self.http_port}/{database}"


@dataclass(frozen=True)
class Status:
    pid: int | None
    running: bool
    ready: bool
    address: str

    def describe(self) -> str:
        if self.ready:
            return f"running: pid {self.pid}, HTTP {self.address}, answering /ping"
        if self.running:
            return f"starting or unhealthy: pid {self.pid}, HTTP {self.address} not answering /ping"
        return "not running"


def _quiet(_: str) -> None:
    pass


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the private function ------------------------------------------------------------------------------


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def engine_query() -> Callable[..., Any]:
    """chdb's private `_chdb.query(sql, format, path=...)`, or a clear error naming the pinned versions."""
    try:
        import chdb  # noqa: F401 - opens chdb's own session first (see the module doc)
        from chdb import _chdb

        query = _chdb.query
    except (ImportError, AttributeError) as exc:
        installed = ", ".join(f"{n} {_installed(n)}" for n in PINNED)
        pinned = ", ".join(f"{n}=={v}" for n, v in PINNED.items())
        raise ClickHouseSetupError(
            f"The local ClickHouse server runs through chdb's private function chdb._chdb.query, which "
            f"this chdb does not have ({exc}). Installed: {installed}; it was checked with {pinned}. "
            f"Reinstall those (`pip install {' '.join(f'{n}=={v}' for n, v in PINNED.items())}`), or use "
            "a ClickHouse server of your own (--clickhouse URL)."
        ) from None
    if not callable(query):
        raise ClickHouseSetupError(f"chdb._chdb.query is not callable (chdb {_installed('chdb')})")
    return query


# -- configuration ---------------------------------------------------------------------------------------


def _engine_dir(data_dir: Path) -> Path:
    return data_dir / "db"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _write_config(data_dir: Path, host: str, http_port: int, tcp_port: int, user: str, password: str) -> None:
    if user == "default":
        raise ClickHouseSetupError(
            "--user cannot be 'default': that name belongs to the engine's own session. Choose another."
        )
    if not password and not _is_loopback(host):
        raise ClickHouseSetupError(
            f"--host {host} is reachable from other machines: set a --password (or {PASSWORD_ENV})."
        )
    # The engine's own session runs as `default` with no password, and only a user allowed from any host
    # or from `localhost` passes its network check - which loopback clients pass too. So `default` gets
    # no password and no privilege but the one that session needs; clients use the configured user, whose
    # password is written only as its hash.
    auth = (
        f"<password_sha256_hex>{hashlib.sha256(password.encode()).hexdigest()}</password_sha256_hex>"
        if password
        else "<no_password/>"
    )
    users = f"""<clickhouse>
  <users>
    <default>
      <no_password/>
      <networks><host>localhost</host></networks>
      <profile>default</profile>
      <quota>default</quota>
      <grants><query>GRANT SYSTEM LISTEN ON *.*</query></grants>
    </default>
    <{escape(user)}>
      {auth}
      <networks><ip>::/0</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
      <access_management>1</access_management>
    </{escape(user)}>
  </users>
  <profiles><default/></profiles>
  <quotas><default/></quotas>
</clickhouse>
"""
    # At shutdown the engine waits for idle keep-alive connections to time out, and after 5 s exits
    # with status 1: a short keep-alive keeps `stop` clean and quick (clients reconnect as usual).
    config = f"""<clickhouse>
  <listen_host>{escape(host)}</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <keep_alive_timeout>{KEEP_ALIVE_S}</keep_alive_timeout>
  <users_config>{escape(str((data_dir / "users.xml").resolve()))}</users_config>
</clickhouse>
"""
    for name, text in (("users.xml", users), ("config.xml", config)):
        path = data_dir / name
        path.write_text(text)
        path.chmod(0o600)


def _read_config(data_dir: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    root = ET.parse(data_dir / "config.xml").getroot()
    users = ET.parse(data_dir / "users.xml").getroot().find("users")
    assert users is not None
    return {
        "host": root.findtext("listen_host", "127.0.0.1"),
        "http_port": root.findtext("http_port", "8123"),
        "tcp_port": root.findtext("tcp_port", "9000"),
        "user": next(u.tag for u in users if u.tag != "default"),
    }


# -- lifecycle -------------------------------------------------------------------------------------------


def _pid_file(data_dir: Path) -> Path:
    return data_dir / "server.pid"


def _read_pid(data_dir: Path) -> int | None:
    try:
        pid = int(_pid_file(data_dir).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid) else None


def start(
    data_dir: Path,
    port: int = settings.ClickHouseSettings.port,
    tcp_port: int = settings.ClickHouseSettings.tcp_port,
    host: str = settings.ClickHouseSettings.host,
    user: str = settings.ClickHouseSettings.user,
    password: str = settings.ClickHouseSettings.password,
    progress: Progress = _quiet,
) -> Server:
    """Start (or find already running) the server for `data_dir`; return once it answers /ping.
    Data persists in `data_dir` across restarts; ports and users are rewritten at every start."""
    data_dir = Path(data_dir).resolve()
    pid = _read_pid(data_dir)
    if pid is not None:
        cfg = _read_config(data_dir)
        progress(f"ClickHouse already running for {data_dir} (pid {pid}); checking it answers...")
        wait_ready(cfg["host"], int(cfg["http_port"]), START_TIMEOUT_S, pid=pid, log=data_dir / "server.out")
        return Server(cfg["host"], int(cfg["http_port"]), int(cfg["tcp_port"]), cfg["user"], pid, data_dir)
    engine_query()  # a clear error here rather than in the child's log
    for p, what in ((port, "HTTP (--port)"), (tcp_port, "native TCP (--tcp-port)")):
        if not _port_free(p):
            raise ClickHouseSetupError(
                f"Port {p} is in use: ClickHouse needs it for {what}. Stop what uses it or choose another."
            )
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_config(data_dir, host, port, tcp_port, user, password)
    progress(f"Starting ClickHouse on http://{_url_host(host)}:{port} (data in {data_dir})...")
    out = open(data_dir / "server.out", "ab")  # noqa: SIM115 - handed to the child, which outlives us
    proc = subprocess.Popen(
        [sys.executable, "-m", "cohere_gateway.localclickhouse", str(data_dir)],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # The password travels in the environment, not argv (which `ps` shows); the server needs it to
        # stop itself (STOP_SQL runs as the configured user).
        env=os.environ | {PASSWORD_ENV: password},
        start_new_session=True,  # survives the CLI that started it; `clickhouse stop` ends it
    )
    out.close()
    _pid_file(data_dir).write_text(str(proc.pid))
    try:
        wait_ready(host, port, START_TIMEOUT_S, pid=proc.pid, log=data_dir / "server.out")
    except ClickHouseSetupError:
        stop(data_dir)
        raise
    return Server(host, port, tcp_port, user, proc.pid, data_dir)


def stop(data_dir: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server for `data_dir`: SIGTERM (it ends its serving query and shuts the engine down),
    SIGKILL after `timeout`."""
    data_dir = Path(data_dir).resolve()
    pid = _read_pid(data_dir)
    if pid is None:
        _pid_file(data_dir).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
    _pid_file(data_dir).unlink(missing_ok=True)
    return True


def status(data_dir: Path, port: int, host: str = settings.ClickHouseSettings.host) -> Status:
    """Whether the server for `data_dir` runs and answers; on the ports it was started with, if it runs."""
    data_dir = Path(data_dir).resolve()
    pid = _read_pid(data_dir)
    if pid is not None and (data_dir / "config.xml").exists():
        cfg = _read_config(data_dir)
        host, port = _client_host(cfg["host"]), int(cfg["http_port"])
    address = f"http://{_url_host(host)}:{port}"
    return Status(pid, pid is not None, pid is not None and ping(host, port), address)


def ping(host: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{_url_host(host)}:{port}/ping", timeout=timeout_s) as resp:
            return bool(resp.status == 200 and resp.read() == b"Ok.\n")
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(
    host: str, port: int, timeout_s: float, *, pid: int | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pid is not None and not _alive(pid):
            raise ClickHouseSetupError(f"ClickHouse exited during start-up.{_log_tail(log)}")
        if ping(host, port, timeout_s=1.0):
            return
        time.sleep(0.05)
    raise ClickHouseSetupError(
        f"ClickHouse on port {port} did not answer /ping within {timeout_s:.0f}s.{_log_tail(log)}"
    )


# -- the server process ------------------------------------------------------------------------------------


def serve(data_dir: Path) -> int:
    """The body of the server process: open the listeners, serve until SIGTERM/SIGINT, shut down."""
    # Blocked before the engine starts its threads (at import), so they inherit it and a stop signal
    # waits for sigtimedwait below instead of killing the process in whichever thread it lands.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    query = engine_query()  # imports chdb before the chdir below
    data_dir = data_dir.resolve()
    cfg = _read_config(data_dir)
    password = os.environ.pop(PASSWORD_ENV, "")
    os.chdir(data_dir)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            query(SERVE_SQL, "TabSeparated", path=str(_engine_dir(data_dir)))
        except Exception as exc:  # e.g. a port taken between the check and the listen
            failure.append(exc)

    serving = threading.Thread(target=run, name="clickhouse-serve", daemon=True)
    serving.start()
    while serving.is_alive():
        if signal.sigtimedwait(stop_signals, 0.5) is not None:
            break
    else:
        # The engine prints its own error (a taken port, a locked data directory) before this.
        print(f"ClickHouse stopped serving: {failure[0] if failure else 'see the error above'}", flush=True)
        return 1
    # The engine runs one query per session at a time, so the serving query is ended from outside,
    # through the server's own HTTP interface, as the configured user.
    _kill_serving_query(cfg, password)
    serving.join(STOP_TIMEOUT_S - 5)
    return 0 if not serving.is_alive() else 1


def _kill_serving_query(cfg: dict[str, str], password: str) -> None:
    request = urllib.request.Request(
        f"http://{_url_host(_client_host(cfg['host']))}:{cfg['http_port']}/",
        data=STOP_SQL.encode(),
        headers={"Authorization": "Basic " + base64.b64encode(f"{cfg['user']}:{password}".encode()).decode()},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
    except (OSError, urllib.error.URLError) as exc:
        print(f"Could not end the serving query ({exc}); exiting without it.", flush=True)


def _client_host(listen_host: str) -> str:
    """Where to reach a server listening on `listen_host` from this machine."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)


if __name__ == "__main__":  # `python -m cohere_gateway.localclickhouse DATA_DIR`: the server process
    sys.exit(serve(Path(sys.argv[1])))
