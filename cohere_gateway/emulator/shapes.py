"""Check every payload against the official SDK's own pydantic types before it is sent.

The payloads are plain dicts (the SDK's models would turn integer token counts into floats such as
`12.0`, which Cohere never sends); validating them against the SDK types keeps their shapes right by
construction: a wrong field name or type fails here, in the emulator's tests, not in a client.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import TypeAdapter


@functools.cache
def _adapter(type_: Any) -> TypeAdapter[Any]:
    return TypeAdapter(type_)


def checked(type_: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload`, after validating it as `type_` (raises pydantic.ValidationError if it does not fit)."""
    _adapter(type_).validate_python(payload)
    return payload
