"""The places the gateway reaches into mitmproxy's internals, and the version they were checked on.

mitmproxy has no public hook for any of them:
- the error pages its HTTP/1 layer writes itself (upstream unreachable, malformed request line) are built
  by `mitmproxy.proxy.layers.http._http1.make_error_response`, looked up by name at call time, and its
  HTTP/2 layer's error bodies by `_http2.format_error` (its content-type header stays text/html);
- its listeners bind with `asyncio.start_server()` and offer no `reuse_port`, which `--workers N` needs,
  nor a backlog;
- its HTTP/1 reader buffers a request head without limit (one unterminated 300 MiB header line grew the
  process by 600 MB): `_http1.Http1Server.read_headers` is wrapped to answer 431 and close once the
  buffered head (`Http1Connection.buf`) passes `max_header_bytes` without ending, and 408 once it has
  taken longer than `header_timeout_s`. HTTP/2 needs no such patch: h2's HPACK decoder bounds a header
  list itself;
- a plain hook that returns an awaitable is awaited (`AddonManager.invoke_addon`), which the gateway's
  fail-closed hook wrapper relies on;
- every hook of every flow (eight a request: four hooks, each followed by `update`) is dispatched by
  `AddonManager.trigger_event`, which walks the whole chain, looks each hook up by name on each addon and
  enters a context manager and a coroutine per addon, whether it has the hook or not: about 100 µs of
  the gateway's ~1,000 µs CPU per request on the bench host, for a chain where two addons have any flow
  hook. `install_hook_table` looks each hook's functions up once per chain instead
  (`AddonManager._iter_hooks`, `safecall`);
- every Request and Response it builds type-checks each of its fields (`MessageData.__post_init__`
  calling `utils.typecheck.check_option_type`), and that check formats a TypeError message on every call
  and raises and catches two TypeErrors for each optional field that is None (a response head has three):
  ~6 exceptions a request whose tracebacks form reference cycles, left to the garbage collector.
  `install_fast_typecheck` accepts a value whose exact type is one the annotation names before calling
  the original, which decides everything else, so what is accepted and refused is unchanged;
- three accessors its proxy core calls dozens of times a request do needless work, each outcome the same
  without it (`install_fast_accessors`): an option read (`_Option.current`, ~20 a request) deep-copies
  its value twice, a str or bool included; a hook's `args()` (~12) asks `dataclasses.fields` anew; a
  header lookup (`Headers.get_all`, ~27, 14 of them `expected_http_body_size`) calls `_kconv` in Python
  for every field of the message, and through `get` or `in` raises and catches a KeyError when absent.

All are checked against the running mitmproxy before use: a release that moves them makes the gateway
refuse to start with a message naming the tested version, instead of silently sending HTML errors or
failing to share a port. tests/test_mitmproxy_seam.py fails on such a release.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import time
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
    """Raise SeamMoved unless every internal this module relies on is where it expects it."""
    version = _version()
    if int(version.split(".")[0]) != TESTED_MAJOR:
        raise SeamMoved(f"cohere-gateway is tested with mitmproxy {TESTED_MAJOR}.x, found {version}")
    from mitmproxy.proxy import mode_servers
    from mitmproxy.proxy.layers.http import _http1

    fn = getattr(_http1, "make_error_response", None)
    if fn is None or list(inspect.signature(fn).parameters) != ["status_code", "message"]:
        raise SeamMoved(f"mitmproxy {version}: _http1.make_error_response(status_code, message) moved")
    from mitmproxy.proxy.layers.http import _http2

    body = getattr(_http2, "format_error", None)
    if body is None or list(inspect.signature(body).parameters) != ["status_code", "message"]:
        raise SeamMoved(f"mitmproxy {version}: _http2.format_error(status_code, message) moved")
    from mitmproxy import addonmanager

    # The gateway's hooks are plain functions wrapped by a fail-closed guard; one that has to wait
    # returns an awaitable, which mitmproxy awaits ("Support both async and sync hook functions").
    if "inspect.isawaitable(res)" not in inspect.getsource(addonmanager.AddonManager.invoke_addon):
        raise SeamMoved(f"mitmproxy {version}: invoke_addon no longer awaits what a hook returns")
    lifecycle = inspect.getsource(addonmanager.AddonManager.handle_lifecycle)
    if not (
        callable(getattr(addonmanager.AddonManager, "_iter_hooks", None))
        and callable(getattr(addonmanager, "safecall", None))
        and "self.trigger_event(" in lifecycle
        and "hooks.UpdateHook(" in lifecycle
        and "for i in self.chain:" in inspect.getsource(addonmanager.AddonManager.trigger_event)
    ):
        raise SeamMoved(
            f"mitmproxy {version}: AddonManager.trigger_event/handle_lifecycle/_iter_hooks or safecall moved"
        )
    from mitmproxy import http
    from mitmproxy.utils import typecheck

    original = getattr(typecheck.check_option_type, "cohere_gateway_original", typecheck.check_option_type)
    if list(inspect.signature(original).parameters) != ["name", "value", "typeinfo"] or (
        "typecheck.check_option_type(field.name, val, field.type)" not in inspect.getsource(http.MessageData)
    ):
        raise SeamMoved(
            f"mitmproxy {version}: MessageData no longer checks fields with typecheck.check_option_type"
        )
    import collections.abc
    import dataclasses

    from mitmproxy import hooks, optmanager
    from mitmproxy.coretypes import multidict

    getsource = inspect.getsource
    current = _original(optmanager._Option, "current")
    get_all = _original(http.Headers, "get_all")
    # Every helper whose outcome install_fast_accessors reproduces, not only the accessors.
    if not (
        "if self.value is unset:" in getsource(current)
        and "return copy.deepcopy(v)" in getsource(current)
        and "return copy.deepcopy(self._default)" in getsource(optmanager._Option.default.fget)
        and {"_default", "value"} <= set(optmanager._Option.__slots__)
        and "for field in fields(self)" in getsource(_original(hooks.Hook, "args"))
        and hooks.fields is dataclasses.fields
        and "[_native(x) for x in super().get_all(name)]" in getsource(get_all)
        and "name = _always_bytes(name)" in getsource(get_all)
        and 'x.decode("utf-8", "surrogateescape")' in getsource(http._native)
        and '"utf-8", "surrogateescape"' in getsource(http._always_bytes)
        and "if self._kconv(k) == key]" in getsource(multidict.MultiDict.get_all)
        and "return key.lower()" in getsource(http.Headers._kconv)
        and _original(http.Headers, "get") is collections.abc.Mapping.get
        and _original(http.Headers, "__contains__") is collections.abc.Mapping.__contains__
        and "values = self.get_all(key)" in getsource(multidict._MultiDict.__getitem__)
        and 'return ", ".join(values)' in getsource(http.Headers._reduce_values)
    ):
        raise SeamMoved(
            f"mitmproxy {version}: _Option.current, Hook.args or Headers.get_all/get/__contains__ moved"
        )
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


def install_error_pages(
    make: Callable[[int, str], bytes], make_body: Callable[[int, str], bytes] | None = None
) -> None:
    """Make every error page mitmproxy's HTTP/1 layer writes in this process come from `make`, and the
    body of every HTTP/2 one from `make_body`."""
    check()
    from mitmproxy.proxy.layers.http import _http1, _http2

    _http1.make_error_response = make
    if make_body is not None:
        _http2.format_error = make_body


def listen(backlog: int, reuse_port: bool) -> None:
    """Bind mitmproxy's listeners with `backlog` (asyncio's default, 100, resets clients that arrive in a
    burst while the event loop is busy) and, for the workers of one `--workers N` gateway, SO_REUSEPORT
    so they share a port. Only worker processes ask for reuse_port, so a lone gateway still fails loudly
    on a busy port."""
    check()
    from mitmproxy.proxy import mode_servers

    original = mode_servers.asyncio.start_server

    @functools.wraps(original)
    async def start_server(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backlog", backlog)
        if reuse_port:
            kwargs.setdefault("reuse_port", True)
        return await original(*args, **kwargs)

    mode_servers.asyncio.start_server = start_server  # type: ignore[attr-defined]


def install_head_limit(
    limit: Callable[[], int],
    error_page: Callable[[int, str], bytes],
    deadline_s: Callable[[], float] = lambda: math.inf,
) -> None:
    """Refuse (431, then close) a request head that grows past `limit()` bytes without ending, and (408)
    one still not complete `deadline_s()` after its first byte: a client trickling a byte at a time
    (slowloris) keeps the idle timeout from firing, not this. What was buffered is dropped with it.
    Installed once per process."""
    check()
    from mitmproxy.proxy import commands, events
    from mitmproxy.proxy.layers.http import _http1

    original = _http1.Http1Server.read_headers
    if getattr(original, "cohere_gateway_limit", False):
        return

    def refuse(self: Any, status: int, message: str) -> Any:
        self.buf = type(self.buf)()
        self.state = self.done
        yield commands.SendData(self.conn, error_page(status, message))
        yield commands.CloseConnection(self.conn)

    def read_headers(self: Any, event: Any) -> Any:
        if isinstance(event, events.DataReceived):
            n = limit()
            now = time.monotonic()
            if len(self.buf) == len(event.data):  # this event starts a request head
                self.cohere_gateway_head_started = now
            if len(self.buf) > n and not _HEAD_END.search(bytes(self.buf)[: n + 2]):
                yield from refuse(self, 431, f"the request head is larger than the gateway's {n} bytes")
                return
            started = getattr(self, "cohere_gateway_head_started", now)
            if now - started > deadline_s() and not _HEAD_END.search(bytes(self.buf)):
                yield from refuse(
                    self, 408, f"the request head took longer than {deadline_s():g} s to arrive"
                )
                return
        yield from original(self, event)

    read_headers.cohere_gateway_limit = True  # type: ignore[attr-defined]
    _http1.Http1Server.read_headers = read_headers  # type: ignore[method-assign]


def install_hook_table(manager: Any) -> None:
    """Dispatch `manager`'s hooks (a mitmproxy AddonManager) from a table of each hook's functions, built
    on first use and again whenever the chain changes (an addon added or removed), instead of searching
    the whole chain on every event. What runs is what `trigger_event` would run, in the same order, each
    addon's functions under the same `safecall` (an exception is logged, skips the rest of that addon's
    functions and the next addon still runs; `AddonHalt` stops the event), an awaitable result awaited.
    An `update` event no addon handles is not raised at all.

    The table holds an addon's hook functions as they were when it was added: only for chains whose
    addons do not grow or drop hook methods, or child addons, later (`cohere-gateway proxy`'s lean
    chain; not mitmdump's, whose script loader swaps addons in place)."""
    check()
    from mitmproxy import addonmanager, exceptions, flow, hooks

    # Per hook: each addon's functions (its own and its children's), one safecall around each addon's
    # group as in `trigger_event`: an error skips the rest of that addon's group, not the next addon's.
    table: dict[str, list[list[Callable[..., Any]]]] = {}
    built_for: list[Any] = [None, -1]  # the chain list the table was built for, and its length

    def functions(event: Any) -> list[list[Callable[..., Any]]]:
        chain = manager.chain
        if built_for[0] is not chain or built_for[1] != len(chain):
            table.clear()
            built_for[:] = [chain, len(chain)]
        found = table.get(event.name)
        if found is None:
            found = table[event.name] = [
                group for addon in chain if (group := [func for _, func in manager._iter_hooks(addon, event)])
            ]
        return found

    async def trigger_event(event: Any) -> None:
        groups = functions(event)
        if not groups:
            return
        args = event.args()
        for group in groups:
            try:
                with addonmanager.safecall():
                    for func in group:
                        result = func(*args)
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return

    async def handle_lifecycle(event: Any) -> None:
        await trigger_event(event)
        message = event.args()[0]
        if isinstance(message, flow.Flow):
            update = hooks.UpdateHook([message])
            if functions(update):
                await trigger_event(update)

    manager.trigger_event = trigger_event
    manager.handle_lifecycle = handle_lifecycle


def _exact_types(typeinfo: Any) -> frozenset[type]:
    """The classes a value may be an instance of, exactly, to pass `check_option_type(..., typeinfo)`
    for certain: `typeinfo` itself if it is a plain class, the plain classes of a union (None's type
    included). Empty for anything else (generics, Any, IO), which the original decides."""
    import types
    import typing

    if typing.get_origin(typeinfo) in (typing.Union, types.UnionType):
        members = typing.get_args(typeinfo)
    else:
        members = (typeinfo,)
    return frozenset(t for t in members if isinstance(t, type) and typing.get_origin(t) is None)


def install_fast_typecheck() -> None:
    """Make mitmproxy's field type check accept a value whose exact type the annotation names without
    building an exception; everything else goes to the original, so the outcome (accepted, or the same
    TypeError) is the same. Installed once per process."""
    check()
    from mitmproxy.utils import typecheck

    original = typecheck.check_option_type
    if getattr(original, "cohere_gateway_original", None) is not None:
        return
    accepted: dict[Any, frozenset[type]] = {}

    def check_option_type(name: str, value: Any, typeinfo: Any) -> None:
        try:
            exact = accepted[typeinfo]
        except KeyError:
            exact = accepted[typeinfo] = _exact_types(typeinfo)
        except TypeError:  # an unhashable annotation: not cached
            exact = frozenset()
        if type(value) in exact:
            return
        original(name, value, typeinfo)

    check_option_type.cohere_gateway_original = original  # type: ignore[attr-defined]
    typecheck.check_option_type = check_option_type


# Values `copy.deepcopy` returns as they are: an option holding one is returned without the call.
_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes})
# Where a hook class keeps the names of its dataclass fields, with the fields mapping they were read from.
_ARG_NAMES = "_cohere_gateway_arg_names"


