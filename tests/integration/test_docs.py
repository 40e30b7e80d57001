"""The docs cannot go stale: the README's table and the example config are checked."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from statsd_filter.config import load_settings
from statsd_filter.options import OPTIONS
from tests.integration.harness import BIN, Proxy, Sink, clean_env

ROOT = Path(__file__).resolve().parents[2]


def settings_table() -> str:
    """The README's settings table (Markdown), generated from the option list."""
    rows = [
        "| flag | environment | TOML key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        default = option.default_text or option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        elif isinstance(default, bool):
            default = str(default).lower()
        flag = f"`{option.flag}`"
        if option.flag_kind == "bool":
            flag += f" / `--no-{option.flag[2:]}`"
        rows.append(f"| {flag} | `{option.env}` | `{option.name}` | {default} | {option.help} |")
    return "\n".join(rows)


def test_readme_settings_table_is_current() -> None:
    """The README's settings table is exactly the one generated from the option list."""
    table = settings_table()
    assert table in (ROOT / "README.md").read_text(), f"paste this table into README.md:\n{table}"


def test_readme_commands_match_ci() -> None:
    """.ci/run calls the README's test command, and the README's run command uses the CLI."""
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install . && .venv/bin/statsd-filter run" in readme


def test_example_config_is_valid_and_used(sink: Sink) -> None:
    """examples/statsd-filter.toml passes check-config and drives a real proxy."""
    example = ROOT / "examples" / "statsd-filter.toml"
    keys = set(tomllib.loads(example.read_text()))
    assert keys <= {o.name for o in OPTIONS}
    result = subprocess.run(
        [str(BIN), "check-config", "--config", str(example)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert (
        f'blocklist = ["debug.", "test.", "_sc|legacy."]  # config file {example}' in result.stdout
    )
    # Flags override the file's ports, so the example's blocklist is what is tested.
    with Proxy(
        "--config", str(example), "--target-port", str(sink.port), "--target-host", "127.0.0.1"
    ) as proxy:
        proxy.udp(b"debug.x:1|c\nkept:1|c\ntest.y:1|g\n_sc|legacy.check|0")
        lines = sink.wait_for_lines(1)
        proxy.wait_settled()
    assert lines == [b"kept:1|c"]


def test_readme_toml_examples_are_valid(tmp_path: Path) -> None:
    """Every TOML example in the README loads as a valid config (rules and upstreams too)."""
    readme = (ROOT / "README.md").read_text()
    blocks = readme.split("```toml\n")[1:]
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        path = tmp_path / f"example{i}.toml"
        path.write_text(block.split("```", 1)[0])
        settings = load_settings(env={}, config_file=str(path))
        assert settings.rules or settings.upstreams, f"README TOML example {i} sets nothing"
