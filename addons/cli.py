"""`cohere-gateway proxy`: run mitmdump in-process with the gateway addon and its listeners."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import urlsplit

import click

from cohere_gateway import settings as s

# Flags that shape mitmproxy itself rather than being options of the addon.
_MITMPROXY_ONLY = frozenset({"host", "port", "transparent_port", "data_dir", "log_level"})


def mitmdump_args(cfg: s.ProxySettings) -> list[str]:
    """The mitmdump command line for these settings (addon options travel as environment variables)."""
    up = urlsplit(cfg.upstream)
    if up.scheme not in ("http", "https") or not up.hostname:
        raise click.BadParameter(f"expected an http(s) URL, got {cfg.upstream!r}", param_hint="--upstream")
    # The reverse target is only mitmproxy's default; the addon sets the destination of every request.
    args = ["--mode", f"reverse:{up.scheme}://{up.netloc}@{cfg.host}:{cfg.port}"]
    if cfg.transparent_port:
        args += ["--mode", f"regular@{cfg.host}:{cfg.transparent_port}"]
    args += [
        "-s",
        str(Path(__file__).with_name("gateway.py")),
        "--set",
        f"confdir={cfg.data_dir / 'mitmproxy'}",
        "--set",
        "connection_strategy=lazy",  # never connect to a CONNECT target before the addon routed it
        "--set",
        "flow_detail=0",  # mitmdump's own per-flow printing: costs CPU and would print URLs
        "--set",
        "block_global=false",  # the gateway decides who may use it (gateway_token), not the peer address
        "--set",
        f"termlog_verbosity={cfg.log_level}",
    ]
    return args


def addon_environment(cfg: s.ProxySettings) -> dict[str, str]:
    """Addon options as COHERE_GATEWAY_* variables, read by the addon's option defaults - so the gateway
    token never appears on a command line."""
    env = {}
    for f in dataclasses.fields(cfg):
        if f.name in _MITMPROXY_ONLY:
            continue
        value = getattr(cfg, f.name)
        env[s.env_name(s.ProxySettings, f.name)] = (
            ("true" if value else "false") if isinstance(value, bool) else str(value)
        )
    return env


@click.command()
@s.click_options(s.ProxySettings)
def proxy(**kwargs: object) -> None:
    """Run the gateway: Cloudflare-compatible routes on --port, an optional forward proxy on
    --transparent-port, events to Kafka.

    \b
    SDK:          cohere.ClientV2(base_url="http://HOST:PORT/v1/ACCOUNT/GATEWAY/cohere")
    OpenAI SDK:   OpenAI(base_url="http://HOST:PORT/v1/ACCOUNT/GATEWAY/compat"), model="cohere/command-r"
    Forward mode: HTTPS_PROXY=http://HOST:TPORT SSL_CERT_FILE=DATA_DIR/mitmproxy/mitmproxy-ca-cert.pem
    Health:       GET /healthz, Prometheus counters: GET /metrics (on --port)
    """
    from mitmproxy.tools.main import mitmdump

    cfg: s.ProxySettings = s.from_kwargs(s.ProxySettings, kwargs)
    (cfg.data_dir / "mitmproxy").mkdir(parents=True, exist_ok=True)
    args = mitmdump_args(cfg)
    os.environ.update(addon_environment(cfg))
    click.echo(
        f"cohere-gateway: gateway on http://{cfg.host}:{cfg.port} -> {cfg.upstream}"
        + (f", forward proxy on {cfg.host}:{cfg.transparent_port}" if cfg.transparent_port else ""),
        err=True,
    )
    mitmdump(args)
