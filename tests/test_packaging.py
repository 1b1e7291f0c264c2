"""The installed code has one import namespace of its own (README, Architecture): the wheel holds
`cohere_gateway` alone, with `addons/` and `consumers/` inside it, and its modules, SQL and dashboard work
from the wheel by themselves, with no checkout or editable install behind them."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

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


def test_the_wheel_installs_one_namespace_whose_code_runs_from_it_alone(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=600,
    )
    [wheel] = tmp_path.glob("cohere_gateway-*.whl")
    lib = tmp_path / "lib"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(lib)
    assert {name.split("/")[0] for name in names} == {
        "cohere_gateway",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    for packaged in (
        "cohere_gateway/addons/gateway.py",
        "cohere_gateway/addons/pricing.json",
        "cohere_gateway/consumers/migrations/0001_events.sql",
        "cohere_gateway/consumers/write_sql/__init__.py",
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
