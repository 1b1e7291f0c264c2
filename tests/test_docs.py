"""README stays true: every setting is documented with its flag and environment variable, and the test
command it gives is the one CI runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cohere_gateway import settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SETTINGS = [
    settings.UpSettings,
    settings.ProxySettings,
    settings.ConsumerSettings,
    settings.ReportSettings,
    settings.EmulatorSettings,
    settings.KafkaSettings,
]


@pytest.mark.parametrize("cls", SETTINGS, ids=lambda c: c.__name__)
def test_every_setting_is_in_the_readme(cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert f"`{flag}`" in README or f", `{flag}`" in README or f" {flag}`" in README, flag
        assert settings.env_name(cls, f.name) in README, settings.env_name(cls, f.name)


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "make test" in README
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("make test")
