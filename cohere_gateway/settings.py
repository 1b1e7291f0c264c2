"""Every setting in one typed place.

Each command's settings are a frozen dataclass; each field is a CLI flag (`--kafka-bootstrap`) and an
environment variable with the project prefix (`COHERE_GATEWAY_KAFKA_BOOTSTRAP`), the flag winning.
The helper commands whose flags would collide with the gateway's (`--port` of `emulator`, `kafka` and
`clickhouse`) read `COHERE_GATEWAY_EMULATOR_*` / `COHERE_GATEWAY_KAFKA_*` / `COHERE_GATEWAY_CLICKHOUSE_*`
instead. Help text, defaults and env names are written once, here; the rest is derived:
the click options (`click_options`), the gateway addon's mitmproxy options (`addon_options`) with their
defaults read from the environment as the flags would be (`env_value`), and the delivery child's
configuration handed over as JSON (`to_json` / `from_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

ENV_PREFIX = "COHERE_GATEWAY_"
DEFAULT_DATA_DIR = Path(".cohere-gateway")
DEFAULT_TOPIC = "cohere-gateway.events"
DEFAULT_UPSTREAM = "https://api.cohere.ai"
DEFAULT_PARTITIONS = 6
DEFAULT_KAFKA_PORT = 9092
DEFAULT_KAFKA_BOOTSTRAP = f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_READ_API_PORT = 8091  # the consumer's read API, which serves the dashboard
BOOTSTRAP_HELP = "Kafka bootstrap servers, HOST:PORT[,HOST:PORT]."
FsyncMode = Literal["always", "interval", "never"]  # --spool-fsync
UPSTREAM_POOL_MODES = ("new-connections", "always", "off")  # --upstream-pool
PARTITIONS_HELP = (
    "Partitions of the event topic, created with this many if missing (a consumer group shares at most "
    "this many consumers). An existing topic is left as it is: fewer partitions are logged, not changed."
)


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


def log_level_setting() -> Any:
    return setting("info", "Log level.", choices=("debug", "info", "warning", "error"))


def kafka_dir(data_dir: Path) -> Path:
    """Where the local broker of `kafka start` and `up` lives under a data directory."""
    return data_dir / "kafka"


@dataclass(frozen=True)
class EmulatorSettings:
    env_prefix = ENV_PREFIX + "EMULATOR_"

    host: str = setting("127.0.0.1", "Interface the emulator listens on.")
    port: int = setting(8090, "Port the emulator listens on.")
    latency_ms: float = setting(0.0, "Delay before every response starts, in milliseconds.")
    chunk_delay_ms: float = setting(0.0, "Delay between streamed chunks, in milliseconds.")
    error_rate: float = setting(0.0, "Fraction (0..1) of requests answered with an injected 500 error.")
    drop_rate: float = setting(
        0.0, "Fraction (0..1) of streamed responses whose connection is dropped mid-stream."
    )
    api_key: str = setting(
        "", "If set, the only API key accepted (401 otherwise). Empty: any non-empty key is accepted."
    )


@dataclass(frozen=True)
class KafkaSettings:
    env_prefix = ENV_PREFIX + "KAFKA_"

    port: int = setting(
        DEFAULT_KAFKA_PORT, "Port of the local broker's client listener (the controller uses port+1)."
    )
    data_dir: Path = setting(
        kafka_dir(DEFAULT_DATA_DIR), "Where the local broker keeps its log, pid file and output."
    )


@dataclass(frozen=True)
class ClickHouseSettings:
    """`clickhouse start|stop|status`: a local ClickHouse server (the chdb engine serving ClickHouse's
    HTTP and native protocols) for the clickhouse-connect path, without Docker."""

    env_prefix = ENV_PREFIX + "CLICKHOUSE_"

    port: int = setting(8123, "Port of the server's HTTP interface (what --clickhouse URLs point at).")
    tcp_port: int = setting(9000, "Port of the server's native protocol (clickhouse-client).")
    host: str = setting(
        "127.0.0.1", "Interface the server listens on; beyond loopback it needs a --password."
    )
    user: str = setting("gateway", "User clients log in as (any name but 'default').")
    password: str = setting("", "That user's password (only its SHA-256 is written). Empty: none.")
    data_dir: Path = setting(
        DEFAULT_DATA_DIR / "clickhouse-server", "Where the server keeps its data, config, pid and output."
    )


@dataclass(frozen=True)
class ConsumerSettings:
    """`consume`: Kafka -> ClickHouse. Storage is the server at --clickhouse when given, else the embedded
    engine (chdb) under <data-dir>/clickhouse."""

    kafka_bootstrap: str = setting(DEFAULT_KAFKA_BOOTSTRAP, BOOTSTRAP_HELP)
    topic: str = setting(DEFAULT_TOPIC, "Topic the gateway writes events to.")
    partitions: int = setting(DEFAULT_PARTITIONS, PARTITIONS_HELP)
    group_id: str = setting(
        "cohere-gateway-consumer", "Kafka consumer group; run several to share partitions."
    )
    dlq_topic: str = setting(
        "", "Dead-letter topic for messages that are not valid events. Empty: <topic>.dlq."
    )
    clickhouse: str = setting(
        "",
        "ClickHouse server URL, e.g. https://user:pass@host:8443/db (http: plain, https: TLS). "
        "Empty: the embedded engine under --data-dir.",
    )
    data_dir: Path = setting(
        DEFAULT_DATA_DIR, "Directory of the embedded engine (used when no --clickhouse)."
    )
    batch_size: int = setting(
        5000,
        "Rows per insert: buffered events are inserted once this many are held (every partition's in "
        "one insert), or --batch-wait-ms after the first arrived.",
    )
    batch_wait_ms: int = setting(
        1000, "Insert buffered events at the latest this long after the first arrived."
    )
    rollup_wait_ms: int = setting(
        1000,
        "Feed the hour and day rollups at the latest this long after the raw rows they lack were written: "
        "one rollup insert serves several batches, and offsets are committed once it is written. 0: with "
        "every batch.",
    )
    retention_days: int = setting(90, "Raw events older than this many days are dropped (TTL).")
    aggregate_retention_days: int = setting(400, "Per-minute aggregates older than this are dropped (TTL).")
    http_host: str = setting("127.0.0.1", "Interface of the read API (/readyz, /metrics, /api/...).")
    http_port: int = setting(
        DEFAULT_READ_API_PORT, "Port of the read API; 0 picks a free port, -1 disables it."
    )
    api_token: str = setting(
        "",
        "Token the read API and dashboard require (HTTP Basic password, any user name, or "
        "'Authorization: Bearer <token>'). Required when --http-host is not a loopback address.",
    )
    allowed_hosts: str = setting(
        "",
        "Host header values the read API answers, comma-separated (DNS rebinding guard); '*' any. "
        "Empty: localhost, 127.0.0.1, [::1] and --http-host.",
    )
    read_clickhouse: str = setting(
        "",
        "ClickHouse server URL the read API queries with, e.g. a read-only user's. Empty: --clickhouse.",
    )
    log_level: str = log_level_setting()
    gateway_config: str = setting(
        "",
        "The gateways' configuration file (the gateway's --config): the dashboard and /api/budgets show "
        "the use of its budgets, recomputed from the events. Only its budgets are read. Empty: none.",
    )


@dataclass(frozen=True)
class ReportSettings:
    """`report`: reads through a running consumer's API, else opens the storage itself."""

    since: str = setting("1h", "Window to report on, ending now: 30m, 1h, 7d, ...")
    by: str = setting(
        "model",
        "Group totals by this field.",
        choices=("account_id", "gateway_id", "model", "endpoint", "outcome", "none"),
    )
    json: bool = setting(False, "Print JSON instead of a table.")
    clickhouse: str = setting("", "ClickHouse server URL (as for consume). Empty: the embedded engine.")
    data_dir: Path = setting(DEFAULT_DATA_DIR, "Data directory of the embedded engine.")
    api_token: str = setting("", "The consumer's --api-token, when its read API has one.")


