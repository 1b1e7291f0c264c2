"""The emulator's HTTP edge: routing, auth, injected faults, framing and the test helper paths.

Everything Cohere-shaped is decided by the pure endpoint modules (chat, generate, embed, ...); this
module only reads requests, applies the knobs of `EmulatorSettings` and the `X-Emulator-Fault` header,
and writes the bytes.

Test helpers (never proxied to by the gateway in production, prefixed so they cannot clash):
  GET    /__emulator/health     readiness: {"status": "ok"}
  GET    /__emulator/requests   the last 200 requests: method, path, query, headers, body, status
                                (null while the answer is still being written), and dropped=true /
                                client_disconnected=true when the stream was cut by a fault / the client
  DELETE /__emulator/requests   forget them
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from cohere_gateway.emulator import catalog, chat, classify, compat, embed, generate, rerank, tokenizer
from cohere_gateway.emulator.errors import ApiError, error_body
from cohere_gateway.emulator.faults import (
    FAULT_HEADER,
    Fault,
    FaultCounts,
    parse_fault,
    with_random_faults,
    with_stream_error,
)
from cohere_gateway.emulator.recorder import Recorder
from cohere_gateway.emulator.results import JsonResult, Result, StreamResult
from cohere_gateway.emulator.wire import frames
from cohere_gateway.settings import EmulatorSettings

Endpoint = Callable[[dict[str, Any], Mapping[str, str]], Result]

POST_ENDPOINTS: dict[str, Endpoint] = {
    "/v1/chat": chat.v1_chat,
    "/v2/chat": chat.v2_chat,
    "/v1/generate": generate.generate,
    "/v1/embed": embed.embed_v1,
    "/v2/embed": embed.embed_v2,
    "/v1/rerank": rerank.rerank_v1,
    "/v2/rerank": rerank.rerank_v2,
    "/v1/classify": classify.classify,
    "/v1/tokenize": tokenizer.tokenize,
    "/v1/detokenize": tokenizer.detokenize,
    "/compatibility/v1/chat/completions": compat.chat_completions,
}
# aiohttp knows no reason phrase for Cohere's non-standard statuses.
REASONS = {498: "Invalid Token", 499: "Client Closed Request"}
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class State:
    settings: EmulatorSettings
    recorder: Recorder
    rng: random.Random
    fault_counts: FaultCounts = field(default_factory=FaultCounts)


STATE = web.AppKey("state", State)


def error_response(error: ApiError) -> web.Response:
    return web.Response(
        status=error.status,
        reason=REASONS.get(error.status),
        body=orjson.dumps(error_body(error.message)),
        content_type="application/json",
        headers=error.headers,
    )


def check_auth(authorization: str | None, api_key: str) -> None:
    """Accept `Bearer <key>` and `Token <key>`; with `api_key` set, only that key."""
    if not authorization or not authorization.strip():
        raise ApiError(401, "no api key supplied: send the header 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token") or not key.strip():
        raise ApiError(401, "invalid api token: the Authorization header must be 'Bearer <key>'")
    if api_key and key.strip() != api_key:
        raise ApiError(401, "invalid api token")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid request: body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid request: the body must be a JSON object")
    return body


@web.middleware
async def cohere_edge(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Records every Cohere-path request and turns every failure into Cohere's JSON error."""
    if request.path.startswith("/__emulator/"):
        return await handler(request)
    state = request.app[STATE]
    entry = state.recorder.record(
        request.method,
        request.path,
        request.query_string,
        list(request.headers.items()),
        await request.read(),
    )
    try:
        response = await handler(request)
    except ApiError as error:
        response = error_response(error)
    except web.HTTPException as exc:  # unknown path or method, raised by the router
        if exc.status == 404:
            message = f"{request.method} {request.path} is not a Cohere API path"
        else:
            message = exc.reason
        response = error_response(ApiError(exc.status, message))
    entry["status"] = response.status
    for flag in ("dropped", "client_disconnected"):
        if getattr(response, flag, False):
            entry[flag] = True
    return response


