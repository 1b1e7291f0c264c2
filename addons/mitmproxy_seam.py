"""The two places the gateway reaches into mitmproxy's internals, and the version they were checked on.

mitmproxy has no public hook for either:
- the error pages its HTTP/1 layer writes itself (upstream unreachable, malformed request line) are built
  by `mitmproxy.proxy.layers.http._http1.make_error_response`, looked up by name at call time;
- its listeners bind with `asyncio.start_server()` and offer no `reuse_port`, which `--workers N` needs.

Both are checked against the running mitmproxy before use: a release that moves them makes the gateway
refuse to start with a message naming the tested version, instead of silently sending HTML errors or
failing to share a port. tests/test_mitmproxy_seam.py fails on such a release.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

TESTED_MAJOR = 12


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