@dataclass(frozen=True)
class ProxySettings:
    """`proxy`: the gateway (mitmproxy + addons/gateway.py). Every field but host/port/transparent_port/
    data_dir is also a mitmproxy option of the addon with the same name (`mitmdump --set upstream=...`)."""

    host: str = setting("127.0.0.1", "Interface the gateway listens on.")
    port: int = setting(
        DEFAULT_GATEWAY_PORT, "Port of the gateway route /v1/{account}/{gateway}/cohere/... and /compat/."
    )
    transparent_port: int = setting(
        0, "Port of the forward proxy for apps using HTTPS_PROXY (api.cohere.ai/.com only); 0: off."
    )
    upstream: str = setting(DEFAULT_UPSTREAM, "Cohere API base URL requests are forwarded to.")
    upstream_pool: str = setting(
        "new-connections",
        "Upstream calls made over the gateway's pool of warm keep-alive connections to the upstream "
        "(shared by all clients) instead of one upstream connection per client connection: "
        "new-connections: the first request of each client connection, so a client that opens a "
        "connection per request (serverless) never waits for a TCP+TLS handshake to the upstream; a "
        "client that sends a second request on its connection gets an upstream connection of its own "
        "for the rest (no extra loopback hop). always: every request. off: only requests with a "
        "timeout or retries.",
        choices=UPSTREAM_POOL_MODES,
    )
    pool_streams: bool = setting(
        False,
        "Whether upstream_pool also takes streamed requests. Off (the default), a stream goes upstream on "
        "mitmproxy's own connection, paying one upstream handshake if its client connection is new (a "
        "stream with a timeout or retries still takes the relay). On, a stream skips that handshake but "
        "passes every event through the relay's loopback hop for its whole life: about twice the "
        "gateway's memory and CPU per open stream (docs/gateway.md, Upstream connections).",
    )
    upstream_ca: str = setting(
        "",
        "PEM file of the CA certificates the upstream's TLS certificate is checked against (an upstream "
        "behind a private CA). Empty: certifi's bundle of public CAs.",
    )
    kafka_bootstrap: str = setting(
        DEFAULT_KAFKA_BOOTSTRAP, BOOTSTRAP_HELP + " Empty: events are not published."
    )
    topic: str = setting(DEFAULT_TOPIC, "Kafka topic events are published to.")
    data_dir: Path = setting(DEFAULT_DATA_DIR, "Gateway state directory (mitmproxy CA in <dir>/mitmproxy).")
    default_account_id: str = setting("default", "Account id for forward-proxy requests without one.")
    default_gateway_id: str = setting("default", "Gateway id for forward-proxy requests without one.")
    gateway_token: str = setting(
        "", "If set, requests must send `cf-aig-authorization: Bearer <token>` (401 otherwise)."
    )
    max_request_bytes: int = setting(
        10_485_760, "Largest request body accepted, compressed or decoded; larger ones get 413."
    )
    max_header_bytes: int = setting(
        65_536, "Largest request head (request line and headers) accepted; larger ones get 431."
    )
    max_headers: int = setting(100, "Most header fields a request may carry; more get 431.")
    max_connections: int = setting(
        1024, "Most client connections open at once (per worker); further ones are closed at once."
    )
    idle_timeout_s: float = setting(
        180.0,
        "A connection with no traffic either way for this long is closed (raise it for very long "
        "non-streamed generations).",
    )
    header_timeout_s: float = setting(
        30.0, "A request head (HTTP/1.1) not complete this long after its first byte gets 408 (slowloris)."
    )
    allow_http2: bool = setting(
        False, "Offer HTTP/2 (ALPN h2) to TLS clients; off: clients speak HTTP/1.1 to the gateway."
    )
    max_custom_cost: float = setting(
        1000.0, "Largest cf-aig-custom-cost value (USD) accepted; larger or non-finite ones get 400."
    )
    protect_local_endpoints: bool = setting(
        True,
        "With --gateway-token, /metrics and the details of /healthz need the token too "
        '(/healthz alone still answers {"status": "ok"} for health checks).',
    )
    log_payloads: bool = setting(False, "Store request and response bodies in events (truncated).")
    payload_max_bytes: int = setting(16_384, "Bodies stored in events are truncated to this many characters.")
    spool_dir: str = setting(
        "", "Where events Kafka did not acknowledge in time are kept until replayed. Empty: <data-dir>/spool."
    )
    spool_max_bytes: int = setting(
        1_073_741_824, "Size cap of the spool; once reached new events are dropped (and counted)."
    )
    spool_fsync: str = setting(
        "interval",
        "When spooled events are fsynced: every event, every --spool-fsync-interval-ms, or never "
        "(left to the OS). Bounds what a power loss can lose; see docs/durability.md.",
        choices=typing.get_args(FsyncMode),
    )
    spool_fsync_interval_ms: int = setting(
        100, "Flush/fsync period of the spool for --spool-fsync interval/never."
    )
    delivery_timeout_ms: int = setting(
        5000, "An event Kafka has not acknowledged after this long goes to the spool (and so do later ones)."
    )
    max_pending_events: int = setting(
        10_000, "Most events held in memory awaiting Kafka; beyond it events go to the spool."
    )
    dead_letter_max_bytes: int = setting(
        104_857_600,
        "Size cap of <spool-dir>/dead-letters.jsonl, where events Kafka refuses for good are kept "
        "(delivery moves on past them); beyond it they are dropped (and counted).",
    )
    shutdown_grace_s: float = setting(
        10.0, "On SIGTERM/SIGINT, how long to keep delivering to Kafka before spooling the rest."
    )
    log_level: str = log_level_setting()
    workers: int = setting(
        1, "Gateway processes sharing --port (SO_REUSEPORT), one per core to use; each has its own spool."
    )
    listen_backlog: int = setting(
        4096,
        "Connections the kernel queues on each listener until the gateway accepts them (capped by "
        "net.core.somaxconn): a burst of new connections larger than this is reset.",
    )
    config: str = setting(
        "",
        "Per-gateway configuration file (TOML, docs/gateway.md), reloaded when it changes; the flags "
        "above are its `*/*` defaults. Empty: the flags alone.",
    )
    cache_ttl: int = setting(
        0,
        "Default cache TTL in seconds of every gateway (60..2592000); 0: only requests that ask "
        "(cf-aig-cache-ttl, cf-aig-cache-key) or gateways the configuration enables are cached.",
    )
    cache_url: str = setting(
        "",
        "Where cached responses live: empty for <data-dir>/cache on local disk (shared by --workers), "
        "redis://HOST:PORT[/DB] for a Redis shared by several gateways, none for no cache at all.",
    )
    cache_max_bytes: int = setting(
        1_073_741_824, "Size cap of the disk cache; least recently used entries are evicted beyond it."
    )
    state_url: str = setting(
        "",
        "Where rate limit counters live: empty for this process alone, redis://HOST:PORT[/DB] for counters "
        "shared by --workers and by several gateways (needed for rate limits with --workers > 1).",
    )


