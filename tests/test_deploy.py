"""docker-compose.yml, the Dockerfile and Grafana's provisioning, checked without Docker:
structure, that every command the stack runs exists in the CLI, and that every Grafana panel's SQL runs
against the project's own schema in the real ClickHouse engine (chdb). With Docker
(`COHERE_GATEWAY_TEST_DOCKER=1`), the stack is also started for real."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from cohere_gateway.cli import main as cli
from cohere_gateway.consumers.backends import Backend
from tests.fixtures.clickhouse import make_event
from tests.test_storage import insert_events

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DASHBOARD = json.loads((ROOT / "infra/grafana/dashboards/cohere-gateway.json").read_text())
DATASOURCES = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/clickhouse.yaml").read_text())


def test_every_service_is_healthchecked_restarted_and_persistent() -> None:
    services = COMPOSE["services"]
    assert set(services) == {"kafka", "clickhouse", "gateway", "consumer", "grafana"}
    for name, svc in services.items():
        assert "healthcheck" in svc, f"{name} has no healthcheck"
        assert svc.get("restart") == "unless-stopped", f"{name} is not restarted"
        assert "image" in svc or "build" in svc
    declared = set(COMPOSE["volumes"])
    mounts = [v for svc in services.values() for v in svc.get("volumes", [])]
    used = {v.split(":")[0] for v in mounts if not v.startswith(".")}
    assert used == declared, "named volumes and their uses differ"
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")


def _option_names(command: Any) -> set[str]:
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}


@pytest.mark.parametrize("service", ["gateway", "consumer"])
def test_app_services_run_real_cli_commands(service: str) -> None:
    """The image's entrypoint is `cohere-gateway`; each flag the compose file passes must exist."""
    svc = COMPOSE["services"][service]
    assert svc["build"] == "."
    subcommand, *flags = svc["command"]
    assert subcommand in cli.commands, f"{service}: no subcommand {subcommand!r}"
    known = _option_names(cli.commands[subcommand])
    for flag in flags:
        assert flag.split("=", 1)[0] in known, f"{service}: `{subcommand}` has no option {flag}"


def test_kafka_is_healthy_once_the_event_topic_exists_with_the_configured_partitions() -> None:
    """The gateway and the consumer wait for Kafka's healthcheck, which creates the topic: with the
    settings' topic and partition count, the same count the consumer is given."""
    from cohere_gateway.settings import DEFAULT_PARTITIONS, DEFAULT_TOPIC

    check = " ".join(COMPOSE["services"]["kafka"]["healthcheck"]["test"][1:])
    partitions = f"${{COHERE_GATEWAY_PARTITIONS:-{DEFAULT_PARTITIONS}}}"
    assert "kafka-topics.sh --bootstrap-server localhost:9092 --create --if-not-exists" in check
    assert f"--topic {DEFAULT_TOPIC} --partitions {partitions}" in check
    assert f"--partitions={partitions}" in COMPOSE["services"]["consumer"]["command"]
    for app in ("gateway", "consumer"):
        assert COMPOSE["services"][app]["depends_on"]["kafka"] == {"condition": "service_healthy"}


def test_dockerfile_builds_the_cli_from_the_packages() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["cohere-gateway"]' in text
    for copied in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        if not copied.startswith("--"):
            assert (ROOT / copied).exists(), f"Dockerfile copies missing {copied}"
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'cohere-gateway = "cohere_gateway.cli:main"' in scripts


def test_grafana_panels_use_the_provisioned_datasource() -> None:
    uid = DATASOURCES["datasources"][0]["uid"]
    assert DATASOURCES["datasources"][0]["type"] == "grafana-clickhouse-datasource"
    assert DATASOURCES["datasources"][0]["jsonData"]["defaultDatabase"] == "cohere_gateway"
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])


def _grafana_to_clickhouse(sql: str) -> str:
    """Expand the ClickHouse plugin's time macro as Grafana would for 'last 24 hours'."""
    return re.sub(
        r"\$__timeFilter\((\w+)\)",
        lambda m: f"{m.group(1)} >= now() - INTERVAL 1 DAY AND {m.group(1)} <= now()",
        sql,
    )


def test_every_grafana_panel_query_runs_against_the_schema(clickhouse_backend: Backend) -> None:
    from datetime import UTC, datetime, timedelta

    base = datetime.now(UTC) - timedelta(minutes=30)
    insert_events(clickhouse_backend, [make_event(i, base) for i in range(40)], None)
    answered = 0
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            result = clickhouse_backend.query(_grafana_to_clickhouse(target["rawSql"]))
            assert result, f"panel {panel['title']!r} returned no rows"
            answered += 1
    assert answered == len(DASHBOARD["panels"])
    first = DASHBOARD["panels"][0]["targets"][0]["rawSql"]
    requests = clickhouse_backend.query(_grafana_to_clickhouse(first))
    assert int(requests[0]["requests"]) == 40


@pytest.mark.skipif(
    os.environ.get("COHERE_GATEWAY_TEST_DOCKER") != "1",
    reason="needs a Docker engine: set COHERE_GATEWAY_TEST_DOCKER=1 where one runs",
)
def test_compose_stack_comes_up_with_docker(tmp_path: Path) -> None:  # pragma: no cover - no Docker on CI
    import secrets

    from testcontainers.compose import DockerCompose

    # compose has no default passwords (docs/security.md): this run's own
    names = (
        "CLICKHOUSE_PASSWORD",
        "CLICKHOUSE_READER_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "COHERE_GATEWAY_API_TOKEN",
    )
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={secrets.token_hex(16)}\n" for name in names))
    with DockerCompose(str(ROOT), compose_file_name="docker-compose.yml", build=True, wait=True,
                       env_file=str(env_file)) as stack:  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:8091/readyz", timeout=3) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"consumer never ready:\n{stack.get_logs('consumer')}")
        with urllib.request.urlopen("http://127.0.0.1:8080/healthz", timeout=5) as resp:
            assert resp.status == 200
