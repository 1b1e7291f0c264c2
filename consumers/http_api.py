"""The consumer's HTTP side: /readyz, /healthz, /metrics and /api/<query>. In embedded mode it is the only
way other processes can read (chdb lets one process open a data directory), so the consumer writes its
address to <data-dir>/clickhouse/consumer.json for `report` to find."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from consumers import queries
from consumers.backends import Backend, BackendUnavailable
from consumers.metrics import Metrics

log = logging.getLogger(__name__)

DISCOVERY_FILE = "consumer.json"


# Answered without the token: orchestrators' liveness and readiness checks.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
REALM = 'Basic realm="cohere-gateway", charset="UTF-8"'


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_host_set(allowed: str, http_host: str) -> frozenset[str] | None:
    """The Host header names answered; None: any."""
    names = {h.strip().lower() for h in allowed.split(",") if h.strip()}
    if "*" in names:
        return None
    if not names:
        names = {"localhost", "127.0.0.1", "[::1]", "::1"}
        if http_host and http_host not in ("0.0.0.0", "::"):
            names.add(http_host.lower())
    return frozenset(names)


def check_exposure(http_host: str, token: str) -> None:
    """The read side serves every account's usage (and bodies, with payload logging): beyond loopback
    it needs a token; put a reverse proxy with its own authentication in front if you prefer one."""
    if not token and not is_loopback(http_host):
        raise ValueError(
            f"the read API would listen on {http_host} without authentication: set --api-token "
            "(COHERE_GATEWAY_API_TOKEN), or bind --http-host 127.0.0.1 behind an authenticating reverse proxy"
        )


class ReadApi:
    def __init__(
        self,
        backend: Backend,
        metrics: Metrics,
        host: str,
        port: int,
        *,
        token: str = "",
        allowed_hosts: frozenset[str] | None = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"}),
    ) -> None:
        check_exposure(host, token)
        api = self
        self.token = token
        self.allowed_hosts = allowed_hosts

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                refused = api.refuse(self.path, self.headers.get("Host"), self.headers.get("Authorization"))
                status, ctype, body = refused or api.handle(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", REALM)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("read api: " + format, *args)

        self.backend = backend
        self.metrics = metrics
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="read-api", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        if host in ("0.0.0.0", "::"):  # every interface: local readers (report) use loopback
            host = "127.0.0.1"
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def refuse(
        self, target: str, host: str | None, authorization: str | None
    ) -> tuple[int, str, bytes] | None:
        """A 421 for a Host not on the allow-list, a 401 without the token; None: go ahead."""
        name = (host or "").strip().lower()
        if name.startswith("["):
            name = name.partition("]")[0] + "]"
        else:
            name = name.rpartition(":")[0] if name.count(":") == 1 else name
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return (
                421,
                "application/json",
                orjson.dumps(
                    {"error": f"Host {name[:100]!r} is not one this API answers; see --allowed-hosts"}
                ),
            )
        if not self.token or urlsplit(target).path.rstrip("/") in OPEN_PATHS:
            return None
        scheme, _, value = (authorization or "").strip().partition(" ")
        presented = value.strip()
        if scheme.lower() == "basic":
            try:
                presented = base64.b64decode(presented, validate=True).decode("latin-1").partition(":")[2]
            except ValueError:
                presented = ""
        elif scheme.lower() != "bearer":
            presented = ""
        if hmac.compare_digest(presented.encode("latin-1", "replace"), self.token.encode()):
            return None
        return (
            401,
            "application/json",
            orjson.dumps(
                {"error": "this API needs the token: HTTP Basic (any user, the token as password) or Bearer"}
            ),
        )

    def handle(self, target: str) -> tuple[int, str, bytes]:
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            body = {
                "ready": self.metrics.ready,
                "storage": self.metrics.storage_ready,
                "kafka": self.metrics.kafka_ready,
                "paused": self.metrics.paused,
                "last_error": self.metrics.last_error,
                "partitions": self.metrics.partitions,
            }
            return (200 if self.metrics.ready else 503), "application/json", orjson.dumps(body)
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", self.metrics.render().encode()
        if path in ("", "/index.html") or path.startswith("/static/"):
            return dashboard_file(path)
        if path.startswith("/api/"):
            try:
                result = queries.run(self.backend, path[len("/api/") :], dict(parse_qsl(parts.query)))
            except queries.QueryError as exc:
                return 400, "application/json", orjson.dumps({"error": str(exc)})
            except queries.NotFound as exc:
                return 404, "application/json", orjson.dumps({"error": str(exc)})
            except BackendUnavailable as exc:
                return 503, "application/json", orjson.dumps({"error": str(exc)})
            return 200, "application/json", orjson.dumps(result)
        return (
            404,
            "application/json",
            orjson.dumps(
                {"error": f"no such path {path!r}: try /, /readyz, /metrics, /api/summary?since=1h&by=model"}
            ),
        )


_DASHBOARD = resources.files("consumers.dashboard")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}


def dashboard_file(path: str) -> tuple[int, str, bytes]:
    """The built-in dashboard's files, shipped in the package (no CDN: it works offline)."""
    name = "index.html" if path in ("", "/index.html") else path[len("/static/") :]
    suffix = Path(name).suffix
    # Only plain file names of known kinds: nothing outside the dashboard folder can be named.
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in _CONTENT_TYPES:
        return 404, "application/json", orjson.dumps({"error": f"no dashboard file {name!r}"})
    try:
        return 200, _CONTENT_TYPES[suffix], _DASHBOARD.joinpath(name).read_bytes()
    except FileNotFoundError:
        return 404, "application/json", orjson.dumps({"error": f"no dashboard file {name!r}"})


def write_discovery(directory: Path, url: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / DISCOVERY_FILE
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(target)
    return target


def read_discovery(directory: Path) -> dict[str, Any] | None:
    """The running consumer's address, if its file is there and its process alive."""
    try:
        info = json.loads((directory / DISCOVERY_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def remove_discovery(directory: Path) -> None:
    target = directory / DISCOVERY_FILE
    try:
        if json.loads(target.read_text()).get("pid") == os.getpid():
            target.unlink()
    except (OSError, ValueError):
        pass
