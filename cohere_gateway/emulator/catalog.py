"""The models the emulator knows, in the shape of Cohere's `GET /v1/models`; unknown names get a 404."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cohere_gateway.emulator.errors import ApiError

TOKENIZER_URL = "https://storage.googleapis.com/cohere-public/tokenizers/{name}.json"


@dataclass(frozen=True)
class Model:
    name: str
    endpoints: tuple[str, ...]
    context_length: int
    embedding_dim: int | None = None  # embed models only
    deprecated: bool = False


_CHAT = ("chat", "generate", "summarize")
MODELS: tuple[Model, ...] = (
    Model("command-a-03-2025", ("chat",), 256_000),
    Model("command-r7b-12-2024", ("chat",), 128_000),
    Model("command-r-plus-08-2024", _CHAT, 128_000),
    Model("command-r-08-2024", _CHAT, 128_000),
    Model("command-r-plus", _CHAT, 128_000),
    Model("command-r", _CHAT, 128_000),
    Model("command", _CHAT, 4096, deprecated=True),
    Model("command-light", _CHAT, 4096, deprecated=True),
    Model("embed-v4.0", ("embed",), 128_000, embedding_dim=1536),
    Model("embed-english-v3.0", ("embed", "classify"), 512, embedding_dim=1024),
    Model("embed-multilingual-v3.0", ("embed", "classify"), 512, embedding_dim=1024),
    Model("embed-english-light-v3.0", ("embed", "classify"), 512, embedding_dim=384),
    Model("embed-english-v2.0", ("embed", "classify"), 512, embedding_dim=4096, deprecated=True),
    Model("rerank-v3.5", ("rerank",), 4096),
    Model("rerank-english-v3.0", ("rerank",), 4096),
    Model("rerank-multilingual-v3.0", ("rerank",), 4096),
)
_BY_NAME = {m.name: m for m in MODELS}

# What Cohere uses when a v1 request names no model.
DEFAULT_CHAT_MODEL = "command-r-plus-08-2024"
DEFAULT_GENERATE_MODEL = "command"
DEFAULT_EMBED_MODEL = "embed-english-v2.0"
DEFAULT_RERANK_MODEL = "rerank-english-v3.0"
DEFAULT_CLASSIFY_MODEL = "embed-english-v2.0"


def lookup(name: str, endpoint: str | None = None) -> Model:
    """The model called `name`, which must serve `endpoint`; 404 (as Cohere) otherwise."""
    model = _BY_NAME.get(name)
    if model is None:
        raise ApiError(
            404,
            f"model '{name}' not found, make sure the correct model ID was used and that you have "
            "access to the model.",
        )
    if endpoint is not None and endpoint not in model.endpoints:
        raise ApiError(
            400,
            f"invalid request: model '{name}' does not support {endpoint}; use one of the "
            f"{endpoint} models listed by GET /v1/models?endpoint={endpoint}",
        )
    return model


def model_json(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "is_deprecated": model.deprecated,
        "endpoints": list(model.endpoints),
        "finetuned": False,
        "context_length": model.context_length,
        "tokenizer_url": TOKENIZER_URL.format(name=model.name),
        "default_endpoints": [],
        "features": ["tools", "json_mode"] if "chat" in model.endpoints else [],
    }


def list_models(endpoint: str | None = None) -> dict[str, Any]:
    return {"models": [model_json(m) for m in MODELS if endpoint is None or endpoint in m.endpoints]}
