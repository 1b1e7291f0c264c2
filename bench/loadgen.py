"""A lean keep-alive HTTP/1.1 load generator on asyncio streams.

Each of `concurrency` connections sends the same pre-encoded request back to back and times it from the
first byte written to the last body byte read. The run stops at `requests` or `seconds`, whichever comes
first. Warm up with a separate short run, so CPU meters around a run see only timed requests. The
generator's own CPU per request is measured too, so a reader can see it is the same for every target and
small next to what is measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bench.stats import percentile


class LoadError(RuntimeError):
    """The target answered something the benchmark cannot count as a success."""


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, timed requests only
    errors: int = 0
    elapsed_s: float = 0.0  # wall time of the timed part
    client_cpu_s: float = 0.0
    first_error: str | None = None

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def merge(self, other: LoadResult) -> LoadResult:
        return LoadResult(
            self.latencies + other.latencies,
            self.errors + other.errors,
            self.elapsed_s + other.elapsed_s,
            self.client_cpu_s + other.client_cpu_s,
            self.first_error or other.first_error,
        )


def encode_request(
    url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response: (status, body). Handles Content-Length and chunked bodies."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length: int | None = None
    chunked = False
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return status, bytes(body)
            body += await reader.readexactly(size + 2)
            del body[-2:]
    if length is None:
        raise LoadError("response without Content-Length or chunked encoding; cannot keep the connection")
    return status, await reader.readexactly(length)


# One request sent again and again, or a function giving each send its own (e.g. a body never seen before).
Request = bytes | Callable[[], bytes]


async def _connection(
    host: str, port: int, request: Request, budget: list[int], deadline: float, out: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            data = request() if callable(request) else request
            started = time.perf_counter()
            writer.write(data)
            status, body = await read_response(reader)
            took = time.perf_counter() - started
            if status >= 400:
                out.errors += 1
                out.first_error = out.first_error or f"HTTP {status}: {body[:200]!r}"
            else:
                out.latencies.append(took)
    finally:
        writer.close()


async def run_load(
    url: str,
    request: Request,
    *,
    concurrency: int,
    requests: int,
    seconds: float,
) -> LoadResult:
    """Send up to `requests` requests over `concurrency` keep-alive connections for at most
    `seconds` of wall time."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    out = LoadResult()
    budget = [requests]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    deadline = wall0 + seconds
    await asyncio.gather(
        *(_connection(host, port, request, budget, deadline, out) for _ in range(concurrency))
    )
    out.elapsed_s = time.perf_counter() - wall0
    out.client_cpu_s = time.process_time() - cpu0
    if out.errors and not out.latencies:
        raise LoadError(f"every request failed; first: {out.first_error}")
    return out