@dataclass(frozen=True)
class UpSettings:
    """`up`: Kafka, gateway, consumer and dashboard on one machine (and with --demo, emulator and traffic)."""

    demo: bool = setting(False, "Also run the Cohere emulator as upstream and drive demo traffic through it.")
    demo_rate: float = setting(5.0, "Demo calls per second (with --demo).")
    demo_requests: int = setting(0, "With --demo, stop the traffic after this many calls; 0: until Ctrl-C.")
    host: str = setting("127.0.0.1", "Interface the gateway and the dashboard listen on.")
    port: int = setting(DEFAULT_GATEWAY_PORT, "Port of the gateway.")
    dashboard_port: int = setting(
        DEFAULT_READ_API_PORT, "Port of the dashboard and its JSON API (served by the consumer)."
    )
    upstream: str = setting(DEFAULT_UPSTREAM, "Cohere API base URL (ignored with --demo: the emulator).")
    emulator_port: int = setting(0, "Port of the emulator with --demo; 0 picks a free one.")
    kafka: str = setting("", "Bootstrap servers of an existing Kafka. Empty: start the local broker.")
    kafka_port: int = setting(
        DEFAULT_KAFKA_PORT, "Port of the local broker when --kafka is empty (controller: port+1)."
    )
    topic: str = setting(DEFAULT_TOPIC, "Kafka topic of the events.")
    partitions: int = setting(DEFAULT_PARTITIONS, PARTITIONS_HELP)
    clickhouse: str = setting("", "ClickHouse server URL. Empty: the embedded engine under --data-dir.")
    data_dir: Path = setting(DEFAULT_DATA_DIR, "Where Kafka, ClickHouse, the spool, the CA and logs live.")


