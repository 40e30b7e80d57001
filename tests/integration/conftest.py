"""Fixtures for integration tests: a capture sink and a real Etsy statsd upstream."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.etsy import EtsyStatsd, etsy_available
from tests.integration.harness import BIN, ROOT, Sink, clean_env


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


@dataclass(frozen=True)
class Dist:
    """The sdist and wheel built from this tree, and what the build printed."""

    sdist: Path
    wheel: Path
    output: str


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """``python -m build`` of this tree: the sdist, then the wheel built from the sdist.

    No isolation: the installed setuptools (a test dependency) builds it, so the
    tests need no download. Where a C compiler exists the accelerator must
    compile into the wheel, as in the Dockerfile's builder stage.
    """
    out = tmp_path_factory.mktemp("dist")
    env = clean_env()
    if shutil.which("cc"):
        env["STATSD_FILTER_REQUIRE_ACCELERATOR"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return Dist(sdist, wheel, result.stdout + result.stderr)
