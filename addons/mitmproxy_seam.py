"""The places the gateway reaches into mitmproxy's internals, and the version they were checked on.

mitmproxy has no public hook for any of them:
- the error pages its HTTP/1 layer writes itself (upstream unreachable, malformed request line) are built
  by `mitmproxy.proxy.layers.http._http1.make_error_response`, looked up by name at call time;
- its listeners bind with `asyncio.start_server()` and offer no `reuse_port`, which `--workers N` needs;
- its HTTP/1 reader buffers a request head without limit (one unterminated 300 MiB header line grew the
  process by 600 MB): `_http1.Http1Server.read_headers` is wrapped to answer 431 and close once the
  buffered head (`Http1Connection.buf`) passes `max_header_bytes` without ending. HTTP/2 needs no such
  patch: h2's HPACK decoder bounds a header list itself.

All are checked against the running mitmproxy before use: a release that moves them makes the gateway
refuse to start with a message naming the tested version, instead of silently sending HTML errors or
failing to share a port. tests/test_mitmproxy_seam.py fails on such a release.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any

TESTED_MAJOR = 12
_HEAD_END = re.compile(rb"\n\r?\n")


class SeamMoved(RuntimeError):
    pass


def _version() -> str:
    from mitmproxy.version import VERSION

    return VERSION


def check() -> None:
    """Raise SeamMoved unless both internals are where this module expects them."""
    version = _version()
    if int(version.split(".")[0]) != TESTED_MAJOR:
        raise SeamMoved(f"cohere-gateway is tested with mitmproxy {TESTED_MAJOR}.x, found {version}")
    from mitmproxy.proxy import mode_servers
    from mitmproxy.proxy.layers.http import _http1

    fn = getattr(_http1, "make_error_response", None)
    if fn is None or list(inspect.signature(fn).parameters) != ["status_code", "message"]:
        raise SeamMoved(f"mitmproxy {version}: _http1.make_error_response(status_code, message) moved")
    if "asyncio.start_server(" not in inspect.getsource(mode_servers):
        raise SeamMoved(f"mitmproxy {version}: mode_servers no longer binds with asyncio.start_server")
    server = getattr(_http1, "Http1Server", None)
    read = getattr(server, "read_headers", None)
    if read is None or "buf" not in getattr(_http1.Http1Connection, "__annotations__", {}):
        raise SeamMoved(f"mitmproxy {version}: _http1.Http1Server.read_headers / Http1Connection.buf moved")
    if not getattr(read, "cohere_gateway_limit", False) and "self.buf.maybe_extract_lines()" not in (
        inspect.getsource(read)
    ):
        raise SeamMoved(f"mitmproxy {version}: Http1Server.read_headers no longer reads from self.buf")


def install_error_pages(make: Callable[[int, str], bytes]) -> None:
    """Make every error page mitmproxy's HTTP/1 layer writes in this process come from `make`."""
    check()
    from mitmproxy.proxy.layers.http import _http1

    _http1.make_error_response = make


def reuse_port() -> None:
    """Bind mitmproxy's listeners with SO_REUSEPORT (workers of one `--workers N` gateway share a port).
    Only worker processes call this, so a lone gateway still fails loudly on a busy port."""
    check()
    from mitmproxy.proxy import mode_servers

    original = mode_servers.asyncio.start_server

    @functools.wraps(original)
    async def start_server(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("reuse_port", True)
        return await original(*args, **kwargs)

    mode_servers.asyncio.start_server = start_server  # type: ignore[attr-defined]


def install_head_limit(limit: Callable[[], int], error_page: Callable[[int, str], bytes]) -> None:
    """Refuse (431, then close) a request head that grows past `limit()` bytes without ending; what was
    buffered is dropped with it. Installed once per process."""
    check()
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1

    original = _http1.Http1Server.read_headers
    if getattr(original, "cohere_gateway_limit", False):
        return

    def read_headers(self: Any, event: Any) -> Any:
        if isinstance(event, events.DataReceived):
            n = limit()
            if len(self.buf) > n and not _HEAD_END.search(bytes(self.buf)[: n + 2]):
                self.buf = type(self.buf)()
                self.state = self.done
                message = f"the request head is larger than the gateway's {n} bytes"
                yield commands.SendData(self.conn, error_page(431, message))
                yield commands.CloseConnection(self.conn)
                return
        yield from original(self, event)

    read_headers.cohere_gateway_limit = True  # type: ignore[attr-defined]
    _http1.Http1Server.read_headers = read_headers  # type: ignore[method-assign]
