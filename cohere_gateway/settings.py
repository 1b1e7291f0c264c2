"""Every setting in one typed place.

Each command's settings are a frozen dataclass; each field is a CLI flag (`--kafka-bootstrap`) and an
environment variable with the project prefix (`COHERE_GATEWAY_KAFKA_BOOTSTRAP`), the flag winning.
The helper commands whose flags would collide with the gateway's (`--port` of `emulator` and `kafka`)
read `COHERE_GATEWAY_EMULATOR_*` / `COHERE_GATEWAY_KAFKA_*` instead. `cli.py` builds the click options
from these classes, so help text, defaults and env names are written once, here.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

ENV_PREFIX = "COHERE_GATEWAY_"
DEFAULT_DATA_DIR = Path(".cohere-gateway")
DEFAULT_TOPIC = "cohere-gateway.events"
DEFAULT_UPSTREAM = "https://api.cohere.ai"


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


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

    port: int = setting(9092, "Port of the local broker's client listener (the controller uses port+1).")
    data_dir: Path = setting(
        DEFAULT_DATA_DIR / "kafka", "Where the local broker keeps its log, pid file and output."
    )


def env_name(cls: type, name: str) -> str:
    return getattr(cls, "env_prefix", ENV_PREFIX) + name.upper()


def click_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a click command with one option per field of the settings dataclass `cls`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(cls)
        for f in reversed(dataclasses.fields(cls)):
            flag = "--" + f.name.replace("_", "-")
            kind: Any = hints[f.name]
            if kind is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            elif f.metadata.get("choices"):
                kind = click.Choice(f.metadata["choices"])
            elif kind is Path:
                kind = click.Path(path_type=Path)
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


def from_kwargs(cls: type, kwargs: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names})
