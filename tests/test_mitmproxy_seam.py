"""The mitmproxy internals the gateway relies on (addons/mitmproxy_seam.py) are where it expects them.

A mitmproxy release that moves one fails here by name, before the gateway would silently send HTML error
pages or let `--workers N` fail to share a port."""

from __future__ import annotations

import asyncio
import socket
import subprocess

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
