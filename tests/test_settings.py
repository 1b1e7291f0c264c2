"""Every setting once: what the CLI hands the gateway addon (environment variables) and the delivery
process (JSON) comes back as the same typed values. Pure functions: no parts to run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from cohere_gateway import settings
from cohere_gateway.addons.delivery import PUBLISHER_OPTIONS, DeliveryConfig


def changed(value: Any) -> Any:
    """A value of the same type as `value` and different from it."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value + 0.25
    return "x" + value


def test_every_addon_option_survives_the_environment_as_its_own_type() -> None:
    names = [name for name, _, _ in settings.addon_options()]
    cfg = dataclasses.replace(
        settings.ProxySettings(),
        **{name: changed(getattr(settings.ProxySettings, name)) for name in names},
    )
    env = settings.environment(cfg, names)
    for name in names:
        got = settings.env_value(settings.ProxySettings, name, env)
        assert (got, type(got)) == (getattr(cfg, name), type(getattr(cfg, name))), name


def test_the_addon_options_are_every_proxy_setting_but_the_process_own() -> None:
    names = {name for name, _, _ in settings.addon_options()}
    fields = {f.name for f in dataclasses.fields(settings.ProxySettings)}
    assert names == fields - settings.PROCESS_ONLY
    assert names >= PUBLISHER_OPTIONS


def test_an_empty_variable_is_a_value_and_an_unset_one_the_default() -> None:
    # `--kafka-bootstrap ""` (no publishing) must reach the addon as "", not as the default broker
    env = settings.environment(
        dataclasses.replace(settings.ProxySettings(), kafka_bootstrap=""), ["kafka_bootstrap"]
    )
    assert settings.env_value(settings.ProxySettings, "kafka_bootstrap", env) == ""
    assert (
        settings.env_value(settings.ProxySettings, "kafka_bootstrap", {}) == settings.DEFAULT_KAFKA_BOOTSTRAP
    )


@pytest.mark.parametrize(
    ("name", "raw"), [("max_headers", "lots"), ("allow_http2", "maybe"), ("idle_timeout_s", "")]
)
def test_a_variable_that_does_not_parse_is_refused_with_its_name(name: str, raw: str) -> None:
    variable = settings.env_name(settings.ProxySettings, name)
    with pytest.raises(ValueError, match=variable):
        settings.env_value(settings.ProxySettings, name, {variable: raw})


def test_the_delivery_config_round_trips_through_json_with_its_path() -> None:
    cfg = DeliveryConfig("127.0.0.1:1", "t", Path("/tmp/spool"), spool_fsync="always", shutdown_grace_s=2.5)
    back = settings.from_json(DeliveryConfig, settings.to_json(cfg))
    assert back == cfg and isinstance(back.spool_dir, Path)


def test_the_delivery_config_defaults_are_the_proxy_settings() -> None:
    cfg = DeliveryConfig.from_options(settings.ProxySettings(), Path("/data"))
    assert cfg == DeliveryConfig(
        settings.DEFAULT_KAFKA_BOOTSTRAP, settings.DEFAULT_TOPIC, Path("/data/spool")
    )
    assert DeliveryConfig.from_options(
        settings.ProxySettings(spool_dir="/s"), Path("/data")
    ).spool_dir == Path("/s")


@pytest.mark.parametrize(("flag", "value"), [("--workers", "0"), ("--listen-backlog", "0")])
def test_a_process_count_or_backlog_below_one_is_refused_by_name(flag: str, value: str) -> None:
    from click.testing import CliRunner

    from cohere_gateway.cli import main

    done = CliRunner().invoke(main, ["proxy", flag, value])
    assert done.exit_code == 2 and flag in done.output and "must be 1 or more" in done.output
