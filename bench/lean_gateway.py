"""Prototype for item 3 of the benchmark issue: the gateway on a lean mitmproxy addon chain, optionally as
N worker processes sharing one port.

`mitmdump` loads ~30 default addons and dispatches every hook to each of them; the gateway needs five:
Core (option plumbing), Proxyserver (listeners), NextLayer (protocol detection), TlsConfig (certificates
for the forward proxy) and ErrorCheck (startup errors), plus its own addon. With --workers N the parent
starts N such processes; each listens on the same port with SO_REUSEPORT, so the kernel spreads
connections over them and throughput scales with cores.

    python -m bench.lean_gateway --port 8080 --upstream http://127.0.0.1:8090 \
        --kafka-bootstrap 127.0.0.1:9092 --topic cohere-gateway.events --data-dir /tmp/gw [--workers 2]

`--no-gateway` runs the same lean chain without the gateway addon (a lean bare reverse proxy).
This is a benchmark prototype; the proposed change to `cohere-gateway proxy` is described in RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import subprocess
import sys
from pathlib import Path


def reuse_port_listeners() -> None:
    """mitmproxy 11 binds with asyncio.start_server(host, port) and offers no reuse_port option; wrap it
    in this process only so several workers can bind one port."""
    import mitmproxy.proxy.mode_servers as mode_servers

    original = mode_servers.asyncio.start_server

    @functools.wraps(original)
    async def start_server(*args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("reuse_port", True)
        return await original(*args, **kwargs)

    mode_servers.asyncio.start_server = start_server  # type: ignore[attr-defined]


async def serve(args: argparse.Namespace) -> None:
    from mitmproxy import master, options
    from mitmproxy.addons import core, errorcheck, next_layer, proxyserver, tlsconfig

    opts = options.Options()
    m = master.Master(opts, with_termlog=True)
    m.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
    )
    updates: dict[str, object] = {
        "mode": [f"reverse:{args.upstream}@{args.host}:{args.port}"],
        "confdir": str(Path(args.data_dir) / "mitmproxy"),
        "connection_strategy": "lazy",
        "termlog_verbosity": "warn",
    }
    if not args.no_gateway:
        from addons.gateway import Gateway

        m.addons.add(Gateway())
        updates |= {"upstream": args.upstream, "kafka_bootstrap": args.kafka_bootstrap, "topic": args.topic}
    opts.update(**updates)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, m.shutdown)
    await m.run()


def supervise(args: argparse.Namespace) -> int:
    """Start `--workers` single-worker copies of this command and stop them together."""

    def worker_args(i: int) -> list[str]:
        out = ["--host", args.host, "--port", str(args.port), "--upstream", args.upstream]
        out += ["--kafka-bootstrap", args.kafka_bootstrap, "--topic", args.topic]
        out += ["--data-dir", f"{args.data_dir}/w{i}", *(["--no-gateway"] if args.no_gateway else [])]
        return out

    workers = [
        subprocess.Popen([sys.executable, "-m", "bench.lean_gateway", *worker_args(i)])
        for i in range(args.workers)
    ]

    def stop(*_: object) -> None:
        for w in workers:
            w.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return max(w.wait() for w in workers)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.lean_gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--kafka-bootstrap", default="")
    parser.add_argument("--topic", default="cohere-gateway.events")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-gateway", action="store_true")
    args = parser.parse_args(argv)
    if args.workers > 1:
        return supervise(args)
    reuse_port_listeners()
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