# ProxySettings fields that shape the `proxy` process (its listeners, state directory, logging, workers)
# rather than being options of the gateway addon.
PROCESS_ONLY = frozenset(
    {"host", "port", "transparent_port", "data_dir", "log_level", "workers", "listen_backlog"}
)
# mitmproxy's confdir under <data-dir> when `cohere-gateway proxy` runs the addon.
MITMPROXY_DIR = "mitmproxy"


def addon_options() -> tuple[tuple[str, type, str], ...]:
    """(name, type, help) of the ProxySettings fields the gateway addon registers as mitmproxy options."""
    hints = typing.get_type_hints(ProxySettings)
    return tuple(
        (f.name, hints[f.name], f.metadata["help"])
        for f in dataclasses.fields(ProxySettings)
        if f.name not in PROCESS_ONLY
    )


def mitmproxy_dir(data_dir: Path) -> Path:
    return data_dir / MITMPROXY_DIR


def data_dir_of(confdir: str) -> Path:
    """<data-dir> of a gateway from mitmproxy's confdir: its parent under `cohere-gateway proxy` (which
    sets <data-dir>/mitmproxy), the confdir itself for a bare `mitmdump -s addons/mitmdump_script.py`."""
    conf = Path(confdir).expanduser()
    return conf.parent if conf.name == MITMPROXY_DIR else conf


