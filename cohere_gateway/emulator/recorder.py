"""The last requests the emulator received, for tests that must prove what reached "upstream"."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

MAX_RECORDED = 200


class Recorder:
    def __init__(self, size: int = MAX_RECORDED) -> None:
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)

    def record(
        self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes
    ) -> dict[str, Any]:
        """Store one request; returns its entry so the caller can add the status it answered."""
        merged: dict[str, str] = {}
        for name, value in headers:
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        entry: dict[str, Any] = {
            "time": time.time(),
            "method": method,
            "path": path,
            "query": query,
            "headers": merged,  # names lower-cased; repeated headers joined with ", "
            "body": body.decode("utf-8", errors="replace"),
            "status": None,
        }
        self._entries.append(entry)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        return list(self._entries)

    def clear(self) -> int:
        n = len(self._entries)
        self._entries.clear()
        return n
