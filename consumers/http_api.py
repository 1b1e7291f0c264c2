"""The consumer's HTTP side: /readyz, /healthz, /metrics and /api/<query>. In embedded mode it is the only
way other processes can read (chdb lets one process open a data directory), so the consumer writes its
address to <data-dir>/clickhouse/consumer.json for `report` to find."""

from __future__ import annotations

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


class ReadApi:
    def __init__(self, backend: Backend, metrics: Metrics, host: str, port: int) -> None:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, ctype, body = api.handle(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
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
        return f"http://{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

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
