"""Classification: `/v1/classify`.

Each label scores 1 + the number of words its examples share with the input; confidences are the
scores normalised to sum to 1; the prediction is the best label (first in example order on ties).
Billed classifications = len(inputs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cohere.types import ClassifyResponse

from cohere_gateway.emulator import catalog, fields
from cohere_gateway.emulator.chat import new_id
from cohere_gateway.emulator.errors import bad_request
from cohere_gateway.emulator.rerank import words
from cohere_gateway.emulator.results import JsonResult, Result
from cohere_gateway.emulator.shapes import checked

MAX_INPUTS = 96


def _examples(body: dict[str, Any]) -> dict[str, set[str]]:
    """Label -> the words of its examples, labels in first-seen order."""
    labels: dict[str, set[str]] = {}
    for i, example in enumerate(fields.optional_list(body, "examples")):
        if not (
            isinstance(example, dict)
            and isinstance(example.get("text"), str)
            and isinstance(example.get("label"), str)
        ):
            raise bad_request(f"examples[{i}] must be an object with a 'text' and a 'label' string")
        labels.setdefault(example["label"], set()).update(words(example["text"]))
    if len(labels) < 2:
        raise bad_request(
            "examples must name at least 2 different labels (the emulator has no fine-tuned classifiers)"
        )
    return labels


def classify_one(text: str, labels: dict[str, set[str]]) -> dict[str, Any]:
    input_words = words(text)
    scores = {label: 1 + len(input_words & vocab) for label, vocab in labels.items()}
    total = sum(scores.values())
    confidences = {label: round(score / total, 6) for label, score in scores.items()}
    prediction = max(labels, key=lambda label: scores[label])
    return {
        "id": new_id(),
        "input": text,
        "prediction": prediction,
        "predictions": [prediction],
        "confidence": confidences[prediction],
        "confidences": [confidences[prediction]],
        "labels": {label: {"confidence": c} for label, c in confidences.items()},
        "classification_type": "single-label",
    }


def classify(body: dict[str, Any], headers: Mapping[str, str]) -> Result:
    inputs = fields.str_items(fields.require_list(body, "inputs"), "inputs")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"at most {MAX_INPUTS} inputs per call, got {len(inputs)}")
    catalog.lookup(fields.optional_str(body, "model") or catalog.DEFAULT_CLASSIFY_MODEL, "classify")
    labels = _examples(body)
    response = {
        "id": new_id(),
        "classifications": [classify_one(text, labels) for text in inputs],
        "meta": {"api_version": {"version": "1"}, "billed_units": {"classifications": len(inputs)}},
    }
    return JsonResult(checked(ClassifyResponse, response))
