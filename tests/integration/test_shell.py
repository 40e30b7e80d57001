"""Shell completion, the man page and --help examples, as a user's shell and `man` see them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from statsd_filter.options import OPTIONS
from tests.integration.harness import BIN, clean_env

SETTING_FLAGS = [o.flag for o in OPTIONS if o.flag_kind != "toml"]


def cli(*args: str) -> str:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, env=clean_env(), timeout=30, check=True
    ).stdout


def complete(words: list[str], cwd: Path | None = None) -> list[str]:
    """What bash offers for the last word of ``words`` with the generated script loaded."""
    script = cli("completion", "bash")
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
        '_statsd_filter; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completes_commands_flags_and_values(tmp_path: Path) -> None:
    """bash completes the subcommands, a subcommand's flags, the choices of a flag's value,
    file names after --config, and nothing after a flag whose value cannot be guessed."""
    assert set(complete(["statsd-filter", ""])) >= {
        "run",
        "check-config",
        "explain",
        "tap",
        "completion",
        "manpage",
        "--version",
    }
    assert complete(["statsd-filter", "run", "--log-"]) == ["--log-level", "--log-format"]
    assert complete(["statsd-filter", "run", "--log-level", ""]) == [
        "debug",
        "info",
        "warning",
        "error",
    ]
    assert complete(["statsd-filter", "check-config", "--upstream-mode", "m"]) == ["mirror"]
    assert complete(["statsd-filter", "run", "--no-ad"]) == ["--no-admin"]
    assert complete(["statsd-filter", "run", "--listen-port", ""]) == []
    assert complete(["statsd-filter", "completion", ""]) == ["bash", "zsh"]
    (tmp_path / "proxy.toml").write_text("")
    assert complete(["statsd-filter", "run", "--config", "pro"], cwd=tmp_path) == ["proxy.toml"]


def test_bash_completion_offers_every_setting_flag() -> None:
    """Every setting's flag (from the option table) completes for run and check-config."""
    for command in ("run", "check-config"):
        offered = set(complete(["statsd-filter", command, "--"]))
        assert set(SETTING_FLAGS) <= offered, set(SETTING_FLAGS) - offered
        assert "--config" in offered


def zsh() -> str:
    found = shutil.which("zsh")
    assert found, "zsh missing: scripts/test.sh installs it"
    return found


def test_zsh_script_parses_and_registers(tmp_path: Path) -> None:
    """The zsh script is valid zsh, and sourcing it after compinit registers the function
    for statsd-filter; it names every setting flag with its help."""
    script = cli("completion", "zsh")
    path = tmp_path / "_statsd-filter"
    path.write_text(script)
    syntax = subprocess.run(
        [zsh(), "-n", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert syntax.returncode == 0, syntax.stderr
    program = (
        f"autoload -U compinit && compinit -u -d {tmp_path}/zcompdump && "
        f"source {path} && print -r -- $_comps[statsd-filter]"
    )
    registered = subprocess.run(
        [zsh(), "-f", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**clean_env(), "HOME": str(tmp_path)},
    )
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.strip() == "_statsd-filter"
    for flag in SETTING_FLAGS:
        assert f"{flag}[" in script, flag
    assert "'(--no-admin)--admin[" in script
    assert ":value:(debug info warning error)" in script


def test_man_page_renders_cleanly_with_every_flag(tmp_path: Path) -> None:
    """`statsd-filter manpage` is roff that groff renders without a warning, naming every
    flag with its environment variable, the signals, and an example per command."""
    page = tmp_path / "statsd-filter.1"
    page.write_text(cli("manpage"))
    groff = shutil.which("groff")
    assert groff, "groff missing (Debian: groff-base)"
    lint = subprocess.run(
        [groff, "-man", "-Tutf8", "-ww", "-z", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert lint.returncode == 0
    assert lint.stderr == ""
    rendered = subprocess.run(
        [groff, "-man", "-Tascii", "-P-c", "-P-b", "-P-u", str(page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for option in OPTIONS:
        if option.flag_kind == "toml":
            continue
        assert option.flag in rendered, option.flag
        assert option.env in rendered, option.env
    for section in ("SYNOPSIS", "COMMANDS", "OPTIONS", "SIGNALS", "EXIT STATUS", "EXAMPLES"):
        assert f"\n{section}\n" in rendered, section
    assert "statsd-filter manpage | man -l -" in rendered
    assert rendered.count("Example:") == 7  # one per command


@pytest.mark.parametrize(
    "command", ["run", "check-config", "explain", "completion", "manpage", "tap"]
)
def test_every_command_help_has_an_example(command: str) -> None:
    """Each subcommand's --help ends with one runnable example of it."""
    text = cli(command, "--help")
    example = text.rstrip().splitlines()[-1].strip()
    assert text.rstrip().splitlines()[-2] == "example:"
    assert example.split()[0] in ("statsd-filter", "source")
    assert command in example
