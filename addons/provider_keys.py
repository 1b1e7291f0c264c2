"""Gateway-held Cohere keys (BYOK): the gateway, not the app, holds the key a gateway's requests use.

The key comes from the configuration's `provider_key = { env = "NAME" }` or `{ file = "PATH" }`, read
when the configuration loads (addons/gateway_config.py); apps then send only the gateway token. Whatever
credential a client sent is dropped, so the upstream sees the gateway's key alone and the event records
that key's fingerprint. A gateway that holds a key but asks for no token would lend it to anyone who can
reach the port: such requests are refused.
"""

from __future__ import annotations

from mitmproxy import http

from cohere_gateway.addons.gateway_config import GatewayPolicy
from cohere_gateway.addons.routing import RouteError

CLIENT_CREDENTIALS = ("authorization", "x-api-key")


def use(headers: http.Headers, policy: GatewayPolicy) -> str:
    """Put the gateway's key on the request in place of the client's; returns its fingerprint."""
    key = policy.provider_key
    assert key is not None
    if not any(policy.tokens):
        raise RouteError(
            403,
            "this gateway holds a Cohere API key but requires no gateway token; the operator must set "
            "tokens or tokens_env for it before it serves requests",
        )
    for name in CLIENT_CREDENTIALS:
        headers.pop(name, None)
    headers["authorization"] = f"Bearer {key.key}"
    return key.fingerprint
