"""Injected faults: what a request header or the random-fault knobs ask the emulator to do wrong.

A test forces one outcome per request with the header `X-Emulator-Fault`, a comma- or
semicolon-separated list of:
  `status=NNN`        answer with that status (400..599) and Cohere's JSON error body;
  `retry-after=S`     with status=429: the `retry-after` header value in seconds (default 1);
  `drop-mid-stream`   send part of the response, then drop the connection;
  `stream-error`      a stream answers 200 and ends with an error event instead of its end: v1
                      `stream-error` {finish_reason: ERROR, err}, v2 `message-end` whose delta carries
                      `error` (and the usage so far);
  `delay-ms=N`        wait N ms before answering;
  `times=N`           apply the other items to the first N requests carrying this exact header value
                      only, then answer normally (a gateway's retries recover: `status=500,times=2,id=x`);
  `id=TEXT`           ignored, makes a header value unique so `times` counts one test's requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from cohere_gateway.emulator.errors import ApiError
from cohere_gateway.emulator.results import StreamResult

FAULT_HEADER = "X-Emulator-Fault"

# Cohere's wording where it is known, a plain description otherwise; "(emulated fault)" tells a reader
# of a test log that the emulator was asked for it.
STATUS_MESSAGES = {
    400: "invalid request (emulated fault)",
    401: "invalid api token (emulated fault)",
    403: "forbidden (emulated fault)",
    404: "not found (emulated fault)",
    408: "request timeout (emulated fault)",
    422: "unprocessable entity (emulated fault)",
    429: "You are past the rate limit for this API key; retry after the time in retry-after (emulated fault)",
    498: "invalid token: the API key was revoked (emulated fault)",
    499: "request cancelled by the client (emulated fault)",
    500: "internal server error, this has been reported to our developers (emulated fault)",
    501: "not implemented (emulated fault)",
    502: "bad gateway (emulated fault)",
    503: "service unavailable: the model is overloaded, try again later (emulated fault)",
    504: "gateway timeout (emulated fault)",
}


@dataclass(frozen=True)
class Fault:
    status: int | None = None
    retry_after_s: float = 1.0
    drop_mid_stream: bool = False
    stream_error: bool = False
    delay_ms: float = 0.0
    times: int | None = None  # None: every request

    def error(self) -> ApiError | None:
        if self.status is None:
            return None
        headers = {"retry-after": _number(self.retry_after_s)} if self.status == 429 else {}
        message = STATUS_MESSAGES.get(self.status, f"error {self.status} (emulated fault)")
        return ApiError(self.status, message, headers)


NO_FAULT = Fault()


def parse_fault(header: str | None) -> Fault:
    """Parse the X-Emulator-Fault header; a malformed one is a 400 naming the bad item."""
    fault = NO_FAULT
    if not header:
        return fault
    for raw in header.replace(";", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        key = key.lower()
        try:
            if key == "drop-mid-stream" and not sep:
                fault = replace(fault, drop_mid_stream=True)
            elif key == "stream-error" and not sep:
                fault = replace(fault, stream_error=True)
            elif key == "status" and sep:
                status = int(value)
                if not 400 <= status <= 599:
                    raise ValueError("status must be 400..599")
                fault = replace(fault, status=status)
            elif key == "delay-ms" and sep:
                fault = replace(fault, delay_ms=_non_negative(value))
            elif key == "retry-after" and sep:
                fault = replace(fault, retry_after_s=_non_negative(value))
            elif key == "times" and sep:
                if not value.isdigit():
                    raise ValueError("times must be an integer >= 0")
                fault = replace(fault, times=int(value))
            elif key == "id" and sep:
                pass
            else:
                raise ValueError("unknown item")
        except ValueError as exc:
            raise ApiError(
                400,
                f"invalid request: {FAULT_HEADER} item {item!r}: {exc}; expected status=NNN, "
                "retry-after=S, drop-mid-stream, stream-error, delay-ms=N, times=N or id=TEXT",
            ) from None
    return fault


class FaultCounts:
    """How many requests each `times=N` header value has faulted, so the N+1st is answered normally."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._seen: dict[str, int] = {}
        self._max = max_entries

    def apply(self, header: str | None, fault: Fault) -> Fault:
        if fault.times is None or header is None:
            return fault
        count = self._seen.get(header, 0)
        if len(self._seen) >= self._max:  # a test helper, but still bounded
            self._seen.clear()
        self._seen[header] = count + 1
        return fault if count < fault.times else NO_FAULT


STREAM_ERROR_MESSAGE = "internal error while generating, the response is incomplete (emulated fault)"


def with_stream_error(result: StreamResult) -> StreamResult:
    """The stream with its end event replaced by the error event Cohere sends when generation fails."""
    *head, last = result.events
    if "event_type" in last:  # v1 chat and generate
        error = {"is_finished": True, "event_type": "stream-error", "finish_reason": "ERROR"}
        error["err"] = STREAM_ERROR_MESSAGE
    elif last.get("type") == "message-end":  # v2 chat
        delta = {"finish_reason": "ERROR", "error": STREAM_ERROR_MESSAGE}
        if "usage" in last.get("delta", {}):
            delta["usage"] = last["delta"]["usage"]
        error = {"type": "message-end", "delta": delta}
    else:
        raise ApiError(400, "invalid request: stream-error applies to v1 and v2 streams only")
    return replace(result, events=[*head, error])


def with_random_faults(
    fault: Fault, *, error_rate: float, drop_rate: float, streaming: bool, rng: random.Random
) -> Fault:
    """Add the settings' random faults (drops only hit streams) to what the request asked for."""
    if fault.status is None and error_rate > 0 and rng.random() < error_rate:
        fault = replace(fault, status=500)
    if streaming and not fault.drop_mid_stream and drop_rate > 0 and rng.random() < drop_rate:
        fault = replace(fault, drop_mid_stream=True)
    return fault


def _non_negative(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be a number >= 0")
    return number


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
