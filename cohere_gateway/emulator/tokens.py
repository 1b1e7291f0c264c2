"""Deterministic token counts and replies, so tests can predict every usage number the emulator reports.

Counting: a token is a run of word characters or one other non-space character
(`count_tokens(text) == len(re.findall(r"\\w+|[^\\w\\s]", text))`), so "Hello, world!" is 4 tokens.

Usage formulas (all exact, all integers):

- Chat (v1 `/v1/chat`, v2 `/v2/chat`, OpenAI-compatible `/compatibility/v1/chat/completions`):
  billed input  = tokens of every message text the caller sent (v1: `preamble` + `chat_history[].message`
                  + `message`; v2/compat: every `messages[].content` text, whatever the role)
                  + tokens of every string value of every document (`documents`);
  raw input     = billed input + PREAMBLE_OVERHEAD (Cohere's own system preamble, which is not billed);
  output        = tokens of the generated text (billed and raw alike).
  Compat reports `prompt_tokens` = billed input, `completion_tokens` = output.
- Generate: billed input = raw input = tokens of `prompt` (no preamble); output as for chat.
- Embed: billed input tokens = sum of tokens of `texts` (or of the text parts of `inputs`).
- Rerank: search units = max(1, ceil(len(documents) / 100)).
- Classify: classifications = len(inputs).

Replies: the generated text is REPLY_TOKENS tokens (words picked from a fixed list, seeded by the SHA-256
of the last user message, ending with "."), cut to `max_tokens` when that is smaller (finish reason
MAX_TOKENS, else COMPLETE). A message containing `emulator:reply-tokens=N` asks for an N-token reply
instead (for long-stream tests and benchmarks). Each streamed text chunk is one token (with its leading
space), so a stream has as many text events as the reply has tokens.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PREAMBLE_OVERHEAD = 7
REPLY_TOKENS = 24
MAX_REPLY_TOKENS = 100_000

_TOKEN = re.compile(r"\w+|[^\w\s]")
# Same tokens as _TOKEN, each carrying the whitespace before it, so joining them gives the text back.
_TOKEN_WITH_SPACE = re.compile(r"\s*(?:\w+|[^\w\s])")
_REPLY_DIRECTIVE = re.compile(r"emulator:reply-tokens=(\d+)")

_WORDS = (
    "the",
    "gateway",
    "forwards",
    "every",
    "request",
    "to",
    "the",
    "emulated",
    "model",
    "and",
    "records",
    "usage",
    "so",
    "that",
    "dashboards",
    "show",
    "tokens",
    "latency",
    "cost",
    "and",
    "errors",
    "for",
    "each",
    "team",
    "while",
    "streams",
    "arrive",
    "chunk",
    "by",
    "chunk",
    "without",
    "losing",
    "a",
    "single",
    "byte",
    "of",
    "the",
    "answer",
)


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def split_tokens(text: str) -> list[str]:
    """The tokens of `text`, each with its leading whitespace; `"".join(...)` is `text` minus trailing
    whitespace, and `len(...) == count_tokens(text)`."""
    return _TOKEN_WITH_SPACE.findall(text)


def count_all(texts: Iterable[str]) -> int:
    return sum(count_tokens(t) for t in texts)


def document_texts(documents: Iterable[Any]) -> list[str]:
    """The string values of chat documents: v1 `{"title": ..., "snippet": ...}`, v2 plain strings or
    `{"data": {...}}` / `{"id": ..., "data": {...}}`."""
    out: list[str] = []
    for doc in documents:
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, dict):
            data = doc.get("data", doc)
            if isinstance(data, dict):
                out.extend(v for k, v in data.items() if isinstance(v, str) and k != "id")
            elif isinstance(data, str):
                out.append(data)
    return out


def search_units(n_documents: int) -> int:
    return max(1, math.ceil(n_documents / 100))


@dataclass(frozen=True)
class Reply:
    tokens: tuple[str, ...]  # each with its leading space; joined they are the text
    finish_reason: str  # "COMPLETE" or "MAX_TOKENS"

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @property
    def output_tokens(self) -> int:
        return len(self.tokens)


def reply_length(seed_text: str) -> int:
    match = _REPLY_DIRECTIVE.search(seed_text)
    return min(int(match.group(1)), MAX_REPLY_TOKENS) if match else REPLY_TOKENS


def generate_reply(seed_text: str, max_tokens: int | None = None) -> Reply:
    """The deterministic reply to `seed_text` (the last user message, or a generate prompt)."""
    wanted = reply_length(seed_text)
    rng = random.Random(hashlib.sha256(seed_text.encode()).digest())
    words = [rng.choice(_WORDS) for _ in range(max(wanted - 1, 0))]
    if words:
        words[0] = words[0].capitalize()
    tokens = [(" " if i else "") + w for i, w in enumerate(words)]
    if wanted:
        tokens.append(".")
    if max_tokens is not None and max_tokens < len(tokens):
        return Reply(tuple(tokens[:max_tokens]), "MAX_TOKENS")
    return Reply(tuple(tokens), "COMPLETE")


@dataclass(frozen=True)
class ChatUsage:
    billed_input_tokens: int
    billed_output_tokens: int
    raw_input_tokens: int
    raw_output_tokens: int


def chat_usage(input_texts: Iterable[str], reply: Reply) -> ChatUsage:
    billed_in = count_all(input_texts)
    return ChatUsage(billed_in, reply.output_tokens, billed_in + PREAMBLE_OVERHEAD, reply.output_tokens)


def expected_chat_usage(
    messages: Iterable[str],
    *,
    last_user_message: str | None = None,
    documents: Iterable[Any] = (),
    max_tokens: int | None = None,
) -> ChatUsage:
    """What the emulator reports for a chat whose message texts are `messages` (all roles, in order;
    the last one is taken as the user's unless `last_user_message` says otherwise)."""
    texts = list(messages)
    seed = last_user_message if last_user_message is not None else (texts[-1] if texts else "")
    reply = generate_reply(seed, max_tokens)
    return chat_usage([*texts, *document_texts(documents)], reply)


def expected_reply(seed_text: str, max_tokens: int | None = None) -> str:
    return generate_reply(seed_text, max_tokens).text
