"""Fixtures live in tests/fixtures/, one module per real part the tests start."""

pytest_plugins = [
    "tests.fixtures.kafka",
    "tests.fixtures.emulator",
    "tests.fixtures.clickhouse",
    "tests.fixtures.gateway",
    "tests.fixtures.browser",
    "tests.fixtures.redis",
]
