"""Classifying how an exchange ended: upstream statuses and proxy-level failures -> (outcome, error_type)."""

from __future__ import annotations

# Cohere's documented error statuses (the SDK maps each to a typed error) and the usual 5xx.
COHERE_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "payload_too_large",
    422: "unprocessable_entity",
    429: "rate_limited",
    498: "invalid_token",
    499: "request_cancelled",
    500: "internal_server_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def classify_status(status: int) -> tuple[str, str | None]:
    """Outcome and error type of a complete upstream response."""
    if status < 400:
        return "ok", None
    kind = COHERE_ERRORS.get(status) or ("client_error" if status < 500 else "server_error")
    return "upstream_error", kind


def classify_proxy_error(message: str, got_response: bool) -> tuple[str, str]:
    """Outcome and error type from mitmproxy's error message of a flow that did not complete.

    mitmproxy reports a client that went away as "Client disconnected."; everything else is on the
    upstream side: refused/unresolvable connections before a response, a cut stream after one.
    """
    low = message.lower()
    if low.startswith("client disconnected") or "client closed" in low:
        return "client_aborted", "client_disconnected"
    if "timed out" in low or "timeout" in low:
        return "upstream_timeout", "upstream_timeout"
    if got_response:
        return "upstream_error", "upstream_disconnected"
    return "upstream_error", "connection_failed"
