"""The Kubernetes examples: YAML lint, the API schemas, and the proxy's own config check.

No cluster runs here: the manifests are checked against Kubernetes' published
schemas (``kubernetes-validate`` ships them, strict: an unknown field fails), and
each statsd-filter container's arguments and environment, with the ConfigMap's
config file, go through ``statsd-filter check-config``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from statsd_filter.cli import build_parser
from statsd_filter.completion import describe
from tests.integration.harness import BIN, ROOT, clean_env

MANIFESTS = ROOT / "contrib" / "kubernetes"
# The Unix-socket listener flags the DaemonSet names before they exist in every
# release: dropped from the check while this version's parser lacks them.
UPCOMING_FLAGS = ("--unix-socket", "--unix-stream-socket")


def documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} missing: pip install -e '.[test]'"
    return str(path)


def test_yamllint_strict() -> None:
    """yamllint (default rules, warnings count as failures) finds nothing."""
    result = subprocess.run(
        [tool("yamllint"), "--strict", "--format", "parsable", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_manifests_match_the_kubernetes_schemas(tmp_path: Path) -> None:
    """Every manifest validates strictly against the Kubernetes API schemas (offline), and
    the validator does reject a misspelt field."""
    files = [str(p) for p in sorted(MANIFESTS.glob("*.yaml"))]
    assert len(files) == 3
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 3, result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text((MANIFESTS / "sidecar.yaml").read_text().replace("periodSeconds", "period"))
    rejected = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rejected.returncode != 0


def statsd_filter_containers() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        out.extend(
            container
            for container in [*spec.get("initContainers", []), *spec.get("containers", [])]
            if container["image"].startswith("statsd-filter:")
        )
    return out


def test_workload_shapes() -> None:
    """The DaemonSet has a UDP hostPort and a hostPath socket directory; both workloads
    probe /healthz on the admin port, run non-root, and reload the ConfigMap's file."""
    kinds = {doc["kind"]: doc for doc in documents()}
    assert set(kinds) == {"ConfigMap", "DaemonSet", "Deployment"}
    daemon = kinds["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = daemon["containers"]
    assert {"containerPort": 8125, "hostPort": 8125, "protocol": "UDP", "name": "statsd-udp"} in (
        container["ports"]
    )
    (sockets,) = [v for v in daemon["volumes"] if "hostPath" in v]
    mount = next(m for m in container["volumeMounts"] if m["name"] == sockets["name"])
    args = container["args"]
    for flag in UPCOMING_FLAGS:
        assert args[args.index(flag) + 1].startswith(mount["mountPath"] + "/")
    sidecar_pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (sidecar,) = sidecar_pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    for c in statsd_filter_containers():
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert {"name": "admin", "containerPort": 8127, "protocol": "TCP"} in c["ports"]
        assert "--watch-config" in c["args"]
        security = {**c.get("securityContext", {})}
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("index", [0, 1])
def test_container_arguments_pass_check_config(index: int, tmp_path: Path) -> None:
    """Each statsd-filter container's args and env, with the ConfigMap's file in place of
    the mounted one, pass `statsd-filter check-config`."""
    containers = statsd_filter_containers()
    assert len(containers) == 2
    container = containers[index]
    (configmap,) = [d for d in documents() if d["kind"] == "ConfigMap"]
    ((name, text),) = configmap["data"].items()
    config = tmp_path / name
    config.write_text(text)
    _, commands = describe(build_parser())
    known = {flag.name for command in commands if command.name == "run" for flag in command.flags}
    args = list(container["args"])
    assert args[0] == "run"
    for flag in UPCOMING_FLAGS:
        if flag in args and flag not in known:
            at = args.index(flag)
            del args[at : at + 2]
    at = args.index("--config") + 1
    assert args[at] == f"/etc/statsd-filter/{name}"
    args[at] = str(config)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    result = subprocess.run(
        [str(BIN), "check-config", *args[1:]],
        capture_output=True,
        text=True,
        env=clean_env(env),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "# settings are valid" in result.stderr
    assert "watch_config = true" in result.stdout
