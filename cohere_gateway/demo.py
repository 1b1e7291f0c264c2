"""Demo traffic: a realistic mix of Cohere calls through the gateway with the official `cohere` SDK.

Used by `cohere-gateway up --demo` (against the emulator) so the dashboard has something to show without
a Cohere key. Several accounts, gateways, API keys, models and endpoints; streams; metadata; and a share of
errors the emulator is asked for (`X-Emulator-Fault`), so error panels are not empty either.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cohere

ACCOUNTS = {"acme": ("prod", "staging"), "globex": ("prod",), "initech": ("search", "support-bot")}
API_KEYS = ("demo-key-alice-7f3a", "demo-key-bob-91c2", "demo-key-ci-0e55")
TEAMS = ("search", "support", "growth", "research")
QUESTIONS = (
    "What is the capital of France?",
    "Summarise the quarterly report in three bullet points.",
    "Write a haiku about observability pipelines.",
    "How do I rotate an API key safely?",
    "Explain retrieval augmented generation to a new engineer.",
)
DOCUMENTS = [
    "Kafka keeps an ordered log per partition.",
    "ClickHouse is a column-oriented database for analytics.",
    "mitmproxy is an interactive HTTPS proxy.",
    "Cohere's rerank scores documents against a query.",
]


@dataclass
class Call:
    name: str
    weight: float
    run: Callable[[cohere.ClientV2, cohere.Client, dict[str, Any]], object]


def _chat_v2(co2: cohere.ClientV2, _: cohere.Client, opts: dict[str, Any]) -> object:
    return co2.chat(
        model=random.choice(("command-a-03-2025", "command-r-plus-08-2024", "command-r7b-12-2024")),
        messages=[{"role": "user", "content": random.choice(QUESTIONS)}],
        request_options=opts,
    )


def _chat_v2_stream(co2: cohere.ClientV2, _: cohere.Client, opts: dict[str, Any]) -> object:
    stream = co2.chat_stream(
        model=random.choice(("command-a-03-2025", "command-r-08-2024")),
        messages=[{"role": "user", "content": random.choice(QUESTIONS)}],
        request_options=opts,
    )
    return sum(1 for _ in stream)


_ORDER_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Where an order is",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
    },
}


_ORDER_ASK = [{"role": "user", "content": "Where is my order 42?"}]
# The same conversation after the tool ran: the model answers in text.
_ORDER_ANSWERED = [
    *_ORDER_ASK,
    {
        "role": "assistant",
        "tool_plan": "I will use lookup_order to answer this.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"order_id":"42"}'},
            }
        ],
    },
    {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": [{"type": "document", "document": {"data": {"status": "shipped"}}}],
    },
]


def _chat_v2_tools(co2: cohere.ClientV2, _: cohere.Client, opts: dict[str, Any]) -> object:
    """Tool use, one request a call: the first turn (ends in TOOL_CALL) or the turn after the result."""
    messages = random.choice((_ORDER_ASK, _ORDER_ANSWERED))
    return co2.chat(model="command-a-03-2025", messages=messages, tools=[_ORDER_TOOL], request_options=opts)


def _chat_v1(_: cohere.ClientV2, co: cohere.Client, opts: dict[str, Any]) -> object:
    return co.chat(message=random.choice(QUESTIONS), model="command-r-plus", request_options=opts)


def _chat_v1_stream(_: cohere.ClientV2, co: cohere.Client, opts: dict[str, Any]) -> object:
    return sum(
        1 for _ in co.chat_stream(message=random.choice(QUESTIONS), model="command-r", request_options=opts)
    )


def _embed(co2: cohere.ClientV2, _: cohere.Client, opts: dict[str, Any]) -> object:
    return co2.embed(
        model="embed-english-v3.0",
        texts=random.sample(QUESTIONS, k=random.randint(1, 4)),
        input_type="search_document",
        embedding_types=["float"],
        request_options=opts,
    )


def _rerank(co2: cohere.ClientV2, _: cohere.Client, opts: dict[str, Any]) -> object:
    return co2.rerank(model="rerank-v3.5", query="What is Kafka?", documents=DOCUMENTS, request_options=opts)


def _classify(_: cohere.ClientV2, co: cohere.Client, opts: dict[str, Any]) -> object:
    examples = [
        cohere.ClassifyExample(text="I love this", label="positive"),
        cohere.ClassifyExample(text="This is great", label="positive"),
        cohere.ClassifyExample(text="I hate this", label="negative"),
        cohere.ClassifyExample(text="This is awful", label="negative"),
    ]
    return co.classify(
        model="embed-english-v3.0", inputs=["What a day", "Not good"], examples=examples, request_options=opts
    )


def _tokenize(_: cohere.ClientV2, co: cohere.Client, opts: dict[str, Any]) -> object:
    # offline=False: the SDK would otherwise first try to download a tokenizer from the internet.
    return co.tokenize(text=random.choice(QUESTIONS), model="command-r", offline=False, request_options=opts)


def _generate(_: cohere.ClientV2, co: cohere.Client, opts: dict[str, Any]) -> object:
    return co.generate(prompt=random.choice(QUESTIONS), model="command", max_tokens=40, request_options=opts)


CALLS = (
    Call("chat v2", 30, _chat_v2),
    Call("chat v2 stream", 20, _chat_v2_stream),
    Call("chat v2 tools", 5, _chat_v2_tools),
    Call("chat v1", 10, _chat_v1),
    Call("chat v1 stream", 6, _chat_v1_stream),
    Call("embed", 12, _embed),
    Call("rerank", 8, _rerank),
    Call("classify", 3, _classify),
    Call("tokenize", 3, _tokenize),
    Call("generate", 3, _generate),
)

# Faults asked of the emulator, with their share of calls: rate limits, revoked keys, server errors.
FAULTS = (("status=429", 0.03), ("status=500", 0.02), ("status=498", 0.01), ("status=503", 0.01))


@dataclass
class DemoStats:
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values())


def _clients(gateway_url: str, account: str, gateway: str, key: str) -> tuple[cohere.ClientV2, cohere.Client]:
    base = f"{gateway_url.rstrip('/')}/v1/{account}/{gateway}/cohere"
    return (
        cohere.ClientV2(api_key=key, base_url=base, timeout=30),
        cohere.Client(api_key=key, base_url=base, timeout=30),
    )


def drive(
    gateway_url: str,
    *,
    requests: int | None = None,
    rate_per_s: float = 5.0,
    stop: threading.Event | None = None,
    seed: int | None = None,
    inject_faults: bool = True,
    on_call: Callable[[str, str | None], None] | None = None,
) -> DemoStats:
    """Send demo calls until `requests` were made or `stop` is set; returns what happened.

    Errors are expected (some are asked for) and counted, never raised.
    """
    rng = random.Random(seed)
    random.seed(seed)
    stop = stop or threading.Event()
    clients = {
        (a, g, k): _clients(gateway_url, a, g, k)
        for a, gws in ACCOUNTS.items()
        for g in gws
        for k in API_KEYS
    }
    stats = DemoStats()
    weights = [c.weight for c in CALLS]
    interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    next_at = time.monotonic()
    while not stop.is_set() and (requests is None or stats.total < requests):
        account = rng.choice(list(ACCOUNTS))
        key_tuple = (account, rng.choice(ACCOUNTS[account]), rng.choice(API_KEYS))
        call = rng.choices(CALLS, weights)[0]
        headers = {"cf-aig-metadata": json.dumps({"team": rng.choice(TEAMS), "demo": True})}
        if inject_faults:
            for fault, share in FAULTS:
                if rng.random() < share:
                    headers["X-Emulator-Fault"] = fault
                    break
        opts: dict[str, Any] = {"max_retries": 0, "additional_headers": headers}
        error: str | None = None
        try:
            call.run(*clients[key_tuple], opts)
            stats.ok += 1
        except Exception as exc:  # the SDK's typed errors; a demo counts them and goes on
            error = type(exc).__name__
            stats.errors[error] += 1
        if on_call:
            on_call(call.name, error)
        next_at += interval
        stop.wait(max(0.0, next_at - time.monotonic()))
    return stats
