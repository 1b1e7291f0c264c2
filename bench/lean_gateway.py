"""Baseline for `python -m bench lean`: the lean mitmproxy addon chain that `cohere-gateway proxy` runs
(addons/cli.py), as a plain reverse proxy without the gateway addon, so the cost of mitmdump's ~30 default
addons and the cost of the gateway addon itself can be told apart.

    python -m bench.lean_gateway --port 8081 --upstream http://127.0.0.1:8090 --data-dir /tmp/lean
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path


async def serve(args: argparse.Namespace) -> None:
    from cohere_gateway.addons.cli import lean_master, run_until_signal

    modes = [f"reverse:{args.upstream}@{args.host}:{args.port}"]
    await run_until_signal(lean_master(modes, Path(args.data_dir) / "mitmproxy", "warn"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lean_gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--data-dir", required=True)
    asyncio.run(serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
