"""Watching a streamed response go by: incremental NDJSON/SSE framing and per-API event handling.

The proxy hands each upstream chunk to `StreamWatcher.feed` and passes the same bytes on untouched, so
the client sees chunks as they arrive. Chunks may split lines anywhere; a partial line is kept until its
end arrives. Only the few events that carry something we record are parsed (substring checks first),
because streams are the hot path.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import orjson

from cohere_gateway.addons.usage import (
    Extracted,
    _dict,
    _str,
    extract_json,
    usage_from_cohere,
    usage_from_compat,
)

MAX_PENDING_LINE = 4 * 1024 * 1024  # a line longer than this is not a well-formed event; stop buffering it

# Events that carry generated tokens: text, and for tool use the plan and the call's arguments (a
# response that calls a tool generates no text, and its time to first token is the plan's).
_V2_TOKEN_EVENTS = (b"content-delta", b"tool-plan-delta", b"tool-call-delta")
_V1_TOKEN_EVENTS = (b"text-generation", b"tool-calls-chunk")

STREAM_CONTENT_TYPES = ("text/event-stream", "application/stream+json", "application/x-ndjson")


def is_stream_response(content_type: str, request_stream: bool) -> bool:
    ct = content_type.lower()
    return any(t in ct for t in STREAM_CONTENT_TYPES) or (request_stream and "json" not in ct and ct != "")


class LineFramer:
    """Splits a byte stream into lines (LF or CRLF) across chunk boundaries."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_PENDING_LINE:
            self._pending = b""
        return lines

    def flush(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest.strip() else []


class StreamWatcher:
    """Extracts usage, finish reason, ids and the time of the first generated token from a stream.

    `fmt` is "sse" or "ndjson" (decided from the response Content-Type, since v1 chat answers either).
    """

    def __init__(
        self, api_version: str, endpoint: str, fmt: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.api_version = api_version
        self.endpoint = endpoint
        self.sse = fmt == "sse"
        self.clock = clock
        self.framer = LineFramer()
        self.extracted = Extracted()
        self.first_token_at: float | None = None
        self.ended = False  # saw the stream's end event
        # saw the last data the stream carries (v1 stream-end, or `[DONE]`): the event can be published
        # before that chunk is passed on, so a client never sees a finished stream whose event is not yet out
        self.complete = False
        # the upstream answered 200 and then reported a failure inside the stream (v1 `stream-error`,
        # v2 `message-end` carrying an error): the exchange is not ok, whatever its status
        self.stream_error = False
        self.bytes_seen = 0
        self._data: list[bytes] = []  # SSE data lines of the event being read
        if api_version == "compat":
            self._handle = self._compat
        elif api_version == "v2":
            self._handle = self._v2
        else:
            self._handle = self._v1

    def feed(self, chunk: bytes) -> None:
        self.bytes_seen += len(chunk)
        for line in self.framer.feed(chunk):
            self._line(line)

    def finish(self) -> None:
        for line in self.framer.flush():
            self._line(line)
        if self.sse and self._data:
            self._dispatch(b"\n".join(self._data))
            self._data = []

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not self.sse:
            if line:
                self._dispatch(line)
            return
        if not line:
            if self._data:
                data, self._data = b"\n".join(self._data), []
                self._dispatch(data)
        elif line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
        # "event:", "id:", "retry:" and ":" comments: the event name repeats data.type, nothing to keep

    def _dispatch(self, data: bytes) -> None:
        if data == b"[DONE]":
            self.complete = True
            return
        if self.first_token_at is None and self.api_version != "compat" and self._is_token(data):
            self.first_token_at = self.clock()
            return  # a token event carries nothing else we record
        if not self._wanted(data):
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return  # the SDK skips lines that do not parse; so do we
        if isinstance(obj, dict):
            self._handle(obj)

    def _is_token(self, data: bytes) -> bool:
        markers = _V2_TOKEN_EVENTS if self.api_version == "v2" else _V1_TOKEN_EVENTS
        return any(m in data for m in markers)

    def _wanted(self, data: bytes) -> bool:
        if self.api_version == "compat":
            return data != b"[DONE]"
        if self.api_version == "v2":
            return b"message-end" in data or b"message-start" in data
        return b"stream-end" in data or b"stream-start" in data or b"stream-error" in data

    def _v1(self, obj: dict) -> None:
        kind = obj.get("event_type")
        ex = self.extracted
        if kind == "stream-start":
            ex.generation_id = _str(obj.get("generation_id")) or ex.generation_id
        elif kind == "stream-end":
            self.ended = self.complete = True
            response = _dict(obj.get("response"))
            whole = extract_json(self.api_version, self.endpoint, response)
            whole.finish_reason = _str(obj.get("finish_reason")) or whole.finish_reason
            whole.generation_id = whole.generation_id or ex.generation_id
            self.extracted = whole
        elif kind == "stream-error":
            self.ended = self.complete = self.stream_error = True
            ex.finish_reason = _str(obj.get("finish_reason")) or "ERROR"
            ex.error_message = _str(obj.get("err")) or "stream-error without a message"

    def _v2(self, obj: dict) -> None:
        kind = obj.get("type")
        ex = self.extracted
        if kind == "message-start":
            ex.response_id = _str(obj.get("id")) or ex.response_id
        elif kind == "message-end":
            self.ended = True
            delta = _dict(obj.get("delta"))
            ex.finish_reason = _str(delta.get("finish_reason"))
            ex.usage = usage_from_cohere(delta.get("usage"))
            err = delta.get("error")
            if err:  # Cohere sends a string; anything else is kept as its JSON text
                self.stream_error = True
                ex.error_message = err if isinstance(err, str) else orjson.dumps(err).decode()

    def _compat(self, obj: dict) -> None:
        ex = self.extracted
        ex.response_id = ex.response_id or _str(obj.get("id"))
        ex.model = ex.model or _str(obj.get("model"))
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            choice = _dict(choices[0])
            if self.first_token_at is None and _dict(choice.get("delta")).get("content"):
                self.first_token_at = self.clock()
            finish = _str(choice.get("finish_reason"))
            if finish:
                ex.finish_reason = finish
                self.ended = True
        if isinstance(obj.get("usage"), dict):
            ex.usage = usage_from_compat(obj["usage"])
            self.ended = True


_EVENT_END = re.compile(rb"\r?\n\r?\n")


class UsageStripper:
    """A compat (OpenAI-style) SSE stream given back as the client asked for it, when the gateway asked
    upstream for usage (`stream_options.include_usage`) on the client's behalf: the usage-only chunk
    (`choices: []`) is left out and the `"usage": null` the other chunks then carry is removed. Events are
    passed on whole, so a chunk boundary inside an event holds that event until its end arrives; events
    without `"usage"` pass byte for byte."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        out = []
        start = 0
        for end in _EVENT_END.finditer(data):
            out.append(self._event(data[start : end.start()], end.group()))
            start = end.end()
        self._pending = data[start:]
        if len(self._pending) > MAX_PENDING_LINE:  # not a well-formed event: stop holding it
            out.append(self._pending)
            self._pending = b""
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest

    @staticmethod
    def _event(event: bytes, end: bytes) -> bytes:
        if b'"usage"' not in event:
            return event + end
        lines = event.splitlines()
        data = [line for line in lines if line.startswith(b"data:")]
        try:
            obj = orjson.loads(b"\n".join(line[5:] for line in data))
        except orjson.JSONDecodeError:
            return event + end
        if not isinstance(obj, dict) or "usage" not in obj:
            return event + end
        if not obj.get("choices"):
            return b""  # the usage chunk the client did not ask for
        del obj["usage"]
        kept = [line for line in lines if not line.startswith(b"data:")]
        newline = b"\r\n" if end.startswith(b"\r") else b"\n"
        return newline.join([*kept, b"data: " + orjson.dumps(obj)]) + end


def want_stream_usage(api_version: str, endpoint: str, stream: bool, body: dict) -> bool:
    """A compat chat stream whose request did not ask for usage: without it the stream cannot be priced,
    so the gateway asks upstream for it (and strips it again, UsageStripper). A `stream_options` that is
    not an object is left for upstream to refuse."""
    if api_version != "compat" or endpoint != "chat.completions" or not stream:
        return False
    options = body.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True
