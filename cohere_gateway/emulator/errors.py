"""Errors as Cohere sends them: a status and a JSON body `{"id": "<uuid>", "message": "..."}`."""

from __future__ import annotations

import uuid
from typing import Any


class ApiError(Exception):
    """Raised by request parsing and handlers; the server turns it into Cohere's error response."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_body(message: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "message": message}


def bad_request(message: str) -> ApiError:
    return ApiError(400, f"invalid request: {message}")


def not_found(message: str) -> ApiError:
    return ApiError(404, message)
