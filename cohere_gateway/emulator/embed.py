"""Embeddings: `/v1/embed` and `/v2/embed`.

Vectors are deterministic (seeded by model and text), unit length, of the model's dimension (or
`output_dimension` for embed-v4.0). Billed input tokens = sum of the texts' tokens; images count in
`billed_units.images`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import random
import struct
from collections.abc import Mapping
from typing import Any

from cohere.types import EmbedByTypeResponse, EmbedResponse

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.chat import new_id
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result
from cohere_gateway.emulator.shapes import checked
from cohere_gateway.emulator.tokens import count_all

EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary", "base64")
OUTPUT_DIMENSIONS = (256, 512, 1024, 1536)
MAX_TEXTS = 96


# Image tokens Embed v4 bills per image input (see _embed).
IMAGE_TOKENS = 1610


@functools.lru_cache(maxsize=4096)
def vector(model: str, text: str, dim: int) -> tuple[float, ...]:
    rng = random.Random(hashlib.sha256(f"{model}\0{text}".encode()).digest())
    raw = [rng.random() * 2 - 1 for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return tuple(round(x / norm, 6) for x in raw)


def _packed_bits(vec: tuple[float, ...]) -> list[int]:
    out = []
    for i in range(0, len(vec), 8):
        byte = 0
        for x in vec[i : i + 8]:
            byte = byte << 1 | (x > 0)
        out.append(byte)
    return out


def by_type(vectors: list[tuple[float, ...]], kind: str) -> list[Any]:
    if kind == "float":
        return [list(v) for v in vectors]
    if kind == "int8":
        return [[max(-128, min(127, round(x * 127 * 8))) for x in v] for v in vectors]
    if kind == "uint8":
        return [[max(0, min(255, round(x * 127 * 8) + 128)) for x in v] for v in vectors]
    if kind == "ubinary":
        return [_packed_bits(v) for v in vectors]
    if kind == "binary":
        return [[b - 128 for b in _packed_bits(v)] for v in vectors]
    return [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in vectors]


def _texts(body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Texts and images of the request: `texts`, `images`, or v2 `inputs[].content[]` parts."""
    texts = fields.str_items(fields.optional_list(body, "texts"), "texts")
    images = fields.str_items(fields.optional_list(body, "images"), "images")
    for i, item in enumerate(fields.optional_list(body, "inputs")):
        parts = item.get("content") if isinstance(item, dict) else None
        if not isinstance(parts, list):
            raise bad_request(f"inputs[{i}] must be an object with a 'content' list")
        text = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and p.get("type") == "text")
        urls = [p["image_url"] for p in parts if isinstance(p, dict) and p.get("type") == "image_url"]
        if text:
            texts.append(text)
        else:
            images.extend(str(u) for u in urls)
    if not texts and not images:
        raise bad_request("send the strings to embed in 'texts' (or 'images' / 'inputs')")
    if len(texts) + len(images) > MAX_TEXTS:
        raise bad_request(f"at most {MAX_TEXTS} texts per call, got {len(texts) + len(images)}")
    return texts, images


def _types(body: dict[str, Any], default: list[str] | None) -> list[str] | None:
    kinds = fields.str_items(fields.optional_list(body, "embedding_types"), "embedding_types") or default
    for kind in kinds or []:
        if kind not in EMBEDDING_TYPES:
            raise bad_request(f"embedding_types: {kind!r} is not one of {', '.join(EMBEDDING_TYPES)}")
    return kinds


def _embed(body: dict[str, Any], model: str, version: str, kinds: list[str] | None) -> dict[str, Any]:
    spec = catalog.lookup(model, "embed")
    dim = spec.embedding_dim or 1024
    if (wanted := fields.optional_int(body, "output_dimension")) is not None:
        if model != "embed-v4.0" or wanted not in OUTPUT_DIMENSIONS:
            raise bad_request(
                f"output_dimension {wanted} is not supported by {model}; embed-v4.0 takes one of "
                f"{', '.join(map(str, OUTPUT_DIMENSIONS))}"
            )
        dim = wanted
    texts, images = _texts(body)
    vectors = [vector(model, t, dim) for t in [*texts, *images]]
    billed: dict[str, int] = {"input_tokens": count_all(texts)}
    if images and model.startswith("embed-v4"):
        # Embed v4 bills image tokens (about 1,610 for a 512 x 512 image); the emulator does not decode
        # images, so every image counts that much.
        billed["image_tokens"] = IMAGE_TOKENS * len(images)
    elif images:
        billed["images"] = len(images)
    response: dict[str, Any] = {
        "id": new_id(),
        "texts": texts,
        "meta": {"api_version": {"version": version}, "billed_units": billed},
    }
    if kinds is None:
        response["embeddings"] = [list(v) for v in vectors]
        response["response_type"] = "embeddings_floats"
    else:
        response["embeddings"] = {kind: by_type(vectors, kind) for kind in kinds}
        response["response_type"] = "embeddings_by_type"
    return response


def embed_v1(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    model = fields.optional_str(body, "model") or catalog.DEFAULT_EMBED_MODEL
    response = _embed(body, model, "1", _types(body, None))
    return JsonResult(checked(EmbedResponse, response))


def embed_v2(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    model = fields.require_str(body, "model")
    if model != catalog.DEFAULT_EMBED_MODEL:  # v3+ models need to know what the text is for
        fields.require_str(body, "input_type")
    response = _embed(body, model, "2", _types(body, ["float"]))
    return JsonResult(checked(EmbedByTypeResponse, response))
