"""The consumer's HTTP side: /readyz, /healthz, /metrics and /api/<query>. In embedded mode it is the only
way other processes can read (chdb lets one process open a data directory), so the consumer writes its
address to <data-dir>/clickhouse/consumer.json for `report` to find."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import itertools
import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from cohere_gateway import gateway_file
from cohere_gateway.consumers import logs, queries
from cohere_gateway.consumers.backends import Backend, BackendUnavailable
from cohere_gateway.consumers.metrics import Metrics

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


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A reader that went away before its answer (a dashboard refreshing again, a closed tab) is not
        # an error of the API; anything else is printed as the standard library does.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


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
        gateway_config: Path | None = None,
    ) -> None:
        check_exposure(host, token)
        api = self
        self.token = token
        self.gateway_config = gateway_config  # the gateway's --config file: its budgets' use
        self.allowed_hosts = allowed_hosts

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                refused = api.refuse(self.path, self.headers.get("Host"), self.headers.get("Authorization"))
                if refused is None and urlsplit(self.path).path.rstrip("/") == "/api/logs/export":
                    try:
                        ctype, chunks = logs.export(api.backend, dict(parse_qsl(urlsplit(self.path).query)))
                        first = next(chunks, b"")  # errors of the first page still get a status
                    except queries.QueryError as exc:
                        self._send(400, "application/json", orjson.dumps({"error": str(exc)}))
                        return
                    except BackendUnavailable as exc:
                        self._send(503, "application/json", orjson.dumps({"error": str(exc)}))
                        return
                    suffix = "csv" if ctype.startswith("text/csv") else "ndjson"
                    self._stream(ctype, itertools.chain([first], chunks), f"events.{suffix}")
                    return
                self._send(*(refused or api.handle(self.path)))

            def do_PATCH(self) -> None:
                self._write()

            def do_DELETE(self) -> None:
                self._write()

            def _write(self) -> None:
                """The logs API's writes: they need the token, always (a read-only deployment without one
                cannot be changed through it)."""
                refused = api.refuse(self.path, self.headers.get("Host"), self.headers.get("Authorization"))
                if refused is None and not api.token:
                    refused = (
                        403,
                        "application/json",
                        orjson.dumps({"error": "writes need the API token: start with --api-token"}),
                    )
                if refused is None:
                    refused = api.handle_write(self.command, self.path, self.headers, self.rfile)
                self._send(*refused)

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                if status == 401:
                    self.send_header("WWW-Authenticate", REALM)
                self.end_headers()
                self.wfile.write(body)

            def _stream(self, ctype: str, chunks: Any, filename: str) -> None:
                # No Content-Length: the body ends when the connection closes (HTTP/1.0 framing).
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Disposition", f'attachment; filename="{filename}"')
                self.end_headers()
                try:
                    for chunk in chunks:
                        self.wfile.write(chunk)
                except (BackendUnavailable, OSError) as exc:
                    log.warning("export cut short: %s", exc)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("read api: " + format, *args)

        self.backend = backend
        self.metrics = metrics
        self.server = _Server((host, port), Handler)
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

    def _answer(self, fn: Any) -> tuple[int, str, bytes]:
        try:
            result = fn()
        except queries.QueryError as exc:
            return 400, "application/json", orjson.dumps({"error": str(exc)})
        except queries.NotFound as exc:
            return 404, "application/json", orjson.dumps({"error": str(exc)})
        except BackendUnavailable as exc:
            return 503, "application/json", orjson.dumps({"error": str(exc)})
        return 200, "application/json", orjson.dumps(result)

    def budgets(self, account_id: str, gateway_id: str) -> dict[str, Any]:
        """The file is read on every call (a small file): the budgets shown are those in force now,
        whatever was edited since the start, as the gateway reloads it."""
        if self.gateway_config is None:
            return {"source": None, "budgets": []}
        try:
            budget_file = gateway_file.read_budgets(self.gateway_config)
        except gateway_file.FileError as exc:
            raise BackendUnavailable(str(exc)) from None
        rows = queries.budgets(self.backend, budget_file, account_id=account_id, gateway_id=gateway_id)
        return {"source": str(self.gateway_config), "budgets": rows}

    def handle_write(self, method: str, target: str, headers: Any, body: Any) -> tuple[int, str, bytes]:
        """PATCH /api/logs/<id> (feedback), DELETE /api/logs?<filter> (erase; dry_run=true counts)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/")
        if method == "DELETE" and path == "/api/logs":
            args = dict(parse_qsl(parts.query))
            return self._answer(lambda: logs.delete(self.backend, args))
        if method == "PATCH" and path.startswith("/api/logs/"):
            ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, "application/json", orjson.dumps({"error": "send the body as application/json"})
            try:
                length = int(headers.get("Content-Length") or "")
            except ValueError:
                return 411, "application/json", orjson.dumps({"error": "a Content-Length is needed"})
            if not 0 < length <= MAX_WRITE_BODY:
                return (
                    413,
                    "application/json",
                    orjson.dumps({"error": f"the body is 1..{MAX_WRITE_BODY} bytes"}),
                )
            data = body.read(length)
            return self._answer(lambda: logs.patch(self.backend, _event_id(path), data))
        return (
            405,
            "application/json",
            orjson.dumps({"error": "writes: PATCH /api/logs/<event_id>, DELETE /api/logs?<filter>"}),
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
        if path == "/api/logs" or path.startswith("/api/logs/"):
            args = dict(parse_qsl(parts.query))
            return self._answer(
                lambda: (
                    logs.list_events(self.backend, args)
                    if path == "/api/logs"
                    else logs.get_event(self.backend, _event_id(path))
                )
            )
        if path == "/api/budgets":
            args = dict(parse_qsl(parts.query))
            return self._answer(lambda: self.budgets(args.get("account_id", ""), args.get("gateway_id", "")))
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


MAX_WRITE_BODY = 64 * 1024


def _event_id(path: str) -> str:
    event_id = path[len("/api/logs/") :]
    if not event_id or "/" in event_id or len(event_id) > 200:
        raise queries.QueryError("name one event: /api/logs/<event_id>")
    return event_id


_DASHBOARD = resources.files("cohere_gateway.consumers.dashboard")
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
