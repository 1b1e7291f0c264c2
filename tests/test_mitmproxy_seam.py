"""The mitmproxy internals the gateway relies on (addons/mitmproxy_seam.py) are where it expects them.

A mitmproxy release that moves one fails here by name, before the gateway would silently send HTML error
pages or let `--workers N` fail to share a port."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from cohere_gateway.addons import mitmproxy_seam


def test_the_installed_mitmproxy_has_both_internals() -> None:
    mitmproxy_seam.check()


def test_a_moved_internal_is_refused_with_the_tested_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.proxy.layers.http import _http1

    monkeypatch.delattr(_http1, "make_error_response")
    with pytest.raises(mitmproxy_seam.SeamMoved, match="make_error_response"):
        mitmproxy_seam.check()


def test_another_major_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mitmproxy_seam, "_version", lambda: "13.0.0")
    with pytest.raises(mitmproxy_seam.SeamMoved, match=r"tested with mitmproxy 12\.x, found 13\.0\.0"):
        mitmproxy_seam.check()


def test_error_pages_come_from_the_installed_function(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.proxy.layers.http import _http1

    monkeypatch.setattr(_http1, "make_error_response", _http1.make_error_response)
    mitmproxy_seam.install_error_pages(lambda status, message: f"{status}:{message}".encode())
    assert _http1.make_error_response(502, "down") == b"502:down"


def test_listeners_share_a_port_in_workers_and_queue_the_configured_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mitmproxy.proxy import mode_servers

    monkeypatch.setattr(mode_servers.asyncio, "start_server", asyncio.start_server)
    mitmproxy_seam.listen(777, reuse_port=True)

    async def two_listeners() -> None:
        async def ignore(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        first = await mode_servers.asyncio.start_server(ignore, "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        second = await mode_servers.asyncio.start_server(ignore, "127.0.0.1", port)
        assert second.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
        # A listening socket's Send-Q in `ss` is its backlog (asyncio's own default is 100).
        listed = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[2] for line in listed.splitlines()] == ["777", "777"], listed
        first.close()
        second.close()

    asyncio.run(two_listeners())


def test_a_lone_gateway_does_not_share_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.proxy import mode_servers

    monkeypatch.setattr(mode_servers.asyncio, "start_server", asyncio.start_server)
    mitmproxy_seam.listen(100, reuse_port=False)

    async def taken() -> None:
        first = await mode_servers.asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        try:
            with pytest.raises(OSError):
                await mode_servers.asyncio.start_server(
                    lambda r, w: None, "127.0.0.1", first.sockets[0].getsockname()[1]
                )
        finally:
            first.close()

    asyncio.run(taken())


def test_a_moved_request_head_reader_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.proxy.layers.http import _http1

    monkeypatch.delattr(_http1.Http1Server, "read_headers")
    with pytest.raises(mitmproxy_seam.SeamMoved, match="read_headers"):
        mitmproxy_seam.check()


def test_a_mitmproxy_that_no_longer_awaits_hook_results_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import addonmanager

    async def invoke_addon(self: object, addon: object, event: object) -> None:  # awaits nothing
        return None

    monkeypatch.setattr(addonmanager.AddonManager, "invoke_addon", invoke_addon)
    with pytest.raises(mitmproxy_seam.SeamMoved, match="invoke_addon"):
        mitmproxy_seam.check()


def test_a_moved_hook_dispatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import addonmanager

    monkeypatch.delattr(addonmanager.AddonManager, "_iter_hooks")
    with pytest.raises(mitmproxy_seam.SeamMoved, match="trigger_event"):
        mitmproxy_seam.check()


def test_the_hook_table_runs_what_the_chain_would() -> None:
    """Order, awaited results, an addon's error logged without stopping the next, `AddonHalt`, `update`,
    and an addon added after the first event: all as mitmproxy's own dispatch does them."""
    from mitmproxy import exceptions, hooks, master, options
    from mitmproxy.proxy.layers.http import HttpRequestHook, HttpResponseHook
    from mitmproxy.test import tflow

    seen: list[str] = []

    class Plain:
        def request(self, flow: object) -> None:
            seen.append("plain")

    class Waits:
        async def _later(self) -> None:
            await asyncio.sleep(0)
            seen.append("waited")

        def request(self, flow: object) -> object:
            return self._later()

    class Fails:
        def request(self, flow: object) -> None:
            seen.append("fails")
            raise ValueError("a bug")

        def response(self, flow: object) -> None:
            seen.append("halts")
            raise exceptions.AddonHalt

    class Updates:
        name = "updates"

        def request(self, flow: object) -> None:
            seen.append("last")

        def response(self, flow: object) -> None:
            seen.append("never: halted before")

        def update(self, flows: list[object]) -> None:
            seen.append(f"update {len(flows)}")

    async def run() -> None:
        m = master.Master(options.Options())
        m.addons.add(Plain(), Waits(), Fails())
        mitmproxy_seam.install_hook_table(m.addons)
        flow = tflow.tflow(resp=True)
        await m.addons.handle_lifecycle(HttpRequestHook(flow))
        assert seen == ["plain", "waited", "fails"]  # no update: no addon has that hook yet
        seen.clear()
        m.addons.add(Updates())
        await m.addons.handle_lifecycle(HttpRequestHook(flow))
        assert seen == ["plain", "waited", "fails", "last", "update 1"]
        seen.clear()
        await m.addons.handle_lifecycle(HttpResponseHook(flow))
        assert seen == ["halts", "update 1"]
        seen.clear()
        m.addons.remove(m.addons.get("updates"))
        await m.addons.trigger_event(hooks.UpdateHook([flow]))
        assert seen == []

    asyncio.run(run())


