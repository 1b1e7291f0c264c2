"""Gateway-held Cohere keys (BYOK) end to end: the emulator accepts only the held key, apps send only the
gateway token (the official SDK included), events carry the held key's fingerprint, and the key is
nowhere in what the gateway writes: events on a real Kafka, its log at debug level, its data directory
(the spool of a gateway whose Kafka is down, the cache)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import cohere
import httpx
import pytest

from cohere_gateway.events import api_key_fingerprint
from tests.fixtures.emulator import start_emulator
from tests.fixtures.gateway import EventReader, GatewayProcess, free_port, start_gateway
from tests.fixtures.kafka import create_topic

HELD_KEY = "heldkey" + uuid.uuid4().hex  # what only the gateway knows
TOKEN = "gw-token-" + uuid.uuid4().hex
GATEWAY_AUTH = {"cf-aig-authorization": f"Bearer {TOKEN}"}
CHAT = {"model": "command-r", "messages": [{"role": "user", "content": "hello"}]}


def config(path: Path, keyfile: Path) -> Path:
    keyfile.write_text(HELD_KEY + "\n")
    keyfile.chmod(0o600)
    path.write_text(
        '[gateways."acct/*"]\n'
        f'tokens = ["{TOKEN}"]\n'
        'provider_key = { env = "BYOK_TEST_KEY" }\n'
        '[gateways."acct/filed"]\n'
        f'provider_key = {{ file = "{keyfile}" }}\n'
        '[gateways."open/*"]\n'
        'provider_key = { env = "BYOK_TEST_KEY" }\n'  # no token: refused, never lent out
    )
    return path


@pytest.fixture(scope="module")
def held(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, GatewayProcess, EventReader, Path]]:
    tmp = tmp_path_factory.mktemp("byok")
    cfg = config(tmp / "gateways.toml", tmp / "cohere.key")
    topic = create_topic(kafka_bootstrap, f"byok-{uuid.uuid4().hex[:8]}")
    mp = pytest.MonkeyPatch()
    mp.setenv("BYOK_TEST_KEY", HELD_KEY)  # the gateway process inherits it
    with start_emulator("--api-key", HELD_KEY) as upstream:
        gw = start_gateway(upstream, kafka_bootstrap, topic, transparent=False, config=str(cfg),
                           log_payloads=True, log_level="debug")  # fmt: skip
        reader = EventReader(kafka_bootstrap, topic)
        try:
            yield upstream, gw, reader, cfg
        finally:
            reader.close()
            gw.stop()
            mp.undo()


def _upstream_auth(upstream: str, cid: str) -> list[str]:
    entries = httpx.get(upstream + "/__emulator/requests", timeout=5).json()["requests"]
    return [e["headers"].get("authorization", "") for e in entries if cid in e["body"]]


def test_apps_need_only_the_gateway_token(held: tuple[str, GatewayProcess, EventReader, Path]) -> None:
    upstream, gw, events, _ = held
    cids = []
    for gateway, extra in (("prod", {}), ("filed", {}), ("prod", {"Authorization": "Bearer app-own-key-123"}),
                           ("prod", {"cf-aig-max-attempts": "2"})):  # fmt: skip
        cid = "byok-" + uuid.uuid4().hex
        cids.append(cid)
        body = {**CHAT, "messages": [{"role": "user", "content": cid}]}
        resp = httpx.post(gw.base("acct", gateway) + "/cohere/v2/chat", json=body, timeout=30,
                          headers={**GATEWAY_AUTH, "cf-aig-event-id": cid, **extra})  # fmt: skip
        assert resp.status_code == 200, resp.text
        # whatever the app sent, upstream saw the held key alone
        assert _upstream_auth(upstream, cid) == [f"Bearer {HELD_KEY}"]
    # the official SDK: a placeholder api_key (it insists on one), the gateway token as a default header
    sdk_client = httpx.Client(
        headers={"cf-aig-authorization": f"Bearer {TOKEN}", "cf-aig-event-id": "byok-sdk"}
    )
    co = cohere.ClientV2(api_key="-", base_url=gw.base("acct", "sdk") + "/cohere", httpx_client=sdk_client)
    assert co.chat(**CHAT).message.content[0].text
    assert [e.type for e in co.chat_stream(**CHAT)][-1] == "message-end"
    found = events.wait_until(lambda e: e.client_event_id in (*cids, "byok-sdk"), len(cids) + 2)
    assert {e.api_key_fingerprint for e in found} == {api_key_fingerprint(HELD_KEY)}
    assert {e.outcome for e in found} == {"ok"}


def test_without_the_gateway_token_nothing_reaches_upstream(
    held: tuple[str, GatewayProcess, EventReader, Path],
) -> None:
    upstream, gw, _, _ = held
    cid = "byok-denied-" + uuid.uuid4().hex
    resp = httpx.post(gw.base("acct", "prod") + "/cohere/v2/chat", timeout=30,
                      json={**CHAT, "messages": [{"role": "user", "content": cid}]})  # fmt: skip
    assert resp.status_code == 401
    # a gateway that holds a key but asks for no token refuses, rather than lending the key to anyone
    resp = httpx.post(gw.base("open", "x") + "/cohere/v2/chat", timeout=30,
                      json={**CHAT, "messages": [{"role": "user", "content": cid}]})  # fmt: skip
    assert resp.status_code == 403 and "requires no gateway token" in resp.json()["message"]
    assert _upstream_auth(upstream, cid) == []


def _holds_key(root: Path) -> list[Path]:
    needle = HELD_KEY.encode()
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_key_is_nowhere_in_events_logs_or_spool(
    held: tuple[str, GatewayProcess, EventReader, Path], kafka_bootstrap: str, tmp_path: Path
) -> None:
    upstream, gw, events, cfg = held
    # a payload that quotes the key, and an upstream error: neither may carry it into an event
    cid = "byok-quote-" + uuid.uuid4().hex
    resp = httpx.post(gw.base("acct", "prod") + "/cohere/v2/chat", timeout=30,
                      json={**CHAT, "messages": [{"role": "user", "content": f"{cid} {HELD_KEY}"}]},
                      headers={"cf-aig-authorization": f"Bearer {TOKEN}", "cf-aig-event-id": cid,
                               "X-Emulator-Fault": "status=500"})  # fmt: skip
    assert resp.status_code == 500
    events.wait_until(lambda e: e.client_event_id == cid)
    assert all(HELD_KEY.encode() not in value for _, value in events.raw)
    assert HELD_KEY not in gw.log_text()
    assert _holds_key(gw.data_dir) == []

    # a gateway whose Kafka is down keeps its events in the spool: without the key
    mp = pytest.MonkeyPatch()
    mp.setenv("BYOK_TEST_KEY", HELD_KEY)
    down = start_gateway(upstream, f"127.0.0.1:{free_port()}", "byok-down", transparent=False,
                         config=str(cfg), log_payloads=True, log_level="debug",
                         data_dir=tmp_path / "gw")  # fmt: skip
    try:
        for _ in range(3):
            resp = httpx.post(down.base("acct", "prod") + "/cohere/v2/chat", json=CHAT, timeout=30,
                              headers={"cf-aig-authorization": f"Bearer {TOKEN}"})  # fmt: skip
            assert resp.status_code == 200
        spool = tmp_path / "gw" / "spool"
        deadline = time.monotonic() + 20
        while not any(p.stat().st_size for p in spool.rglob("*") if p.is_file()):
            assert time.monotonic() < deadline, "nothing spooled"
            time.sleep(0.1)
    finally:
        down.stop()
        mp.undo()
    assert _holds_key(tmp_path / "gw") == []