def _original(owner: type, attr: str) -> Any:
    found = getattr(owner, attr)
    return getattr(found, "cohere_gateway_original", found)


def install_fast_accessors() -> None:
    """Make mitmproxy's option reads, hook arguments and header lookups skip work whose result they do
    not change (the module docstring lists each). Each is installed once per process."""
    check()
    import copy
    import dataclasses

    from mitmproxy import hooks, http, optmanager

    unset = optmanager.unset

    def current(self: Any) -> Any:
        value = self._default if self.value is unset else self.value
        return value if type(value) in _ATOMIC else copy.deepcopy(value)

    original_args = _original(hooks.Hook, "args")

    def args(self: Any) -> list[Any]:
        cls = type(self)
        fields = getattr(cls, "__dataclass_fields__", None)
        if fields is None:
            return original_args(self)  # its error
        cached = cls.__dict__.get(_ARG_NAMES)
        if cached is None or cached[0] is not fields:  # first call, or the class was redefined
            cached = (fields, tuple(field.name for field in dataclasses.fields(self)))
            setattr(cls, _ARG_NAMES, cached)
        return [getattr(self, name) for name in cached[1]]

    original_get_all = _original(http.Headers, "get_all")
    headers = http.Headers

    def get_all(self: Any, name: str | bytes) -> list[str]:
        if type(self) is not headers:  # a subclass may convert keys its own way
            return original_get_all(self, name)
        if type(name) is str:
            name = name.encode("utf-8", "surrogateescape")
        elif type(name) is not bytes:
            return original_get_all(self, name)  # its error, for anything else
        key = name.lower()
        return [value.decode("utf-8", "surrogateescape") for k, value in self.fields if k.lower() == key]

    # Mapping's get and `in` go through __getitem__, which raises and catches a KeyError for every header
    # that is absent (most of `expected_http_body_size`'s lookups).
    mapping_get = _original(http.Headers, "get")
    mapping_contains = _original(http.Headers, "__contains__")

    def get(self: Any, key: str | bytes, default: Any = None) -> Any:
        if type(self) is not headers:
            return mapping_get(self, key, default)
        values = get_all(self, key)
        return ", ".join(values) if values else default

    def contains(self: Any, key: object) -> bool:
        if type(self) is not headers:
            return mapping_contains(self, key)
        return bool(get_all(self, key))  # type: ignore[arg-type]

    for owner, attr, fast in (
        (optmanager._Option, "current", current),
        (hooks.Hook, "args", args),
        (http.Headers, "get_all", get_all),
        (http.Headers, "get", get),
        (http.Headers, "__contains__", contains),
    ):
        if getattr(getattr(owner, attr), "cohere_gateway_original", None) is not None:
            continue
        original = getattr(owner, attr)
        fast.__doc__ = original.__doc__
        fast.cohere_gateway_original = original  # type: ignore[attr-defined]
        setattr(owner, attr, fast)