def test_a_moved_field_type_check_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy.utils import typecheck

    monkeypatch.setattr(typecheck, "check_option_type", lambda name, value: None)
    with pytest.raises(mitmproxy_seam.SeamMoved, match="check_option_type"):
        mitmproxy_seam.check()


def _outcome(check: object, value: object, typeinfo: object) -> str | None:
    try:
        check("f", value, typeinfo)  # type: ignore[operator]
    except TypeError as exc:
        return str(exc)
    return None


def test_the_fast_field_type_check_accepts_and_refuses_what_mitmproxys_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import typing
    from collections.abc import Sequence

    from mitmproxy import http
    from mitmproxy.utils import typecheck

    installed = typecheck.check_option_type
    original = getattr(installed, "cohere_gateway_original", installed)
    monkeypatch.setattr(typecheck, "check_option_type", original)  # restored after the test
    mitmproxy_seam.install_fast_typecheck()
    fast = typecheck.check_option_type
    assert fast is not original
    # typing.Optional and typing.Union as well as `|`: mitmproxy's annotations use both.
    types: list[object] = [bytes, bytes | None, float | None, int, float, bool, str | None, typing.Any,
                           typing.Optional[int], tuple[int, str], Sequence[str], http.Headers | None,  # noqa: UP045
                           list[str], typing.Union[int, str]]  # noqa: UP007  # fmt: skip
    values: list[object] = [None, b"x", 1, 1.5, True, "s", (1, "a"), ["a"], [1], http.Headers(), object()]
    for t in types:
        for v in values:
            assert _outcome(fast, v, t) == _outcome(original, v, t), (v, t)


def test_a_response_head_with_none_fields_reaches_no_exception_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import http
    from mitmproxy.utils import typecheck

    installed = typecheck.check_option_type
    original = getattr(installed, "cohere_gateway_original", installed)
    delegated: list[tuple[str, object]] = []

    def counting(name: str, value: object, typeinfo: object) -> None:
        delegated.append((name, value))
        original(name, value, typeinfo)

    monkeypatch.setattr(typecheck, "check_option_type", counting)
    mitmproxy_seam.install_fast_typecheck()
    resp = http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), None, None, 1.0, None)
    assert resp.content is None
    # content, trailers and timestamp_end are None: the original would raise and catch two TypeErrors
    # for each; none of them reaches it.
    assert [name for name, value in delegated if value is None] == []


def test_the_hook_table_skips_the_rest_of_a_failing_addons_children_as_mitmproxy_does() -> None:
    """One error handler per addon, children included: a parent's failing hook skips its children's,
    never the next addon's. Compared with mitmproxy's own dispatch on the same chain."""
    from mitmproxy import master, options
    from mitmproxy.proxy.layers.http import HttpRequestHook
    from mitmproxy.test import tflow

    async def dispatch(table: bool) -> list[str]:
        seen: list[str] = []

        class Child:
            def request(self, flow: object) -> None:
                seen.append("child")

        class Parent:
            def __init__(self) -> None:
                self.addons = [Child()]

            def request(self, flow: object) -> None:
                seen.append("parent")
                raise ValueError("a bug")

        class Next:
            def request(self, flow: object) -> None:
                seen.append("next")

        m = master.Master(options.Options())
        m.addons.add(Parent(), Next())
        if table:
            mitmproxy_seam.install_hook_table(m.addons)
        await m.addons.handle_lifecycle(HttpRequestHook(tflow.tflow()))
        return seen

    async def both() -> tuple[list[str], list[str]]:  # one loop: a master's log handler outlives it
        return await dispatch(table=True), await dispatch(table=False)

    with_table, without = asyncio.run(both())
    assert with_table == without == ["parent", "next"]


def test_a_moved_accessor_or_helper_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from mitmproxy import hooks, http

    def args(self: object) -> list[object]:
        return []

    with monkeypatch.context() as patch:
        patch.setattr(hooks.Hook, "args", args)
        with pytest.raises(mitmproxy_seam.SeamMoved, match=r"Hook\.args"):
            mitmproxy_seam.check()

    def native(x: bytes) -> str:
        return x.decode("latin-1")

    monkeypatch.setattr(http, "_native", native)  # what the fast lookup reproduces, changed
    with pytest.raises(mitmproxy_seam.SeamMoved, match=r"Headers\.get_all"):
        mitmproxy_seam.check()


