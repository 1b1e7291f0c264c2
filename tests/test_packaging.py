"""The installed code has one import namespace of its own (README, Architecture): the wheel holds
`cohere_gateway` alone, with `addons/` and `consumers/` inside it, and its modules, SQL and dashboard work
from the wheel by themselves, with no checkout or editable install behind them. The Dockerfile's steps
(`pip wheel .`, then install that wheel, no extra) are run here in a clean venv, since no image can be
built on this machine (no registry to pull a base image from)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FROM_THE_WHEEL = """
import importlib.util, sys
sys.path[:0] = [{lib!r}, {site!r}]
import cohere_gateway.addons.gateway, cohere_gateway.addons.sidecar, cohere_gateway.consumers.service
from cohere_gateway.consumers import queries, schema
assert cohere_gateway.__file__.startswith({lib!r}), cohere_gateway.__file__
assert queries.sql("totals").strip() and len(schema.load_migrations()) >= 13
for generic in ("addons", "consumers"):
    assert importlib.util.find_spec(generic) is None, generic
print("ok")
"""

IN_THE_IMAGE = """
import importlib.util
for absent in ("addons", "consumers", "aiohttp", "cohere"):  # no generic names, no demo extra
    assert importlib.util.find_spec(absent) is None, absent
from cohere_gateway.cli import main
main(["proxy", "--help"])
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of the files git tracks, as a clean clone would (a build/ left in the checkout
    by an earlier build would otherwise put modules since deleted into the wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        timeout=600,
    )
    [built] = out.glob("cohere_gateway-*.whl")
    return built


def test_the_wheel_installs_one_namespace_whose_code_runs_from_it_alone(wheel: Path, tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(lib)
    assert {name.split("/")[0] for name in names} == {
        "cohere_gateway",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    # Every tracked module of the three folders, under the one namespace, and no other.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    expected = set()
    for name in tracked.splitlines():
        folder, _, rest = name.partition("/")
        if name.endswith(".py") and folder in ("cohere_gateway", "addons", "consumers"):
            expected.add(name if folder == "cohere_gateway" else f"cohere_gateway/{folder}/{rest}")
    assert {name for name in names if name.endswith(".py")} == expected
    for packaged in (
        "cohere_gateway/addons/pricing.json",
        "cohere_gateway/consumers/migrations/0001_events.sql",
        "cohere_gateway/consumers/dashboard/index.html",
    ):
        assert packaged in names
    # -S: this venv's site-packages without its .pth files, so the editable install's finder (which maps
    # the names to this checkout) stays out; the working directory is not the checkout either.
    code = FROM_THE_WHEEL.format(lib=str(lib), site=sysconfig.get_paths()["purelib"])
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


@pytest.mark.timeout(900)
def test_the_dockerfiles_install_steps_give_a_gateway_without_the_demo_extra(
    wheel: Path, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # As the image's second stage: the wheel with its base dependencies, from the package index.
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=900)
    subprocess.run([python, "-m", "pip", "check"], check=True, timeout=120)
    done = subprocess.run(
        [python, "-c", IN_THE_IMAGE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "Run the gateway" in done.stdout
    command = subprocess.run(
        [venv / "bin" / "cohere-gateway", "consume", "--help"], capture_output=True, text=True, timeout=120
    )
    assert command.returncode == 0 and "--kafka-bootstrap" in command.stdout, command.stderr
