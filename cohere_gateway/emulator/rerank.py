"""Reranking: `/v1/rerank` and `/v2/rerank`.

relevance_score = 0.9 x (share of the query's distinct words found in the document) + 0.1 x a fraction
derived from the SHA-256 of query and document, so scores are in [0, 1], deterministic and mostly
follow word overlap. Search units = max(1, ceil(len(documents) / 100)).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from cohere.types import RerankResponse
from cohere.v2.types import V2RerankResponse

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.chat import new_id
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.results import JsonResult, Result
from cohere_gateway.emulator.shapes import checked
from cohere_gateway.emulator.tokens import search_units

MAX_DOCUMENTS = 1000
_WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def relevance(query: str, document: str) -> float:
    wanted = words(query)
    overlap = len(wanted & words(document)) / len(wanted) if wanted else 0.0
    jitter = int.from_bytes(hashlib.sha256(f"{query}\0{document}".encode()).digest()[:4], "big") / 2**32
    return round(0.9 * overlap + 0.1 * jitter, 6)


def _document_text(doc: Any, i: int) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict) and isinstance(doc.get("text"), str):
        return doc["text"]
    raise bad_request(f"documents[{i}] must be a string or an object with a 'text' string")


def _rerank(body: dict[str, Any], model: str, version: str, return_documents: bool) -> dict[str, Any]:
    catalog.lookup(model, "rerank")
    query = fields.require_str(body, "query")
    docs = [_document_text(d, i) for i, d in enumerate(fields.require_list(body, "documents"))]
    if len(docs) > MAX_DOCUMENTS:
        raise bad_request(f"at most {MAX_DOCUMENTS} documents per call, got {len(docs)}")
    top_n = fields.optional_int(body, "top_n", minimum=1) or len(docs)
    ranked = sorted(((relevance(query, d), i) for i, d in enumerate(docs)), key=lambda p: (-p[0], p[1]))
    results = []
    for score, i in ranked[:top_n]:
        item: dict[str, Any] = {"index": i, "relevance_score": score}
        if return_documents:
            item["document"] = {"text": docs[i]}
        results.append(item)
    return {
        "id": new_id(),
        "results": results,
        "meta": {
            "api_version": {"version": version},
            "billed_units": {"search_units": search_units(len(docs))},
        },
    }


def rerank_v1(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    model = fields.optional_str(body, "model") or catalog.DEFAULT_RERANK_MODEL
    response = _rerank(body, model, "1", fields.optional_bool(body, "return_documents"))
    return JsonResult(checked(RerankResponse, response))


def rerank_v2(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    response = _rerank(body, fields.require_str(body, "model"), "2", False)
    return JsonResult(checked(V2RerankResponse, response))