def spool_dir(data_dir: Path, configured: str) -> Path:
    """--spool-dir, else <data-dir>/spool."""
    return Path(configured).expanduser() if configured else data_dir / "spool"


def env_name(cls: type, name: str) -> str:
    return getattr(cls, "env_prefix", ENV_PREFIX) + name.upper()


def _value_type(kind: Any) -> Any:
    """How a setting's text (a flag or an environment variable) becomes its value: the CLI and the addon's
    option defaults both parse with this."""
    if kind is bool:
        return click.BOOL
    if kind is Path:
        return click.Path(path_type=Path)
    return click.types.convert_type(kind)


def env_value(cls: type, name: str, environ: typing.Mapping[str, str] | None = None) -> Any:
    """Setting `name` of `cls` from its environment variable, parsed as its flag is; its default when the
    variable is unset. An empty value is a value: `--kafka-bootstrap ""` reaches the addon as one."""
    environ = os.environ if environ is None else environ
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    raw = environ.get(env_name(cls, name))
    if raw is None:
        return default
    try:
        return _value_type(typing.get_type_hints(cls)[name]).convert(raw, None, None)
    except click.BadParameter as exc:
        raise ValueError(f"{env_name(cls, name)}={raw!r}: {exc.message}") from None


def environment(obj: Any, names: typing.Iterable[str]) -> dict[str, str]:
    """The settings `names` of `obj` as the environment variables `env_value` reads back."""
    cls = type(obj)
    return {
        env_name(cls, name): (("true" if value else "false") if isinstance(value, bool) else str(value))
        for name in names
        for value in (getattr(obj, name),)
    }


def click_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with one option per field of the settings dataclass `cls`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(cls)
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            kind: Any = hints[f.name]
            if kind is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            choices = f.metadata.get("choices")
            kind = click.Choice(choices) if choices else _value_type(kind)
            fn = click.option(
                flag,
                f.name,
                type=kind,
                default=f.default,
                show_default=True,
                envvar=env_name(cls, f.name),
                show_envvar=True,
                help=f.metadata["help"],
            )(fn)
        return fn

    return decorate


def to_json(obj: Any) -> str:
    """A settings dataclass as JSON (Paths as text), for a child process; `from_json` reads it back."""
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(obj).items()})


def from_json(cls: type, text: str) -> Any:
    """The `cls` that `to_json` wrote, its typed fields restored (Path)."""
    raw = json.loads(text)
    hints = typing.get_type_hints(cls)
    return cls(**{k: Path(v) if hints[k] is Path else v for k, v in raw.items()})


def from_kwargs(cls: type, kwargs: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})
