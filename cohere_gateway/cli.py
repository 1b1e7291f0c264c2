"""`cohere-gateway`: one console command, one subcommand per job.

Every flag is also read from an environment variable (shown in `--help`); see settings.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cohere_gateway import settings as s
from cohere_gateway.addons.cli import proxy
from cohere_gateway.consumers.cli import consume, report


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="cohere-gateway")
def main() -> None:
    """Self-hosted gateway for the Cohere API with an observability pipeline behind it.

    \b
    Data flow:  client -> proxy (mitmproxy addon) -> Kafka -> consume -> ClickHouse -> report/dashboard
    Local dev:  `cohere-gateway kafka start`, `cohere-gateway emulator`, then the gateway and consumer
                (`cohere-gateway clickhouse start` for a ClickHouse server instead of the embedded engine).
    """


@main.command()
@s.click_options(s.EmulatorSettings)
def emulator(**kwargs: object) -> None:
    """Run the Cohere API emulator: a local stand-in for api.cohere.ai for tests and demos.

    Serves v1/v2 chat (JSON, NDJSON and SSE streams), generate, embed, rerank, classify, tokenize,
    detokenize, models and the OpenAI-compatible /compatibility/v1/chat/completions, with Cohere's wire
    formats and deterministic token counts. Point the SDK at it with base_url=http://HOST:PORT.
    """
    _require_demo_extra("emulator")
    from cohere_gateway.emulator.server import serve

    serve(s.from_kwargs(s.EmulatorSettings, kwargs))


@main.group()
def kafka() -> None:
    """Manage a local single-node Apache Kafka broker (KRaft), resolved from Maven Central.

    Needs Java 17+ and Maven (`apt-get install openjdk-17-jre-headless maven`). Jars are cached in
    infra/kafka/lib after the first start.
    """


@kafka.command("start")
@s.click_options(s.KafkaSettings)
def kafka_start(**kwargs: object) -> None:
    """Resolve the jars if needed, format storage on first use, start the broker and wait until it
    accepts produce and consume. Prints the bootstrap address."""
    from cohere_gateway import localkafka

    cfg = s.from_kwargs(s.KafkaSettings, kwargs)
    try:
        broker = localkafka.start(cfg.data_dir, cfg.port, progress=_progress)
    except localkafka.KafkaSetupError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Kafka is up: bootstrap {broker.bootstrap} (pid {broker.pid}, data {cfg.data_dir})")


@kafka.command("stop")
@s.click_options(s.KafkaSettings)
def kafka_stop(**kwargs: object) -> None:
    """Stop the local broker started with the same --data-dir (SIGTERM, then SIGKILL after 30 s)."""
    from cohere_gateway import localkafka

    cfg = s.from_kwargs(s.KafkaSettings, kwargs)
    stopped = localkafka.stop(cfg.data_dir)
    click.echo("Kafka stopped." if stopped else f"No local Kafka running for {cfg.data_dir}.")


@kafka.command("status")
@s.click_options(s.KafkaSettings)
def kafka_status(**kwargs: object) -> None:
    """Say whether the local broker for --data-dir runs and answers; exit 1 if not."""
    from cohere_gateway import localkafka

    cfg = s.from_kwargs(s.KafkaSettings, kwargs)
    st = localkafka.status(cfg.data_dir, cfg.port)
    click.echo(st.describe())
    sys.exit(0 if st.ready else 1)


@main.group()
def clickhouse() -> None:
    """Manage a local ClickHouse server: the pinned chdb engine serving ClickHouse's HTTP and native
    protocols, for `--clickhouse http://USER:PASSWORD@127.0.0.1:PORT/default` without Docker.

    Needs nothing beyond this package. Data persists in --data-dir across restarts.
    """


@clickhouse.command("start")
@s.click_options(s.ClickHouseSettings)
def clickhouse_start(**kwargs: object) -> None:
    """Write its config (users: --user with --password), start the server and wait until it answers
    /ping. Prints the URL to pass as --clickhouse."""
    from cohere_gateway import localclickhouse

    cfg = s.from_kwargs(s.ClickHouseSettings, kwargs)
    try:
        server = localclickhouse.start(
            cfg.data_dir, cfg.port, cfg.tcp_port, cfg.host, cfg.user, cfg.password, progress=_progress
        )
    except localclickhouse.ClickHouseSetupError as exc:
        raise click.ClickException(str(exc)) from None
    shown = server.url("PASSWORD" if cfg.password else "")
    click.echo(f"ClickHouse is up: --clickhouse {shown} (pid {server.pid}, data {server.data_dir})")


@clickhouse.command("stop")
@s.click_options(s.ClickHouseSettings)
def clickhouse_stop(**kwargs: object) -> None:
    """Stop the server started with the same --data-dir (SIGTERM, then SIGKILL after 30 s)."""
    from cohere_gateway import localclickhouse

    cfg = s.from_kwargs(s.ClickHouseSettings, kwargs)
    stopped = localclickhouse.stop(cfg.data_dir)
    click.echo("ClickHouse stopped." if stopped else f"No local ClickHouse running for {cfg.data_dir}.")


@clickhouse.command("status")
@s.click_options(s.ClickHouseSettings)
def clickhouse_status(**kwargs: object) -> None:
    """Say whether the server for --data-dir runs and answers /ping on --port; exit 1 if not."""
    from cohere_gateway import localclickhouse

    cfg = s.from_kwargs(s.ClickHouseSettings, kwargs)
    st = localclickhouse.status(cfg.data_dir, cfg.port, cfg.host)
    click.echo(st.describe())
    sys.exit(0 if st.ready else 1)


@main.command()
@s.click_options(s.UpSettings)
def up(**kwargs: object) -> None:
    """Run the whole pipeline here: local Kafka, gateway, consumer into embedded ClickHouse, dashboard.

    Prints the gateway URL to use as the SDK's base URL and the dashboard URL. One Ctrl-C stops all
    parts cleanly, in an order that loses no event. With --demo, also starts the Cohere emulator as
    upstream and drives a realistic mix of SDK traffic through the gateway (no Cohere key needed).
    With COHERE_API_KEY set in your app and network access, the same command proxies real Cohere.
    """
    from cohere_gateway.up import run

    cfg = s.from_kwargs(s.UpSettings, kwargs)
    if cfg.demo:
        _require_demo_extra("up --demo")
    sys.exit(run(cfg, _progress))


@main.group()
def config() -> None:
    """The per-gateway configuration file (TOML) named by `proxy --config` (docs/gateway.md)."""


@config.command("check")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
def config_check(file: Path) -> None:
    """Validate FILE as the running gateway would (a reload of a bad file keeps the old one); print
    each entry and what it sets (tokens as a count), exit 1 with FILE:LINE: KEY: why on an error."""
    from cohere_gateway.addons import gateway_config as gc

    try:
        cfg = gc.load(file, gc.GatewayPolicy())
    except gc.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{file}: OK, {len(cfg.entries)} entries (least specific first)")
    for entry in cfg.entries:
        shown = {k: (f"{len(v)} token(s)" if k == "tokens" else v) for k, v in entry.values.items()}
        shown |= {f"cache.{k}": v for k, v in entry.cache.items()}
        shown |= {f"retries.{k}": v for k, v in entry.retry.items()}
        click.echo(f"  {entry.pattern}: " + (", ".join(f"{k}={v}" for k, v in shown.items()) or "(nothing)"))


def _require_demo_extra(command: str) -> None:
    """The emulator and the demo traffic need the `demo` extra (aiohttp, the cohere SDK), which the
    gateway and the consumer do not: their wheel and image leave it out."""
    try:
        import aiohttp  # noqa: F401
        import cohere  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"`cohere-gateway {command}` needs the demo extra ({exc.name} is not installed): "
            "pip install 'cohere-gateway[demo]'"
        ) from None


def _progress(message: str) -> None:
    click.echo(message, err=True)


# The pipeline's own commands live beside their code; this group is only where they meet.
for command in (proxy, consume, report):
    main.add_command(command)

if __name__ == "__main__":
    main()
