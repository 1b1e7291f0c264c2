"""The requests every scenario sends: Cohere v2 chat bodies as the official SDK sends them."""

from __future__ import annotations

import orjson

MODEL = "command-r-plus-08-2024"
HEADERS = {
    "Authorization": "Bearer bench-key-not-a-secret",
    "Content-Type": "application/json",
    "Accept": "application/json",
    "User-Agent": "cohere/7.3.1 (bench)",
}
# Gateway route prefix: account "bench", gateway "bench".
GATEWAY_PREFIX = "/v1/bench/bench/cohere"


def chat_body(text: str = "Say hello to the benchmark.", *, stream: bool = False) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream})


def long_stream_body(tokens: int) -> bytes:
    """A streamed chat whose reply has `tokens` tokens: the emulator's `emulator:reply-tokens=N` directive."""
    return chat_body(f"Tell a story. emulator:reply-tokens={tokens}", stream=True)
