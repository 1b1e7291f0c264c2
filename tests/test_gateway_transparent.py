"""Transparent mode: an unchanged app using the cohere SDK with only HTTPS_PROXY and SSL_CERT_FILE set
(mitmproxy's CA from the gateway's data dir). The gateway maps api.cohere.com/.ai to its upstream, here
the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from tests.fixtures.gateway import EventReader, GatewayProcess

APP = r"""
import json, sys
import cohere

co = cohere.ClientV2(api_key=sys.argv[1])  # default base URL: https://api.cohere.com
res = co.chat(model="command-r", messages=[{"role": "user", "content": "hi"}])
meta = {"additional_headers": {"cf-aig-metadata": '{"app": "legacy"}'}}
chunks = list(co.chat_stream(model="command-r", messages=[{"role": "user", "content": "hi"}],
                             request_options=meta))
v1 = cohere.Client(api_key=sys.argv[1], base_url="https://api.cohere.ai")
emb = v1.embed(texts=["a"], model="embed-english-v3.0", input_type="search_query")
print(json.dumps({
    "chat_id": res.id, "chat_out": res.usage.billed_units.output_tokens,
    "stream_id": chunks[0].id, "stream_out": chunks[-1].delta.usage.billed_units.output_tokens,
    "embed_id": emb.id, "embed_in": emb.meta.billed_units.input_tokens,
}))
"""


def test_unchanged_app_through_https_proxy(gateway: GatewayProcess, gateway_events: EventReader,
                                           emulator_requests: Any) -> None:  # fmt: skip
    assert gateway.proxy_url is not None
    api_key = "key-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and k != "CO_API_URL"}
    env |= {"HTTPS_PROXY": gateway.proxy_url, "SSL_CERT_FILE": str(gateway.ca_cert)}
    out = subprocess.run([sys.executable, "-c", APP, api_key], env=env, capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    app = json.loads(out.stdout)

    chat = gateway_events.wait_until(lambda e: e.response_id == app["chat_id"])[0]
    assert (chat.route_mode, chat.account_id, chat.gateway_id) == ("transparent", "default", "default")
    assert (chat.path, chat.usage.output_tokens) == ("/v2/chat", app["chat_out"])
    stream = gateway_events.wait_until(lambda e: e.response_id == app["stream_id"])[0]
    assert stream.stream and stream.usage.output_tokens == app["stream_out"]
    assert stream.metadata == {"app": "legacy"}
    embed = gateway_events.wait_until(lambda e: e.response_id == app["embed_id"])[0]
    assert (embed.path, embed.usage.input_tokens) == ("/v1/embed", app["embed_in"])
    assert len(emulator_requests.all()) == 3  # all three went to the configured upstream


def test_forward_proxy_refuses_other_hosts(gateway: GatewayProcess) -> None:
    assert gateway.proxy_url is not None
    with httpx.Client(proxy=gateway.proxy_url, verify=str(gateway.ca_cert), timeout=10) as client:
        with pytest.raises(httpx.ProxyError) as exc:  # CONNECT answered 403 by the gateway
            client.get("https://example.com/")
        assert "403" in str(exc.value)
        resp = client.get("http://example.com/v1/chat")  # plain-HTTP forward request
        assert resp.status_code == 403 and "api.cohere" in resp.json()["message"]


def test_account_and_gateway_from_headers(gateway: GatewayProcess, gateway_events: EventReader) -> None:
    assert gateway.proxy_url is not None
    cid = "tp-" + uuid.uuid4().hex
    with httpx.Client(proxy=gateway.proxy_url, verify=str(gateway.ca_cert), timeout=10) as client:
        resp = client.post(
            "https://api.cohere.ai/v1/chat", json={"message": "hi", "model": "command-r"},
            headers={"Authorization": "Bearer k", "cf-aig-account-id": "team-a", "cf-aig-gateway-id": "prod",
                     "cf-aig-event-id": cid},
        )  # fmt: skip
    assert resp.status_code == 200
    event = gateway_events.wait_until(lambda e: e.client_event_id == cid)[0]
    assert (event.account_id, event.gateway_id, event.route_mode) == ("team-a", "prod", "transparent")
