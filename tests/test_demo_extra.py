"""The emulator and demo traffic are behind the `demo` extra: the gateway's and the consumer's code runs
without aiohttp and the cohere SDK, and a demo command run without them says what to install. Their
absence is simulated in a child process (`sys.modules[name] = None` makes `import name` fail as if the
package were not installed): this venv has the extra, as the tests need it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_ONLY = ("aiohttp", "cohere")

WITHOUT_DEMO = """
import sys
for name in {demo_only!r}:
    sys.modules[name] = None
{body}
"""


def run_without_demo(body: str) -> subprocess.CompletedProcess[str]:
    code = WITHOUT_DEMO.format(demo_only=DEMO_ONLY, body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip() for r in requirements}


def test_the_base_install_leaves_the_demo_dependencies_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & set(DEMO_ONLY)
    assert _names(project["optional-dependencies"]["demo"]) == set(DEMO_ONLY)
    assert "cohere-gateway[demo]" in project["optional-dependencies"]["test"]  # what the tests run


def test_the_gateway_and_the_consumer_run_without_the_demo_extra() -> None:
    done = run_without_demo(
        "from cohere_gateway.addons import gateway, sidecar, delivery\n"
        "from cohere_gateway.consumers import service, report\n"
        "import cohere_gateway.cli, cohere_gateway.up, cohere_gateway.localkafka\n"
        "from cohere_gateway.cli import main\n"
        "main(['proxy', '--help'])\n"
    )
    assert done.returncode == 0, done.stderr
    assert "Run the gateway" in done.stdout


def test_a_demo_command_without_the_extra_says_what_to_install() -> None:
    for command in (["emulator"], ["up", "--demo"]):
        done = run_without_demo(f"from cohere_gateway.cli import main\nmain({command!r})\n")
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "pip install 'cohere-gateway[demo]'" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