def cohere_handler(endpoint: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        settings = state.settings
        check_auth(request.headers.get("Authorization"), settings.api_key)
        header = request.headers.get(FAULT_HEADER)
        fault = state.fault_counts.apply(header, parse_fault(header))
        body = parse_body(await request.read())
        fault = with_random_faults(
            fault,
            error_rate=settings.error_rate,
            drop_rate=settings.drop_rate,
            streaming=body.get("stream") is True,
            rng=state.rng,
        )
        await _pause(settings.latency_ms + fault.delay_ms)
        if error := fault.error():
            raise error
        result = endpoint(body, request.headers)
        return await write_result(request, result, fault, settings.chunk_delay_ms)

    return handle


def read_handler(
    read: Callable[[web.Request], dict[str, Any]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """GET endpoints: same auth, faults and latency as the POST ones, no body."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        settings = state.settings
        check_auth(request.headers.get("Authorization"), settings.api_key)
        fault = with_random_faults(
            state.fault_counts.apply(
                request.headers.get(FAULT_HEADER), parse_fault(request.headers.get(FAULT_HEADER))
            ),
            error_rate=settings.error_rate,
            drop_rate=0.0,
            streaming=False,
            rng=state.rng,
        )
        await _pause(settings.latency_ms + fault.delay_ms)
        if error := fault.error():
            raise error
        return await write_result(request, JsonResult(read(request)), fault, 0.0)

    return handle


async def write_result(
    request: web.Request, result: Result, fault: Fault, chunk_delay_ms: float
) -> web.StreamResponse:
    if isinstance(result, JsonResult):
        body = orjson.dumps(result.payload)
        if not fault.drop_mid_stream:
            return web.Response(status=result.status, body=body, content_type="application/json")
        # Promise the whole body, send half, then drop: the client sees a truncated response.
        response = web.StreamResponse(status=result.status, headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        return _drop(request, response)
    return await write_stream(request, result, fault, chunk_delay_ms)


async def write_stream(
    request: web.Request, result: StreamResult, fault: Fault, chunk_delay_ms: float
) -> web.StreamResponse:
    chunks = frames(with_stream_error(result) if fault.stream_error else result)
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": result.content_type, "Cache-Control": "no-cache", **result.headers},
    )
    await response.prepare(request)
    cut = max(1, len(chunks) // 2) if fault.drop_mid_stream else None
    try:
        for i, chunk in enumerate(chunks):
            if i == cut:
                return _drop(request, response)
            if i and chunk_delay_ms:
                await _pause(chunk_delay_ms)
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:  # the client went away mid-stream: nothing left to answer
        response.client_disconnected = True  # type: ignore[attr-defined]
    return response


def _drop(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Abort the connection under a prepared response (no final chunk, no FIN-after-body)."""
    response.dropped = True  # type: ignore[attr-defined]
    if request.transport is not None:
        request.transport.abort()
    return response


async def _pause(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


# ---------------------------------------------------------------- models and test helpers


def models_list(request: web.Request) -> dict[str, Any]:
    return catalog.list_models(request.query.get("endpoint") or None)


def model_get(request: web.Request) -> dict[str, Any]:
    return catalog.model_json(catalog.lookup(request.match_info["name"]))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def list_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": request.app[STATE].recorder.entries()})


async def clear_requests(request: web.Request) -> web.Response:
    return web.json_response({"cleared": request.app[STATE].recorder.clear()})


def create_app(settings: EmulatorSettings) -> web.Application:
    app = web.Application(middlewares=[cohere_edge], client_max_size=MAX_BODY_BYTES)
    app[STATE] = State(settings=settings, recorder=Recorder(), rng=random.Random())
    app.router.add_get("/__emulator/health", health)
    app.router.add_get("/__emulator/requests", list_requests)
    app.router.add_delete("/__emulator/requests", clear_requests)
    for path, endpoint in POST_ENDPOINTS.items():
        app.router.add_post(path, cohere_handler(endpoint))
    app.router.add_get("/v1/models", read_handler(models_list))
    app.router.add_get("/v1/models/{name}", read_handler(model_get))
    return app


async def run(settings: EmulatorSettings, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; `ready` gets the base URL once the socket listens (port 0 works)."""
    runner = web.AppRunner(create_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    (ready or _announce)(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(settings: EmulatorSettings) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(settings))


def _announce(url: str) -> None:
    print(f"Cohere API emulator listening on {url}", file=sys.stdout, flush=True)
