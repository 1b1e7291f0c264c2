"""README stays true: every setting is documented with its flag and environment variable, and the test
command it gives is the one CI runs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cohere_gateway import settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Each command's settings and the README section that documents them.
SECTIONS = {
    settings.UpSettings: "### `cohere-gateway up`",
    settings.ProxySettings: "### `cohere-gateway proxy`",
    settings.ConsumerSettings: "### `cohere-gateway consume`",
    settings.ReportSettings: "### `cohere-gateway report`",
    settings.EmulatorSettings: "### `cohere-gateway emulator`",
    settings.KafkaSettings: "### `cohere-gateway emulator`",  # one table for the helper commands
    settings.ClickHouseSettings: "### `cohere-gateway emulator`",
}


def section(heading: str) -> str:
    start = README.index(heading)
    rest = README[start + len(heading) :]
    return rest[: min(i for i in (rest.find("\n### "), rest.find("\n## "), len(rest)) if i >= 0)]


@pytest.mark.parametrize("cls", list(SECTIONS), ids=lambda c: c.__name__)
def test_every_setting_is_in_its_commands_readme_table(cls: type) -> None:
    text = section(SECTIONS[cls])
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert f"{flag}`" in text, f"{flag} missing under {SECTIONS[cls]}"
        assert settings.env_name(cls, f.name) in text, settings.env_name(cls, f.name)


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "make test" in README
    assert (ROOT / ".ci/run").read_text().rstrip().endswith("make test")


def test_every_module_has_its_place_in_the_architecture_table() -> None:
    """The table walks the one-way path; a module it does not name has no stated place on it."""
    table = section("## Architecture")
    for folder in ("addons", "consumers", "cohere_gateway"):
        for module in sorted((ROOT / folder).glob("*.py")):
            if module.name in ("__init__.py", "__main__.py"):
                continue
            named = f"`{folder}/{module.name}`" in table or f"`{module.stem}`" in table
            assert named, f"{folder}/{module.name} is not in README's Architecture table"