@pytest.fixture
def fast_accessors(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The fast accessors installed for one test, and mitmproxy's own ones to compare with."""
    from mitmproxy import hooks, http, optmanager

    owners = [
        (optmanager._Option, "current"),
        (hooks.Hook, "args"),
        (http.Headers, "get_all"),
        (http.Headers, "get"),
        (http.Headers, "__contains__"),
    ]
    originals = {}
    for owner, attr in owners:
        original = getattr(owner, attr)
        originals[attr] = getattr(original, "cohere_gateway_original", original)
        monkeypatch.setattr(owner, attr, originals[attr])
    mitmproxy_seam.install_fast_accessors()
    yield originals


def test_option_reads_give_what_mitmproxy_gives_and_copy_only_what_can_change(
    fast_accessors: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mitmproxy import options, optmanager

    opts = options.Options()
    opts.update(mode=["reverse:http://127.0.0.1:1"], listen_host="127.0.0.1", key_size=4096)
    original = fast_accessors["current"]
    for name, option in opts._options.items():
        assert option.current() == original(option), name
    mode = opts.mode
    mode.append("changed by a caller")
    assert opts.mode == ["reverse:http://127.0.0.1:1"]  # a list is still a copy
    copies: list[object] = []
    monkeypatch.setattr(optmanager.copy, "deepcopy", lambda value, *rest: copies.append(value) or value)
    assert (opts.listen_host, opts.key_size, opts.http2, opts.cert_passphrase) == (
        "127.0.0.1",
        4096,
        True,
        None,
    )
    assert copies == []


def _hook_classes() -> list[type]:
    from mitmproxy import hooks
    from mitmproxy.addons import proxyserver  # noqa: F401 (registers its hooks)
    from mitmproxy.proxy import layers, server_hooks  # noqa: F401

    found, todo = [], [hooks.Hook]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not hooks.Hook and dataclasses.is_dataclass(cls):
            found.append(cls)
    return found


def test_hook_arguments_are_mitmproxys_and_their_fields_are_looked_up_once_a_class(
    fast_accessors: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = _hook_classes()
    assert len(classes) > 30
    for cls in classes:
        hook = cls(*(object() for _ in dataclasses.fields(cls)))
        assert hook.args() == fast_accessors["args"](hook), cls
    from mitmproxy import hooks

    looked_up: list[object] = []
    real_fields = dataclasses.fields
    monkeypatch.setattr(dataclasses, "fields", lambda obj: looked_up.append(obj) or real_fields(obj))
    monkeypatch.setattr(hooks, "fields", dataclasses.fields)
    some = classes[0](*(object() for _ in real_fields(classes[0])))
    some.args()
    some.args()
    assert looked_up == []


def test_header_lookups_give_what_mitmproxy_gives_without_a_call_a_field(
    fast_accessors: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mitmproxy import http

    headers = http.Headers(
        [
            (b"Content-Length", b"3"),
            (b"X-Twice", b"a"),
            (b"x-twice", b"b"),
            (b"X-\xff", b"\xfe raw"),
            (b"Host", b"example.com"),
        ]
    )
    original = fast_accessors["get_all"]
    for name in [
        "content-length",
        b"CONTENT-LENGTH",
        "X-Twice",
        b"x-\xff",
        "x-\udcff",
        "missing",
        b"",
        "Host",
    ]:
        assert headers.get_all(name) == original(headers, name), name
        assert headers.get(name) == fast_accessors["get"](headers, name), name
        assert headers.get(name, "d") == fast_accessors["get"](headers, name, "d"), name
        assert (name in headers) == fast_accessors["__contains__"](headers, name), name
    for bad in (3, None, 1.5):  # the same error as mitmproxy's, whichever it is
        with pytest.raises(Exception) as theirs:
            original(headers, bad)
        with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
            headers.get_all(bad)  # type: ignore[arg-type]
    monkeypatch.setattr(http.Headers, "_kconv", lambda key: pytest.fail("_kconv called"))
    monkeypatch.setattr(http.Headers, "__getitem__", lambda *_: pytest.fail("a KeyError path taken"))
    assert headers.get_all("X-TWICE") == ["a", "b"]
    assert headers.get("x-twice") == "a, b" and headers.get("absent") is None and "absent" not in headers


def test_a_headers_subclass_keeps_its_own_key_rule(fast_accessors: dict[str, Any]) -> None:
    from mitmproxy import http

    class Underscored(http.Headers):
        @staticmethod
        def _kconv(key: Any) -> Any:
            return key.lower().replace(b"_", b"-") if isinstance(key, bytes) else key

    headers = Underscored([(b"X_Api_Key", b"v")])
    assert headers.get_all("x-api-key") == fast_accessors["get_all"](headers, "x-api-key") == ["v"]
    assert headers.get("x-api-key") == "v" and "x-api-key" in headers
