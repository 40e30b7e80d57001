"""Fixtures for integration tests: a capture sink and a real Etsy statsd upstream."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.etsy import EtsyStatsd, etsy_available
from tests.integration.harness import BIN, Sink


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _installed() -> None:
    """The console script under test must be installed in this interpreter's venv."""
    assert BIN.exists(), f"{BIN} missing: run scripts/test.sh (pip install -e '.[test]')"


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink("udp") as s:
        yield s


@pytest.fixture
def tcp_sink() -> Iterator[Sink]:
    with Sink("tcp") as s:
        yield s


@pytest.fixture
def etsy() -> Iterator[EtsyStatsd]:
    # Not a skip: CI installs it (scripts/test.sh), so its absence is a failure.
    assert etsy_available(), "Etsy statsd missing: npm ci --prefix tests/node"
    with EtsyStatsd("udp") as daemon:
        yield daemon
