"""Retries and the request timeout: the policy (gateway defaults, `cf-aig-*` overrides) and its arithmetic.

Cloudflare AI Gateway's headers: `cf-aig-request-timeout` (ms until the first part of the response),
`cf-aig-max-attempts` (1..5), `cf-aig-retry-delay` (ms, at most 5000) and `cf-aig-backoff`
(`constant` | `linear` | `exponential`). Pure functions; the attempts themselves are made by
addons/relay.py.
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass

from cohere_gateway.addons.routing import RouteError

MAX_ATTEMPTS = 5
MAX_RETRY_DELAY_MS = 5000
# A request timeout longer than this is a typo (an hour in ms): refused with the range.
MAX_REQUEST_TIMEOUT_MS = 3_600_000
BACKOFFS = ("constant", "linear", "exponential")
# An upstream asking to be left alone longer than the longest delay the gateway may wait: its answer goes
# to the client (with its retry-after) rather than holding the client that long.
MAX_RETRY_AFTER_S = MAX_RETRY_DELAY_MS / 1000

TIMEOUT_HEADER = "cf-aig-request-timeout"
ATTEMPTS_HEADER = "cf-aig-max-attempts"
DELAY_HEADER = "cf-aig-retry-delay"
BACKOFF_HEADER = "cf-aig-backoff"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 1  # 1: no retry
    delay_ms: int = 0  # before the first retry; the backoff scales it for the later ones
    backoff: str = "constant"
    timeout_ms: int | None = None  # per attempt, to the response's headers; None: wait as long as it takes

    @property
    def active(self) -> bool:
        """Whether the gateway must make the upstream call itself (mitmproxy has no read timeout)."""
        return self.max_attempts > 1 or self.timeout_ms is not None


def retryable(status: int) -> bool:
    """429 and 5xx: the upstream may answer differently next time. Everything else is the request's."""
    return status == 429 or 500 <= status <= 599


def backoff_delay_s(policy: RetryPolicy, retry: int) -> float:
    """Seconds before retry number `retry` (1 for the first retry)."""
    base = policy.delay_ms / 1000
    if policy.backoff == "linear":
        return base * retry
    if policy.backoff == "exponential":
        return base * 2 ** (retry - 1)
    return base


def retry_after_s(value: str | None, now: float) -> float | None:
    """An upstream `retry-after` (delay-seconds or an HTTP date) in seconds from `now`; None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None or when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - now)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def next_delay_s(policy: RetryPolicy, retry: int, retry_after: float | None) -> float | None:
    """How long to wait before retry number `retry`, or None when the upstream's retry-after is longer
    than the gateway will wait (the answer then goes to the client as it is)."""
    delay = backoff_delay_s(policy, retry)
    if retry_after is None:
        return delay
    if retry_after > MAX_RETRY_AFTER_S:
        return None
    return max(delay, retry_after)


def _int(header: str, value: str, lo: int, hi: int, unit: str) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise RouteError(400, f"invalid {header} header: expected an integer {lo}..{hi} ({unit})")
    return int(text)


def parse_retry_headers(headers: Mapping[str, str], base: RetryPolicy) -> RetryPolicy:
    """The gateway's policy with this request's `cf-aig-*` overrides; a bad value is a 400 naming it."""
    timeout, attempts = base.timeout_ms, base.max_attempts
    delay, backoff = base.delay_ms, base.backoff
    if (raw := headers.get(TIMEOUT_HEADER)) is not None:
        timeout = _int(TIMEOUT_HEADER, raw, 1, MAX_REQUEST_TIMEOUT_MS, "milliseconds")
    if (raw := headers.get(ATTEMPTS_HEADER)) is not None:
        attempts = _int(ATTEMPTS_HEADER, raw, 1, MAX_ATTEMPTS, "attempts")
    if (raw := headers.get(DELAY_HEADER)) is not None:
        delay = _int(DELAY_HEADER, raw, 0, MAX_RETRY_DELAY_MS, "milliseconds")
    if (raw := headers.get(BACKOFF_HEADER)) is not None:
        backoff = raw.strip().lower()
        if backoff not in BACKOFFS:
            raise RouteError(400, f"invalid {BACKOFF_HEADER} header: expected one of {', '.join(BACKOFFS)}")
    return RetryPolicy(max_attempts=attempts, delay_ms=delay, backoff=backoff, timeout_ms=timeout)


def failure_outcome(failure: str) -> tuple[str, str, int]:
    """The event's (outcome, error_type, status) when no attempt got an answer: a timeout is
    `upstream_timeout` (the client got 504); no connection or a body cut short is an upstream error with
    no status, as when mitmproxy reports them itself."""
    if failure == "timeout":
        return "upstream_timeout", "upstream_timeout", 504
    return "upstream_error", failure, 0
