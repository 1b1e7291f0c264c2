"""The per-gateway configuration (addons/gateway_config.py): validation errors, resolution, hot reload,
and `cohere-gateway config check`. Pure functions and a real file; the running gateway's reload is in
tests/test_cache.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cohere_gateway.addons import gateway_config as gc
from cohere_gateway.addons.headers import check_gateway_token
from cohere_gateway.addons.routing import RouteError
from cohere_gateway.cli import main

BASE = gc.GatewayPolicy(tokens=("flag-token-123",), log_payloads=True, payload_max_bytes=100)

GOOD = """
[gateways."*/*"]
log_payloads = false

[gateways."acme/*"]
tokens = ["acme-token-1"]
cache = { enabled = true, ttl = 3600 }

[gateways."*/prod"]
max_metadata_entries = 2

[gateways."acme/prod"]
allow_log_opt_out = false
[gateways."acme/prod".cache]
ttl = 120

[gateways."team-*/gw"]
payload_max_bytes = 7
"""


def test_no_file_means_the_flags() -> None:
    cfg = gc.GatewayConfig(BASE)
    assert cfg.resolve("any", "gw") == BASE


def test_entries_apply_least_specific_first_key_by_key() -> None:
    cfg = gc.parse(GOOD, "gw.toml", BASE)
    prod = cfg.resolve("acme", "prod")
    assert prod.tokens == ("acme-token-1",)  # from acme/*
    assert prod.log_payloads is False  # from */*
    assert prod.allow_log_opt_out is False  # from acme/prod
    assert prod.max_metadata_entries == 2  # from */prod
    assert prod.cache == gc.CachePolicy(enabled=True, ttl_s=120)  # enabled from acme/*, ttl overridden
    other = cfg.resolve("beta", "dev")
    assert other.tokens == ("flag-token-123",) and other.payload_max_bytes == 100 and not other.cache.enabled
    assert cfg.resolve("team-x", "gw").payload_max_bytes == 7
    assert cfg.resolve("team", "gw").payload_max_bytes == 100  # the glob needs the dash


@pytest.mark.parametrize(
    ("text", "line", "key", "says"),
    [
        ('[gateways."a/b"]\ncache = { ttl = 30 }\n', 2, 'gateways."a/b".cache.ttl', "60..2592000"),
        ('[gateways."a/b"]\n\n[gateways."a/b".cache]\nttl = "1h"\n', 4, 'gateways."a/b".cache.ttl', "'1h'"),
        ('[gateways."a/b"]\nlog_payload = true\n', 2, 'gateways."a/b".log_payload', "allowed: tokens"),
        ('[gateways."a/b"]\nlog_payloads = "yes"\n', 2, 'gateways."a/b".log_payloads', "true or false"),
        ('[gateways."ab"]\nlog_payloads = true\n', 1, 'gateways."ab"', "ACCOUNT/GATEWAY"),
        ('[gateways."a/b c"]\n', 1, 'gateways."a/b c"', "ACCOUNT/GATEWAY"),
        ('[gateways."a/b"]\nmax_metadata_entries = 6\n', 2, "max_metadata_entries", "0..5"),
        ('[gateways."a/b"]\nrate_limits = [{ limit = 10 }]\n', 2, "rate_limits[0]", "and window"),
        ('[gateways."a/b"]\ntokens_env = ["NOT_SET_ANYWHERE_X"]\n', 2, "tokens_env", "NOT_SET_ANYWHERE_X"),
        ('version = 2\n[gateways."a/b"]\n', 1, "version", "unknown top-level key"),
        ('[gateways."a/b"\nx = 1\n', 1, "", "not valid TOML"),
    ],
)
def test_errors_name_file_line_key_and_what_is_allowed(text: str, line: int, key: str, says: str) -> None:
    with pytest.raises(gc.ConfigError) as info:
        gc.parse(text, "gw.toml", BASE, env={})
    err = info.value
    assert (err.file, err.line) == ("gw.toml", line), str(err)
    assert key in err.key and says in str(err), str(err)
    assert str(err).startswith(f"gw.toml:{line}: ")


def test_a_bad_token_is_never_echoed() -> None:
    with pytest.raises(gc.ConfigError) as info:
        gc.parse('[gateways."a/b"]\ntokens = ["short"]\n', "gw.toml", BASE)
    assert "short" not in str(info.value)


def test_tokens_from_the_environment() -> None:
    cfg = gc.parse('[gateways."a/b"]\ntokens_env = ["GW_T"]\n', "f", BASE, env={"GW_T": "from-env-token"})
    assert cfg.resolve("a", "b").tokens == ("from-env-token",)


def test_check_token_accepts_any_of_the_gateways_tokens() -> None:
    check_gateway_token(None, ())
    check_gateway_token("Bearer two-token-2", ("one-token-1", "two-token-2"))
    for presented in (None, "Bearer nope", "Basic two-token-2", "two-token-2"):
        with pytest.raises(RouteError) as info:
            check_gateway_token(presented, ("one-token-1", "two-token-2"))
        assert info.value.status == 401


def test_check_metadata_uses_the_gateways_limit() -> None:
    policy = gc.GatewayPolicy(max_metadata_entries=1)
    gc.check_metadata({"a": "1"}, policy)
    with pytest.raises(RouteError, match="at most 1"):
        gc.check_metadata({"a": "1", "b": "2"}, policy)


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    st = path.stat()  # a rewrite within one mtime tick must still be seen as a change
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_watcher_reloads_and_keeps_the_old_config_on_a_bad_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "gw.toml"
    _write(path, '[gateways."a/b"]\nlog_payloads = false\n')
    watcher = gc.ConfigWatcher(path, BASE)
    assert watcher.current.resolve("a", "b").log_payloads is False
    assert watcher.check() is False  # unchanged
    _write(path, "")  # an editor's truncate before its write: valid TOML, never taken
    assert watcher.check() is False
    _write(path, '[gateways."a/b"]\nlog_payloads = true\n')
    assert watcher.check() is False  # changed again: taken once it has stayed so for one check
    assert watcher.check() is True and watcher.current.resolve("a", "b").log_payloads is True
    with caplog.at_level(logging.ERROR, "cohere_gateway.config"):
        _write(path, '[gateways."a/b"]\nlog_payloads = 3\n')
        assert (watcher.check(), watcher.check()) == (False, False)
        path.unlink()
        assert (watcher.check(), watcher.check()) == (False, False)
    assert watcher.current.resolve("a", "b").log_payloads is True
    assert watcher.counters == {"reloaded": 1, "refused": 2}
    assert "gw.toml:2: " in caplog.text and "is gone" in caplog.text


def test_config_check_command(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD)
    bad.write_text('[gateways."a/b"]\ncache = { ttl = 5 }\n')
    ok = CliRunner().invoke(main, ["config", "check", str(good)])
    assert ok.exit_code == 0, ok.output
    assert "OK, 5 entries" in ok.output and "acme/*: tokens=1 token(s)" in ok.output
    assert "acme-token-1" not in ok.output
    failed = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert failed.exit_code == 1
    assert f'{bad}:2: gateways."a/b".cache.ttl: expected an integer number of seconds' in failed.output
