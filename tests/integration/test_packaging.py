"""The sdist and the wheel as a packager gets them: complete, licensed, built without warnings."""

from __future__ import annotations

import re
import shutil
import subprocess
import tarfile
import zipfile
from email.parser import Parser

from tests.integration.conftest import Dist
from tests.integration.harness import ROOT

# Tracked files the sdist leaves out on purpose: CI wiring and git's own.
NOT_IN_SDIST = {".ci/run", ".gitignore"}


def _sdist_names(dist: Dist) -> set[str]:
    with tarfile.open(dist.sdist) as archive:
        top = dist.sdist.name.removesuffix(".tar.gz") + "/"
        return {m.name.removeprefix(top) for m in archive.getmembers() if m.isfile()}


def test_build_prints_no_setuptools_warning(dist: Dist) -> None:
    """Building the sdist and the wheel prints no setuptools warning or deprecation notice."""
    offending = [
        line
        for line in dist.output.splitlines()
        if re.match(r"\s*WARNING\b", line) or "eprecat" in line or "SetuptoolsWarning" in line
    ]
    assert not offending, dist.output


def test_sdist_holds_every_tracked_file(dist: Dist) -> None:
    """The sdist has the license, changelog, tests, examples, contrib/ and the Dockerfile:
    every file git tracks (when this is a checkout), and no build or install leftovers."""
    names = _sdist_names(dist)
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "Dockerfile",
        "MANIFEST.in",
        "examples/statsd-filter.toml",
        "contrib/systemd/statsd-filter.service",
        "contrib/kubernetes/daemonset.yaml",
        "tests/integration/harness.py",
        "tests/node/package-lock.json",
        "csrc/_fastio.c",
        "csrc/fastio/recv.c",
        "scripts/test.sh",
    ):
        assert needed in names, needed
    assert not [n for n in names if "node_modules" in n or n.endswith((".so", ".pyc"))]
    if shutil.which("git") and (ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
        missing = sorted(set(tracked) - names - NOT_IN_SDIST)
        assert not missing, f"tracked files missing from the sdist: {missing}"


def test_wheel_metadata_and_contents(dist: Dist) -> None:
    """The wheel declares MIT as an SPDX expression with the LICENSE file, classifiers and
    Python >= 3.11, carries the compiled accelerator where a compiler exists, and no C
    source, tests or examples."""
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = wheel.namelist()
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(wheel.read(meta_name).decode())
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert metadata["Requires-Python"] == ">=3.11"
    classifiers = metadata.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.13" in classifiers
    assert "Environment :: No Input/Output (Daemon)" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")]  # the SPDX field says it
    assert "statsd_filter/py.typed" in names
    assert "statsd_filter/supervisor/notify.py" in names
    assert not [n for n in names if n.endswith(".c") or n.startswith(("tests/", "examples/"))]
    if shutil.which("cc"):
        assert [n for n in names if re.fullmatch(r"statsd_filter/_fastio\..*\.so", n)], names
