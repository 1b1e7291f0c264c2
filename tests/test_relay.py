"""The upstream relay (addons/relay.py) in this process, on real loopback sockets against the emulator: the
bounds of its listener, one-time tickets, a failed start, a CA change while a stream is passed on; and the
gateway's side of them (a relay that cannot start fails the request closed; --upstream-ca and
ssl_insecure reach mitmproxy's own upstream connections)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cohere_gateway.addons import relay as relay_module
from cohere_gateway.addons.relay import (
    RELAY_ANSWER_HEADER,
    RELAY_HEADER,
    Relay,
    RelayLimits,
    RelayStartError,
    Ticket,
)
from cohere_gateway.addons.retries import RetryPolicy
from cohere_gateway.addons.routing import Upstream
from tests.fixtures.emulator import start_emulator
from tests.fixtures.tls_front import write_certificates

CHAT = {"model": "command-r", "messages": [{"role": "user", "content": "hello"}]}
AUTH = {"Authorization": "Bearer key-relay-test"}


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 60))


async def started(upstream: str, **limits: Any) -> Relay:
    relay = Relay()
    relay.limits = RelayLimits(**{**vars_of(relay.limits), **limits})
    await relay.start()
    return relay


@contextlib.asynccontextmanager
async def streamed(relay: Relay, token: str, body: dict[str, Any]) -> AsyncIterator[httpx.Response]:
    """A streamed chat through the relay with the gateway's ticket `token`."""
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST",
            f"http://127.0.0.1:{relay.port}/v2/chat",
            json=body,
            headers={**AUTH, RELAY_HEADER: token},
        ) as resp,
    ):
        yield resp


def vars_of(limits: RelayLimits) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in RelayLimits.__slots__}


def ticket_for(upstream: str, stream: bool = False) -> Ticket:
    return Ticket(Upstream.parse(upstream), RetryPolicy(), stream)


def test_a_used_ticket_cannot_be_replayed(emulator_url: str) -> None:
    async def test() -> None:
        relay = await started(emulator_url)
        token = relay.register(ticket_for(emulator_url))
        url = f"http://127.0.0.1:{relay.port}/v2/chat"
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                first = await client.post(url, json=CHAT, headers={**AUTH, RELAY_HEADER: token})
                again = await client.post(url, json=CHAT, headers={**AUTH, RELAY_HEADER: token})
        finally:
            await relay.close()
        assert first.status_code == 200 and RELAY_ANSWER_HEADER not in first.headers
        assert again.status_code == 403 and again.headers[RELAY_ANSWER_HEADER] == "1"

    run(test)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_gateways_limit_is_refused(emulator_url: str, framing: str) -> None:
    async def test() -> None:
        relay = await started(emulator_url, max_body_bytes=1000)
        url = f"http://127.0.0.1:{relay.port}/v2/chat"
        body = json.dumps({**CHAT, "pad": "x" * 2000}).encode()

        async def chunks() -> Any:
            yield body

        try:
            async with httpx.AsyncClient(timeout=10) as client:
                token = relay.register(ticket_for(emulator_url))
                content = body if framing == "content-length" else chunks()
                resp = await client.post(url, content=content, headers={**AUTH, RELAY_HEADER: token})
                small = relay.register(ticket_for(emulator_url))
                ok = await client.post(url, json=CHAT, headers={**AUTH, RELAY_HEADER: small})
        finally:
            await relay.close()
        assert resp.status_code == 413 and resp.headers[RELAY_ANSWER_HEADER] == "1"
        assert ok.status_code == 200

    run(test)


def test_a_failed_start_is_tried_again_by_the_next_request(
    emulator_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = asyncio.start_server
    failures = [OSError(24, "Too many open files")]

    async def flaky(*args: Any, **kwargs: Any) -> asyncio.Server:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(relay_module.asyncio, "start_server", flaky)

    async def test() -> None:
        relay = Relay()
        with pytest.raises(RelayStartError):
            await relay.start()
        await relay.start()
        token = relay.register(ticket_for(emulator_url))
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(
                    f"http://127.0.0.1:{relay.port}/v2/chat", json=CHAT, headers={**AUTH, RELAY_HEADER: token}
                )
        finally:
            await relay.close()
        assert resp.status_code == 200

    run(test)


def test_a_ca_change_lets_a_stream_in_flight_finish_then_closes_the_old_pool() -> None:
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "emulator:reply-tokens=20"}]}
    with start_emulator("--chunk-delay-ms", "30") as upstream:

        async def test() -> None:
            relay = await started(upstream)
            token = relay.register(ticket_for(upstream, stream=True))
            old = relay._client
            lines: list[str] = []
            try:
                async with streamed(relay, token, body) as resp:
                    async for line in resp.aiter_lines():
                        if not lines:
                            relay.configure("")  # mid-stream: new attempts get a new pool
                        lines.append(line)
                assert old is not None and relay._client is not old
                await asyncio.gather(*relay._closing)
                assert old.is_closed  # once its last stream ended
            finally:
                await relay.close()
            assert any("message-end" in line for line in lines), lines[-3:]

        run(test)


