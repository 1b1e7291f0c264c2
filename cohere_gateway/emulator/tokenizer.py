"""`/v1/tokenize` and `/v1/detokenize` with the counting rule of tokens.py.

Token ids are a 31-bit hash of the token string, the same in every process; detokenize reads them back
through the strings this process has tokenized, so an id the emulator never handed
out is a 400 saying so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from cohere.types import DetokenizeResponse, TokenizeResponse

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result
from cohere_gateway.emulator.shapes import checked
from cohere_gateway.emulator.tokens import split_tokens

MAX_TEXT_CHARS = 65536
MAX_VOCABULARY = 1_000_000
_vocabulary: dict[int, str] = {}


def token_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF


def encode(text: str) -> tuple[list[int], list[str]]:
    strings = split_tokens(text)
    ids = [token_id(s) for s in strings]
    if len(_vocabulary) < MAX_VOCABULARY:
        _vocabulary.update(zip(ids, strings, strict=True))
    return ids, strings


def decode(ids: list[int]) -> str:
    unknown = [i for i in ids if i not in _vocabulary]
    if unknown:
        raise bad_request(
            f"unknown token id(s) {unknown[:5]}: the emulator detokenizes only ids it returned from "
            "/v1/tokenize"
        )
    return "".join(_vocabulary[i] for i in ids)


def tokenize(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    text = fields.require_str(body, "text")
    if len(text) > MAX_TEXT_CHARS:
        raise bad_request(f"text must be at most {MAX_TEXT_CHARS} characters, got {len(text)}")
    catalog.lookup(fields.require_str(body, "model"))
    ids, strings = encode(text)
    response = {"tokens": ids, "token_strings": strings, "meta": {"api_version": {"version": "1"}}}
    return JsonResult(checked(TokenizeResponse, response))


def detokenize(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    ids = fields.require_list(body, "tokens")
    for i, value in enumerate(ids):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"tokens[{i}] must be an integer token id")
    catalog.lookup(fields.require_str(body, "model"))
    response = {"text": decode(ids), "meta": {"api_version": {"version": "1"}}}
    return JsonResult(checked(DetokenizeResponse, response))
