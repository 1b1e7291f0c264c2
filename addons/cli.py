"""`cohere-gateway proxy`: mitmproxy with only the addons a gateway needs, plus the gateway addon.

mitmdump loads some thirty default addons and dispatches every hook of every request to each of them;
that dispatch was ~40 % of a bare mitmdump's CPU per request (bench/RESULTS.md). The gateway needs five:
Core (options), Proxyserver (listeners), NextLayer (protocol detection), TlsConfig (certificates for the
forward proxy) and ErrorCheck (start-up errors). `addons/mitmdump_script.py` loads the addon into a stock
`mitmdump -s` for anyone who wants the full chain.

With `--workers N` the command starts N such processes on the same port (SO_REUSEPORT): the kernel
spreads connections over them, so throughput scales with cores.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from cohere_gateway import settings as s


def listen_modes(cfg: s.ProxySettings) -> list[str]:
    up = urlsplit(cfg.upstream)
    if up.scheme not in ("http", "https") or not up.hostname:
        raise click.BadParameter(f"expected an http(s) URL, got {cfg.upstream!r}", param_hint="--upstream")
    # The reverse target is only mitmproxy's default; the addon sets the destination of every request.
    modes = [f"reverse:{up.scheme}://{up.netloc}@{cfg.host}:{cfg.port}"]
    if cfg.transparent_port:
        modes.append(f"regular@{cfg.host}:{cfg.transparent_port}")
    return modes


def addon_environment(cfg: s.ProxySettings) -> dict[str, str]:
    """Addon options as COHERE_GATEWAY_* variables, read by the addon's option defaults (addons/gateway.py),
    so workers get their settings - the gateway token included - without it appearing on a command line."""
    return s.environment(cfg, (name for name, _, _ in s.addon_options()))


def lean_master(modes: list[str], confdir: Path, log_level: str, *extra: Any) -> Any:
    """A mitmproxy Master with the addon chain a gateway needs, plus `extra` addons, configured to listen.

    Every added addon is configured from every option once, as `mitmdump -s` does for a script: an
    options update only announces the options it changed, and the gateway reads its defaults from
    COHERE_GATEWAY_* variables. bench/lean_gateway.py runs this chain without the gateway as a baseline.
    """
    from mitmproxy import hooks, master, options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig

    from cohere_gateway.addons import mitmproxy_seam

    opts = options.Options()
    proxy_master = master.Master(opts, with_termlog=True)
    chain = [core.Core(), proxyserver.Proxyserver(), next_layer.NextLayer(), tlsconfig.TlsConfig()]
    proxy_master.addons.add(*chain, errorcheck.ErrorCheck(), *extra)
    # This chain's addons keep their hooks for the process's life: dispatch them from a table.
    mitmproxy_seam.install_hook_table(proxy_master.addons)
    opts.update(
        mode=modes,
        confdir=str(confdir),
        connection_strategy="lazy",  # never connect to a CONNECT target before the addon routed it
        termlog_verbosity=log_level,
    )
    for addon in extra:
        proxy_master.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(opts.keys())))
    return proxy_master


async def run_until_signal(proxy_master: Any) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy_master.shutdown)
    await proxy_master.run()


async def _serve(cfg: s.ProxySettings, metrics_dir: Path | None = None) -> None:
    from cohere_gateway.addons.gateway import Gateway

    # Any other thread in this process shares the GIL with the event loop, and Python hands it over every
    # 5 ms by default: a request arriving meanwhile could wait that long. Since Kafka delivery moved to
    # its own process (addons/sidecar.py) no such thread runs in normal operation; the setting stays
    # because every benchmark in bench/RESULTS.md ran with it.
    sys.setswitchinterval(0.0005)
    # What is loaded at start lives as long as the process: keep the cyclic collector from rescanning it.
    gc.freeze()
    logging.getLogger().setLevel(cfg.log_level.upper())
    # Per-connection chatter ("client connect", "server disconnect") costs CPU on every request and
    # says nothing the events do not; it stays available with --log-level debug.
    # So are httpx's lines for each upstream call of the relay (addons/relay.py).
    quiet = ["asyncio", "hpack", "quic"] + (["mitmproxy.proxy", "httpx"] if cfg.log_level != "debug" else [])
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    proxy_master = lean_master(
        listen_modes(cfg), s.mitmproxy_dir(cfg.data_dir), cfg.log_level, Gateway(metrics_dir)
    )
    await run_until_signal(proxy_master)


def _ensure_ca(confdir: Path) -> None:
    """Create mitmproxy's CA once, before workers start, so they do not race to write it."""
    from mitmproxy import certs

    confdir.mkdir(parents=True, exist_ok=True)
    certs.CertStore.from_store(confdir, "mitmproxy", 2048)