def test_an_open_stream_holds_one_copy_of_its_request_body_in_the_relay() -> None:
    """The relay read the body into a buffer and handed the exchange a copy; the buffer stayed alive beside
    it for the whole stream (a long chat history twice over per open stream)."""
    import tracemalloc

    size = 2_000_000
    text = "emulator:reply-tokens=20 " + "x" * size
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": text}]}
    with start_emulator("--chunk-delay-ms", "100") as upstream:

        async def test() -> None:
            relay = await started(upstream)
            token = relay.register(ticket_for(upstream, stream=True))
            tracemalloc.start()
            try:
                async with streamed(relay, token, body) as resp:
                    lines = resp.aiter_lines()
                    assert "message-start" in await anext(lines)  # the stream is open
                    # what the relay's own lines allocated and still hold
                    held = tracemalloc.take_snapshot().filter_traces(
                        [tracemalloc.Filter(True, relay_module.__file__)]
                    )
                    assert sum(stat.size for stat in held.statistics("filename")) < 1.5 * size
                    async for _ in lines:
                        pass
            finally:
                tracemalloc.stop()
                await relay.close()

        run(test)


# --- the gateway's side, in-process with mitmproxy's test flows -------------------------------------------


def test_a_relay_that_cannot_start_fails_a_cached_request_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache lookup used to catch the relay's failure as a bug of its own and let mitmproxy send the
    request straight upstream, without the relay (nor its timeout and retries)."""
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import taddons, tflow

    from cohere_gateway.addons.gateway import Gateway

    async def broken(self: Relay) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(Relay, "_start", broken)

    async def test() -> None:
        gw = Gateway()
        with taddons.context(gw) as tctx:
            tctx.configure(gw, kafka_bootstrap="", upstream="http://127.0.0.1:9", upstream_pool="always",
                           cache_ttl=60, confdir=str(tmp_path))  # fmt: skip
            flow = tflow.tflow()
            flow.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
            gw.client_connected(flow.client_conn)
            flow.request.method = "POST"
            flow.request.path = "/v1/acct/gw/cohere/v2/chat"
            flow.request.headers["authorization"] = "Bearer key"
            flow.request.content = json.dumps(CHAT).encode()
            gw.requestheaders(flow)
            assert flow.response is None
            pending = gw.request(flow)
            assert pending is not None  # the cache lookup
            await pending
            assert flow.response is not None and flow.response.status_code == 500
            assert "not forwarded" in json.loads(flow.response.content)["message"]
            assert gw.metrics.hook_errors["request"] == 1

    run(test)


def test_upstream_ca_and_ssl_insecure_reach_mitmproxys_own_upstream_connections(tmp_path: Path) -> None:
    from mitmproxy.test import taddons

    from cohere_gateway.addons.gateway import Gateway

    ca_file = str(write_certificates(tmp_path)[0])
    gw = Gateway()
    with taddons.context(gw) as tctx:
        tctx.configure(gw, kafka_bootstrap="", upstream_ca=ca_file)
        assert tctx.options.ssl_verify_upstream_trusted_ca == ca_file
        tctx.configure(gw, upstream_ca="")  # cleared at runtime: both paths back to certifi's bundle
        assert tctx.options.ssl_verify_upstream_trusted_ca is None
        tctx.configure(gw, ssl_verify_upstream_trusted_ca="/operator/own.pem")  # a stock mitmdump's own
        tctx.configure(gw, upstream_ca="")
        assert tctx.options.ssl_verify_upstream_trusted_ca == "/operator/own.pem"
        # the pool always verifies the upstream's certificate: mitmproxy's own connections too
        tctx.configure(gw, ssl_insecure=True)
        assert tctx.options.ssl_insecure is False
