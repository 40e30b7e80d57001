"""Unit tests for statsd_filter.cli: error reporting, check-config and format_settings."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from statsd_filter.cli import format_settings, main
from statsd_filter.config import load_settings
from statsd_filter.options import LEGACY_ENV, OPTIONS

# Valid non-default raw values per setting (same values as test_config's table).
FLAG_SAMPLES: dict[str, tuple[list[str], object]] = {
    "listen_host": (["--listen-host", "0.0.0.0"], "0.0.0.0"),
    "listen_port": (["--listen-port", "9125"], 9125),
    "protocols": (["--protocols", "udp"], ["udp"]),
    "target_host": (["--target-host", "10.1.2.3"], "10.1.2.3"),
    "target_port": (["--target-port", "9126"], 9126),
    "target_protocol": (["--target-protocol", "tcp"], "tcp"),
    "blocklist": (["--blocklist", "debug.,test.", "--blocklist", "x."], ["debug.", "test.", "x."]),
    "workers": (["--workers", "3"], 3),
    "max_udp_size": (["--max-udp-size", "8192"], 8192),
    "max_line_bytes": (["--max-line-bytes", "1024"], 1024),
    "max_read_delay": (["--max-read-delay", "0.05"], 0.05),
    "so_rcvbuf": (["--so-rcvbuf", "0"], 0),
    "tcp_idle_timeout": (["--tcp-idle-timeout", "2.5"], 2.5),
    "max_connections": (["--max-connections", "7"], 7),
    "upstream_buffer_bytes": (["--upstream-buffer-bytes", "4096"], 4096),
    "shutdown_timeout": (["--shutdown-timeout", "0.5"], 0.5),
    "admin": (["--no-admin"], False),
    "admin_host": (["--admin-host", "::1"], "::1"),
    "admin_port": (["--admin-port", "0"], 0),
    "log_level": (["--log-level", "debug"], "debug"),
    "log_format": (["--log-format", "json"], "json"),
    "allowlist_mode": (["--allowlist-mode"], True),
    "watch_config": (["--watch-config"], True),  # with --config (every flag test gives one)
    "target": (
        ["--target", "127.0.0.1:9001", "--target", "[::1]:9002"],
        ["127.0.0.1:9001", "[::1]:9002"],
    ),
    "upstream_mode": (["--upstream-mode", "mirror"], "mirror"),
    "health_interval": (["--health-interval", "0.25"], 0.25),
    "unix_socket": (["--unix-socket", "/tmp/sf.sock"], "/tmp/sf.sock"),
    "unix_stream_socket": (["--unix-stream-socket", "/tmp/sfs.sock"], "/tmp/sfs.sock"),
    "unix_stream_framing": (["--unix-stream-framing", "newline"], "newline"),
    "unix_socket_mode": (["--unix-socket-mode", "0660"], "0660"),
    "unix_socket_max_payload": (["--unix-socket-max-payload", "131072"], 131072),
    "unix_upstream_max_payload": (["--unix-upstream-max-payload", "65536"], 65536),
    "unix_origin_detection": (["--unix-origin-detection"], True),
    "procfs_path": (["--procfs-path", "/host/proc"], "/host/proc"),
    "top": (["--no-top"], False),
    "top_sample_rate": (["--top-sample-rate", "50"], 50),
    "top_window": (["--top-window", "30"], 30.0),
    "tap_max_watchers": (["--tap-max-watchers", "0"], 0),
    "limit_memory": (["--limit-memory", "16_777_216"], 16777216),
    "aggregate": (["--aggregate"], True),
    "flush_interval": (["--flush-interval", "2.5"], 2.5),
    "aggregate_max_series": (["--aggregate-max-series", "5000"], 5000),
    "upstream_flavor": (["--upstream-flavor", "datadog"], "datadog"),
}
# Settings with a flag (the rest are TOML-only tables, shown as comments).
SCALAR = [o.name for o in OPTIONS if o.flag_kind != "toml"]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's environment must not leak into the settings under test."""
    for name in list(os.environ):
        if name.startswith("STATSD_FILTER_") or name in LEGACY_ENV:
            monkeypatch.delenv(name)


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr, asserted to be exactly one 'statsd-filter: error:' line; returns it."""
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("statsd-filter: error: ")
    return lines[0]


def test_check_config_warns_of_an_upstream_that_does_not_resolve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unresolvable upstream host is a warning, not an error: DNS may come later."""
    assert main(["check-config", "--target", "statsd.invalid:8125,127.0.0.1:8126"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "# settings are valid"
    assert len(err) == 2
    assert err[0].startswith("# warning: upstream statsd.invalid:8125 does not resolve now")


def test_subcommand_errors_show_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad tap port or protocol list is an error of `tap`, with tap's usage, not a traceback."""
    for args in (["tap", "--port", "70000"], ["tap", "--protocols", "sctp"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: statsd-filter tap ")
        assert "statsd-filter tap: error: " in err
        assert "Traceback" not in err


def check_config(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run check-config, assert success and the stderr note, return stdout."""
    assert main(["check-config", *args]) == 0
    captured = capsys.readouterr()
    assert captured.err == "# settings are valid\n"
    return captured.out


# ------------------------------------------------------------------ bad values


@pytest.mark.parametrize("command", ["check-config", "run"])
def test_bad_flag_value_exits_2_with_one_line(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag value returns 2 and prints one error line naming the flag (before running)."""
    assert main([command, "--target-port", "70000"]) == 2
    assert error_line(capsys) == (
        "statsd-filter: error: invalid target_port from command-line flag --target-port: "
        "70000 is out of range: must be between 1 and 65535"
    )


def test_bad_env_value_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad environment value returns 2 and names the variable."""
    monkeypatch.setenv("STATSD_FILTER_WORKERS", "0")
    assert main(["check-config"]) == 2
    assert error_line(capsys) == (
        "statsd-filter: error: invalid workers from environment variable "
        "STATSD_FILTER_WORKERS: 0 is out of range: must be between 1 and 1024"
    )


def test_bad_legacy_env_value_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value in the original's num_threads names that variable."""
    monkeypatch.setenv("num_threads", "-4")
    assert main(["check-config"]) == 2
    assert "from environment variable num_threads: -4 is out of range" in error_line(capsys)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--workers", "many"], "invalid workers from command-line flag --workers: 'many'"),
        (["--protocols", "udp,sctp"], "'sctp' is not one of udp, tcp"),
        (["--protocols", ""], "at least one of udp, tcp is required"),
        (["--log-level", "loud"], "invalid log_level from command-line flag --log-level"),
        (["--target-protocol", "http"], "'http' is not one of udp, tcp"),
        (["--listen-port", "9000", "--admin-port", "9000"], "9000 is also the listen_port"),
    ],
)
def test_bad_values_exit_2(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each kind of bad value returns 2 with one clear error line."""
    assert main(["check-config", *args]) == 2
    assert expected in error_line(capsys)


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown keys, invalid TOML and missing files each give one error line and 2."""
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    assert main(["check-config", "--config", str(unknown)]) == 2
    assert f"unknown setting 'colour' in config file {unknown}" in error_line(capsys)

    broken = tmp_path / "broken.toml"
    broken.write_text("[[[\n")
    assert main(["check-config", "--config", str(broken)]) == 2
    assert f"config file {broken} is not valid TOML" in error_line(capsys)

    missing = tmp_path / "missing.toml"
    assert main(["check-config", "--config", str(missing)]) == 2
    assert f"cannot read config file {missing}" in error_line(capsys)


def test_config_file_value_error_names_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value in the file names the setting and the file."""
    path = tmp_path / "c.toml"
    path.write_text("target_port = 70000\n")
    assert main(["check-config", "--config", str(path)]) == 2
    assert error_line(capsys) == (
        f"statsd-filter: error: invalid target_port from config file {path}: "
        "70000 is out of range: must be between 1 and 65535"
    )


def test_abbreviated_flag_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """Long options cannot be abbreviated: --target-h never means --target-host."""
    with pytest.raises(SystemExit) as exc:
        main(["check-config", "--target-h", "x"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --target-h" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a subcommand the help goes to stderr and the exit code is 2."""
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "check-config" in captured.err
    assert "usage:" in captured.err


# ---------------------------------------------------------------- check-config


def test_check_config_prints_every_setting_with_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """check-config prints one line per setting, in table order, each ending with its source."""
    assert main(["check-config"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [line.split(" = ", 1)[0] for line in lines] == SCALAR
    for line in lines:
        assert line.endswith("  # default"), line


@pytest.mark.parametrize("name", sorted(FLAG_SAMPLES))
def test_check_config_flag(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every setting has a flag; check-config shows the flag's value and names the flag."""
    args, expected = FLAG_SAMPLES[name]
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    out = check_config(capsys, "--config", str(empty), *args)
    assert set(tomllib.loads(out)) == set(SCALAR)
    assert tomllib.loads(out)[name] == expected
    shown = [line for line in out.splitlines() if line.startswith(f"{name} = ")]
    assert shown[0].endswith("  # command-line flag --" + name.replace("_", "-"))


def test_flag_samples_cover_every_setting() -> None:
    """The flag table names every setting, so none can lose its flag unnoticed."""
    assert set(FLAG_SAMPLES) == set(SCALAR)


def test_check_config_shows_each_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sources of a mixed configuration are shown per setting: file, env, legacy env, flag."""
    path = tmp_path / "c.toml"
    path.write_text('target_host = "from-file"\nworkers = 2\nlisten_port = 9001\n')
    monkeypatch.setenv("STATSD_FILTER_TARGET_HOST", "from-env")
    monkeypatch.setenv("num_threads", "3")
    assert main(["check-config", "--config", str(path), "--admin", "--log-level", "error"]) == 0
    out = capsys.readouterr().out.splitlines()
    shown = {line.split(" = ", 1)[0]: line for line in out}
    assert shown["target_host"] == (
        'target_host = "from-env"  # environment variable STATSD_FILTER_TARGET_HOST'
    )
    assert shown["workers"] == "workers = 3  # environment variable num_threads"
    assert shown["listen_port"] == f"listen_port = 9001  # config file {path}"
    assert shown["admin"] == "admin = true  # command-line flag --admin"
    assert shown["log_level"] == 'log_level = "error"  # command-line flag --log-level'
    assert shown["target_port"] == "target_port = 8126  # default"


def test_check_config_output_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config's output is a valid config file that reproduces the same settings."""
    args = ["--blocklist", 'a.,"q",é.,back\\slash', "--tcp-idle-timeout", "0", "--workers", "2"]
    assert main(["check-config", *args]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "effective.toml"
    path.write_text(out, encoding="utf-8")
    again = load_settings(env={}, config_file=str(path))
    original = load_settings(
        cli={"blocklist": 'a.,"q",é.,back\\slash', "tcp_idle_timeout": "0", "workers": "2"},
        env={},
    )
    assert again.as_dict() == original.as_dict()
    assert again.blocklist == ("a.", '"q"', "é.", "back\\slash")


def test_format_settings_lines() -> None:
    """format_settings writes 'name = json-value  # source' for every setting."""
    s = load_settings(cli={"blocklist": "x.,y."}, env={"STATSD_FILTER_ADMIN": "off"})
    lines = [line for line in format_settings(s).splitlines() if not line.startswith("#")]
    assert len(lines) == len(SCALAR)
    by_name = {line.split(" = ", 1)[0]: line for line in lines}
    assert by_name["blocklist"] == 'blocklist = ["x.", "y."]  # command-line flag --blocklist'
    assert by_name["admin"] == "admin = false  # environment variable STATSD_FILTER_ADMIN"
    assert by_name["protocols"] == 'protocols = ["udp", "tcp"]  # default'
    for name in SCALAR:
        value = json.loads(by_name[name].split(" = ", 1)[1].rsplit("  # ", 1)[0])
        assert value == s.as_dict()[name]