def _metrics_dir(cfg: s.ProxySettings) -> Path:
    """Where the workers of one `--workers N` gateway keep their counters (PROMETHEUS_MULTIPROC_DIR)."""
    return cfg.data_dir / "worker-metrics"


def _supervise(cfg: s.ProxySettings) -> int:
    """Run `cfg.workers` single-process gateways on one port; stop them together."""
    from cohere_gateway.addons.metrics import MULTIPROC_ENV, mark_worker_dead

    _ensure_ca(s.mitmproxy_dir(cfg.data_dir))
    # Counters of an earlier run would be summed into this one's.
    shutil.rmtree(_metrics_dir(cfg), ignore_errors=True)
    _metrics_dir(cfg).mkdir(parents=True)
    spool_root = s.spool_dir(cfg.data_dir, cfg.spool_dir)
    workers = []
    for i in range(cfg.workers):
        # Each worker has its own spool: a spool directory is locked by one publisher.
        env = os.environ | addon_environment(dataclasses.replace(cfg, spool_dir=str(spool_root / f"w{i}")))
        env[MULTIPROC_ENV] = str(_metrics_dir(cfg))
        args = ["--host", cfg.host, "--port", str(cfg.port), "--data-dir", str(cfg.data_dir)]
        args += ["--log-level", cfg.log_level, "--transparent-port", str(cfg.transparent_port)]
        args += ["--listen-backlog", str(cfg.listen_backlog)]
        cmd = [sys.executable, "-m", "cohere_gateway.cli", "proxy", "--worker", *args]
        workers.append(subprocess.Popen(cmd, env=env))

    def stop(*_: object) -> None:
        for w in workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def reap(w: subprocess.Popen[bytes]) -> None:
        w.wait()
        mark_worker_dead(_metrics_dir(cfg), w.pid)  # as soon as it exits, not when the others do

    reapers = [threading.Thread(target=reap, args=(w,), daemon=True) for w in workers]
    for t in reapers:
        t.start()
    for t in reapers:
        t.join()
    return max(w.returncode for w in workers)


@click.command()
@s.click_options(s.ProxySettings)
@click.option("--worker", is_flag=True, hidden=True, help="Internal: one of --workers N processes.")
def proxy(worker: bool, **kwargs: object) -> None:
    """Run the gateway: Cloudflare-compatible routes on --port, an optional forward proxy on
    --transparent-port, events to Kafka.

    \b
    SDK:          cohere.ClientV2(base_url="http://HOST:PORT/v1/ACCOUNT/GATEWAY/cohere")
    OpenAI SDK:   OpenAI(base_url="http://HOST:PORT/v1/ACCOUNT/GATEWAY/compat"), model="cohere/command-r"
    Forward mode: HTTPS_PROXY=http://HOST:TPORT SSL_CERT_FILE=DATA_DIR/mitmproxy/mitmproxy-ca-cert.pem
    Health:       GET /healthz, Prometheus counters: GET /metrics (on --port; with --workers, summed)
    """
    cfg: s.ProxySettings = s.from_kwargs(s.ProxySettings, kwargs)
    if cfg.workers < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--workers")
    if cfg.listen_backlog < 1:
        raise click.BadParameter("must be 1 or more", param_hint="--listen-backlog")
    listen_modes(cfg)  # a bad --upstream fails here, before anything starts
    if cfg.workers > 1 and not worker:
        click.echo(
            f"cohere-gateway: {cfg.workers} workers on http://{cfg.host}:{cfg.port} -> {cfg.upstream}",
            err=True,
        )
        sys.exit(_supervise(cfg))
    from cohere_gateway.addons import mitmproxy_seam

    mitmproxy_seam.listen(cfg.listen_backlog, reuse_port=worker)
    (s.mitmproxy_dir(cfg.data_dir)).mkdir(parents=True, exist_ok=True)
    os.environ.update(addon_environment(cfg))  # read by the addon's option defaults as it loads
    if not worker:
        click.echo(
            f"cohere-gateway: gateway on http://{cfg.host}:{cfg.port} -> {cfg.upstream}"
            + (f", forward proxy on {cfg.host}:{cfg.transparent_port}" if cfg.transparent_port else ""),
            err=True,
        )
    asyncio.run(_serve(cfg, _metrics_dir(cfg) if worker else None))
