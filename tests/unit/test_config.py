"""Unit tests for statsd_filter.config.load_settings: defaults, layering, validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.config import ConfigError, Settings, available_cpus, load_settings
from statsd_filter.options import OPTIONS, OPTIONS_BY_NAME
from statsd_filter.upstream.spec import UpstreamSpec

# One valid, non-default value per setting: the raw string (as env/CLI give it)
# and the parsed value. A new setting without an entry here fails
# test_samples_cover_every_setting, so every setting gets its twins tested.
SAMPLES: dict[str, tuple[str, Any]] = {
    "listen_host": ("0.0.0.0", "0.0.0.0"),
    "listen_port": ("9125", 9125),
    "protocols": ("UDP", ("udp",)),
    "target_host": ("statsd.internal", "statsd.internal"),
    "target_port": ("9126", 9126),
    "target_protocol": ("TCP", "tcp"),
    "blocklist": ("debug., test.", ("debug.", "test.")),
    "workers": ("3", 3),
    "max_udp_size": ("8192", 8192),
    "max_line_bytes": ("1024", 1024),
    "max_read_delay": ("0.05", 0.05),
    "so_rcvbuf": ("0", 0),
    "tcp_idle_timeout": ("2.5", 2.5),
    "max_connections": ("7", 7),
    "upstream_buffer_bytes": ("4096", 4096),
    "shutdown_timeout": ("0.5", 0.5),
    "admin": ("false", False),
    "admin_host": ("::1", "::1"),
    "admin_port": ("0", 0),
    "log_level": ("DEBUG", "debug"),
    "log_format": ("JSON", "json"),
    "allowlist_mode": ("true", True),
    "watch_config": ("yes", True),  # needs a config file: the twin tests give an empty one
    "target": (
        "127.0.0.1:9001,[::1]:9002",
        (UpstreamSpec("127.0.0.1", 9001, "udp"), UpstreamSpec("::1", 9002, "udp")),
    ),
    "upstream_mode": ("MIRROR", "mirror"),
    "health_interval": ("0.25", 0.25),
    "unix_socket": ("/tmp/sf-test.sock", "/tmp/sf-test.sock"),
    "unix_stream_socket": ("/tmp/sf-test-stream.sock", "/tmp/sf-test-stream.sock"),
    "unix_stream_framing": ("NEWLINE", "newline"),
    "unix_socket_mode": ("0660", 0o660),
    "unix_socket_max_payload": ("131072", 131072),
    "unix_upstream_max_payload": ("65536", 65536),
    "unix_origin_detection": ("true", True),
    "procfs_path": ("/host/proc", "/host/proc"),
    "top": ("off", False),
    "top_sample_rate": ("50_000", 50000),
    "top_window": ("2.5", 2.5),
    "tap_max_watchers": ("0", 0),
    "limit_memory": ("16777216", 16777216),
    "aggregate": ("yes", True),
    "flush_interval": ("0.25", 0.25),
    "aggregate_max_series": ("1_000", 1000),
    "upstream_flavor": ("StatsD_Exporter", "statsd_exporter"),
}
# Settings with a flag and an environment variable (the rest are TOML-only tables).
SCALAR = [o.name for o in OPTIONS if o.flag_kind != "toml"]
LEGACY = ["listen_port", "target_host", "target_port", "blocklist", "num_threads"]


def write_toml(tmp_path: Path, text: str, name: str = "statsd-filter.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def toml_value(value: Any) -> str:
    """A parsed setting written back as a TOML value (JSON scalars/arrays are valid TOML)."""
    if isinstance(value, tuple) and value and isinstance(value[0], UpstreamSpec):
        return json.dumps([u.address for u in value])
    return json.dumps(list(value) if isinstance(value, tuple) else value)


# --------------------------------------------------------------------- defaults


def test_samples_cover_every_setting() -> None:
    """The sample table names every setting, each with a value that differs from its default."""
    assert set(SAMPLES) == set(SCALAR)
    for name, (_, value) in SAMPLES.items():
        assert value != OPTIONS_BY_NAME[name].default, name


def test_defaults() -> None:
    """With no file, env or flags, every setting has its documented default and source."""
    s = load_settings(env={})
    assert s == Settings(workers=available_cpus())
    assert s.listen_host == "127.0.0.1"
    assert s.listen_port == 8125
    assert s.protocols == ("udp", "tcp")
    assert s.target_host == "localhost"
    assert s.target_port == 8126
    assert s.target_protocol == "udp"
    assert s.blocklist == ()
    assert s.workers == available_cpus() >= 1
    assert s.max_udp_size == 1432
    assert s.max_line_bytes == 8192
    assert s.admin is True
    assert s.admin_port == 8127
    assert s.log_level == "info"
    assert dict(s.sources) == {o.name: "default" for o in OPTIONS}


def test_option_defaults_match_settings_dataclass() -> None:
    """The OPTIONS table and the Settings dataclass agree on every default."""
    plain = Settings()
    for option in OPTIONS:
        if option.default is not None:
            assert getattr(plain, option.name) == option.default, option.name


def test_as_dict_lists_tuples_and_omits_sources() -> None:
    """as_dict returns plain values (lists for tuples) and no 'sources' entry."""
    d = load_settings(env={"STATSD_FILTER_BLOCKLIST": "a,b"}).as_dict()
    assert "sources" not in d
    assert d["blocklist"] == ["a", "b"]
    assert d["protocols"] == ["udp", "tcp"]
    assert list(d) == SCALAR


# ---------------------------------------------------------------------- twins


@pytest.fixture
def empty_config(tmp_path: Path) -> str:
    """An empty TOML file: changes nothing, but lets watch_config be switched on."""
    return str(write_toml(tmp_path, "", "empty.toml"))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_env_twin(name: str, empty_config: str) -> None:
    """Every setting can be set by STATSD_FILTER_<NAME>, and the source says so."""
    option = OPTIONS_BY_NAME[name]
    raw, expected = SAMPLES[name]
    s = load_settings(env={option.env: raw}, config_file=empty_config)
    assert option.env == f"STATSD_FILTER_{name.upper()}"
    assert getattr(s, name) == expected
    assert s.sources[name] == f"environment variable {option.env}"
    assert all(src == "default" for key, src in s.sources.items() if key != name)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_toml_key(name: str, tmp_path: Path) -> None:
    """Every setting can be set by its TOML key, with a native TOML value."""
    _, expected = SAMPLES[name]
    path = write_toml(tmp_path, f"{name} = {toml_value(expected)}\n")
    s = load_settings(env={}, config_file=str(path))
    assert getattr(s, name) == expected
    assert s.sources[name] == f"config file {path}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_cli_value(name: str, empty_config: str) -> None:
    """Every setting can be given as a raw CLI value, and the source names the flag."""
    raw, expected = SAMPLES[name]
    s = load_settings(cli={name: raw}, env={}, config_file=empty_config)
    assert getattr(s, name) == expected
    assert s.sources[name] == "command-line flag --" + name.replace("_", "-")


def test_cli_none_means_not_given() -> None:
    """A CLI value of None leaves lower layers in force."""
    s = load_settings(cli={"target_port": None}, env={"STATSD_FILTER_TARGET_PORT": "9999"})
    assert s.target_port == 9999


# -------------------------------------------------------------------- layering


def test_layering_defaults_file_env_cli(tmp_path: Path) -> None:
    """Each layer overrides the one below: defaults < TOML file < env < CLI."""
    path = write_toml(tmp_path, 'target_port = 1001\ntarget_host = "file-host"\nworkers = 2\n')
    env = {"STATSD_FILTER_TARGET_PORT": "1002", "STATSD_FILTER_TARGET_HOST": "env-host"}
    s = load_settings(cli={"target_port": "1003"}, env=env, config_file=str(path))
    assert (s.target_port, s.target_host, s.workers, s.listen_port) == (1003, "env-host", 2, 8125)
    assert s.sources["target_port"] == "command-line flag --target-port"
    assert s.sources["target_host"] == "environment variable STATSD_FILTER_TARGET_HOST"
    assert s.sources["workers"] == f"config file {path}"
    assert s.sources["listen_port"] == "default"

    assert load_settings(env=env, config_file=str(path)).target_port == 1002
    assert load_settings(env={}, config_file=str(path)).target_port == 1001
    assert load_settings(env={}).target_port == 8126


def test_config_file_from_env(tmp_path: Path) -> None:
    """STATSD_FILTER_CONFIG names the TOML file when no --config is given."""
    path = write_toml(tmp_path, "target_port = 1111\n")
    s = load_settings(env={"STATSD_FILTER_CONFIG": str(path)})
    assert s.target_port == 1111
    assert s.sources["target_port"] == f"config file {path}"


def test_explicit_config_file_beats_env_config(tmp_path: Path) -> None:
    """An explicit config file (--config) is used instead of STATSD_FILTER_CONFIG."""
    from_env = write_toml(tmp_path, "target_port = 1111\n", "env.toml")
    explicit = write_toml(tmp_path, "target_port = 2222\n", "explicit.toml")
    s = load_settings(env={"STATSD_FILTER_CONFIG": str(from_env)}, config_file=str(explicit))
    assert s.target_port == 2222


# ----------------------------------------------------------- original variables


@pytest.mark.parametrize(
    ("variable", "raw", "name", "expected"),
    [
        ("listen_port", "9000", "listen_port", 9000),
        ("target_host", "upstream.example", "target_host", "upstream.example"),
        ("target_port", "9001", "target_port", 9001),
        ("blocklist", "a.,b., ,c.,a.", "blocklist", ("a.", "b.", "c.")),
        ("num_threads", "5", "workers", 5),
    ],
)
def test_legacy_variables(variable: str, raw: str, name: str, expected: object) -> None:
    """The original proxy's variables still work, and the source names the variable."""
    s = load_settings(env={variable: raw})
    assert getattr(s, name) == expected
    assert s.sources[name] == f"environment variable {variable}"


@pytest.mark.parametrize(
    ("variable", "name", "legacy", "prefixed", "expected"),
    [
        ("listen_port", "listen_port", "9000", "9100", 9100),
        ("target_host", "target_host", "old", "new", "new"),
        ("target_port", "target_port", "9001", "9101", 9101),
        ("blocklist", "blocklist", "old.", "new.", ("new.",)),
        ("num_threads", "workers", "5", "6", 6),
    ],
)
def test_legacy_variables_rank_below_prefixed(
    variable: str, name: str, legacy: str, prefixed: str, expected: object
) -> None:
    """STATSD_FILTER_<NAME> wins over the original variable of the same setting."""
    env = {variable: legacy, "STATSD_FILTER_" + name.upper(): prefixed}
    s = load_settings(env=env)
    assert getattr(s, name) == expected
    assert s.sources[name] == "environment variable STATSD_FILTER_" + name.upper()


def test_legacy_variables_rank_above_file_and_below_cli(tmp_path: Path) -> None:
    """An original variable overrides the TOML file and is overridden by a flag."""
    path = write_toml(tmp_path, "target_port = 1001\nworkers = 2\n")
    env = {"target_port": "2001", "num_threads": "4"}
    s = load_settings(env=env, config_file=str(path))
    assert (s.target_port, s.workers) == (2001, 4)
    s = load_settings(cli={"target_port": "3001"}, env=env, config_file=str(path))
    assert s.target_port == 3001


def test_legacy_bad_value_names_the_variable() -> None:
    """A bad value in an original variable is reported with that variable's name."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={"num_threads": "lots"})
    assert str(err.value) == (
        "invalid workers from environment variable num_threads: 'lots' is not an integer"
    )


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("env", "cli", "source"),
    [
        (
            {"STATSD_FILTER_TARGET_PORT": "70000"},
            {},
            "environment variable STATSD_FILTER_TARGET_PORT",
        ),
        ({}, {"target_port": "70000"}, "command-line flag --target-port"),
        ({"target_port": "70000"}, {}, "environment variable target_port"),
    ],
)
def test_port_out_of_range_names_setting_and_source(
    env: dict[str, str], cli: dict[str, object], source: str
) -> None:
    """Port 70000 is refused with a message naming target_port, its source and the range."""
    with pytest.raises(ConfigError) as err:
        load_settings(cli=cli, env=env)
    assert str(err.value) == (
        f"invalid target_port from {source}: 70000 is out of range: must be between 1 and 65535"
    )
    assert err.value.setting == "target_port"
    assert err.value.source == source


def test_port_out_of_range_in_file(tmp_path: Path) -> None:
    """A bad port in the TOML file names the file."""
    path = write_toml(tmp_path, "target_port = 70000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    assert str(err.value) == (
        f"invalid target_port from config file {path}: 70000 is out of range: "
        "must be between 1 and 65535"
    )


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(2**40), max_value=2**40))
def test_port_range(port: int) -> None:
    """Any target_port in 1..65535 is accepted as given; any other is refused."""
    if 1 <= port <= 65535:
        assert load_settings(env={"STATSD_FILTER_TARGET_PORT": str(port)}).target_port == port
    else:
        with pytest.raises(ConfigError, match="out of range"):
            load_settings(env={"STATSD_FILTER_TARGET_PORT": str(port)})


def test_unknown_key_in_file(tmp_path: Path) -> None:
    """An unknown TOML key is refused, naming the key and the file (typos must not pass)."""
    path = write_toml(tmp_path, 'target_port = 9000\ntraget_host = "x"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    message = str(err.value)
    assert message.startswith(f"unknown setting 'traget_host' in config file {path} (known: ")
    assert "target_host" in message
    assert err.value.setting == "traget_host"


def test_table_in_file_is_unknown_key(tmp_path: Path) -> None:
    """A TOML table (nested settings) is an unknown key too."""
    path = write_toml(tmp_path, "[upstream]\nport = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'upstream'"):
        load_settings(env={}, config_file=str(path))


def test_missing_file(tmp_path: Path) -> None:
    """A config file that does not exist is reported with its path and the OS reason."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    assert str(err.value) == f"cannot read config file {path}: No such file or directory"


def test_unreadable_file_directory(tmp_path: Path) -> None:
    """A config path that is a directory is reported as unreadable."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(tmp_path))
    assert str(err.value) == f"cannot read config file {tmp_path}: Is a directory"


def test_missing_file_from_env(tmp_path: Path) -> None:
    """A missing file named by STATSD_FILTER_CONFIG is reported the same way."""
    path = tmp_path / "gone.toml"
    with pytest.raises(ConfigError, match=f"cannot read config file {path}"):
        load_settings(env={"STATSD_FILTER_CONFIG": str(path)})


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is reported with its path and the parser's reason."""
    path = write_toml(tmp_path, "target_port = = 1\n")
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    assert str(err.value).startswith(f"config file {path} is not valid TOML: ")
    assert "line 1" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("-1", "-1 is out of range: must be between 1 and 1024"),
        ("0", "0 is out of range: must be between 1 and 1024"),
        ("1025", "1025 is out of range: must be between 1 and 1024"),
        ("three", "'three' is not an integer"),
        ("1.5", "'1.5' is not an integer"),
        ("", "'' is not an integer"),
        ("0x10", "'0x10' is not an integer"),
    ],
)
def test_bad_workers(raw: str, reason: str) -> None:
    """Bad worker counts are refused with the reason."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STATSD_FILTER_WORKERS": raw})
    assert str(err.value) == (
        f"invalid workers from environment variable STATSD_FILTER_WORKERS: {reason}"
    )


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("workers = 1.5", "expected an integer, got float"),
        ("workers = true", "expected an integer, got a boolean"),
        ("workers = -2", "-2 is out of range: must be between 1 and 1024"),
        ("target_host = 5", "expected a string, got int"),
        ('target_host = "  "', "must not be empty"),
        ("admin = 1", "1 is not a boolean (use true or false)"),
        ('blocklist = "a,b\\nc"', "'b\\nc' contains a newline"),
        ("blocklist = [1]", "expected a list of strings, found 1"),
        ("protocols = []", "at least one of udp, tcp is required"),
        ('tcp_idle_timeout = "nan"', "'nan' is not a finite number"),
        ("shutdown_timeout = 0", "0 is out of range: must be > 0"),
        ("tcp_idle_timeout = -1", "-1 is out of range: must be >= 0"),
        ("top_window = 601", "601 is out of range: must be <= 600"),
        ("top_window = 0.5", "0.5 is out of range: must be >= 1"),
        ("top_sample_rate = 0", "0 is out of range: must be between 1 and 1000000"),
        ("tap_max_watchers = 65", "65 is out of range: must be between 0 and 64"),
    ],
)
def test_bad_values_in_file(toml: str, reason: str, tmp_path: Path) -> None:
    """Wrongly typed or out-of-range TOML values are refused, naming setting, file and reason."""
    path = write_toml(tmp_path, toml + "\n")
    name = toml.split(" ", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    assert str(err.value) == f"invalid {name} from config file {path}: {reason}"


@pytest.mark.parametrize(
    ("variable", "raw", "reason"),
    [
        ("PROTOCOLS", "udp,sctp", "'sctp' is not one of udp, tcp"),
        ("PROTOCOLS", "", "at least one of udp, tcp is required"),
        ("PROTOCOLS", " , ,", "at least one of udp, tcp is required"),
        ("TARGET_PROTOCOL", "sctp", "'sctp' is not one of udp, tcp"),
        ("TARGET_PROTOCOL", "", "must not be empty"),
        ("LOG_LEVEL", "verbose", "'verbose' is not one of debug, info, warning, error"),
        ("ADMIN", "maybe", "'maybe' is not a boolean (use true or false)"),
        ("TCP_IDLE_TIMEOUT", "soon", "'soon' is not a number"),
        ("TCP_IDLE_TIMEOUT", "inf", "'inf' is not a finite number"),
        ("MAX_UDP_SIZE", "63", "63 is out of range: must be between 64 and 65507"),
        ("LISTEN_PORT", "70000", "70000 is out of range: must be between 0 and 65535"),
        ("LISTEN_HOST", "   ", "must not be empty"),
    ],
)
def test_bad_values_in_env(variable: str, raw: str, reason: str) -> None:
    """Bad env values are refused with a message naming setting, variable and reason."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STATSD_FILTER_" + variable: raw})
    assert str(err.value) == (
        f"invalid {variable.lower()} from environment variable STATSD_FILTER_{variable}: {reason}"
    )


def test_first_bad_setting_is_reported_in_table_order() -> None:
    """With several bad settings, the error names the first in OPTIONS order, deterministically."""
    env = {"STATSD_FILTER_LOG_LEVEL": "loud", "STATSD_FILTER_LISTEN_PORT": "-5"}
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert err.value.setting == "listen_port"


def test_admin_port_equal_to_listen_port(tmp_path: Path) -> None:
    """admin_port equal to listen_port (both TCP) is refused, naming both sources."""
    path = write_toml(tmp_path, "listen_port = 9000\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cli={"admin_port": "9000"}, env={}, config_file=str(path))
    assert str(err.value) == (
        "invalid admin_port from command-line flag --admin-port: 9000 is also the "
        f"listen_port (from config file {path})"
    )
    assert err.value.setting == "admin_port"


@pytest.mark.parametrize(
    "env",
    [
        {"STATSD_FILTER_ADMIN_PORT": "8125", "STATSD_FILTER_ADMIN": "false"},
        {"STATSD_FILTER_ADMIN_PORT": "8125", "STATSD_FILTER_PROTOCOLS": "udp"},
        {"STATSD_FILTER_ADMIN_PORT": "0", "STATSD_FILTER_LISTEN_PORT": "0"},
    ],
)
def test_admin_port_equal_to_listen_port_allowed_without_clash(env: dict[str, str]) -> None:
    """No clash when the admin server is off, TCP is not listened on, or both ports are 0."""
    s = load_settings(env=env)
    assert s.admin_port == s.listen_port


def test_watch_config_needs_a_config_file() -> None:
    """watch_config without a config file is refused: there would be nothing to watch."""
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STATSD_FILTER_WATCH_CONFIG": "true"})
    assert str(err.value).startswith(
        "invalid watch_config from environment variable STATSD_FILTER_WATCH_CONFIG: "
    )
    assert err.value.setting == "watch_config"


def test_host_brackets_are_stripped() -> None:
    """An IPv6 address may be written in brackets."""
    s = load_settings(env={"STATSD_FILTER_TARGET_HOST": "[::1]", "STATSD_FILTER_LISTEN_HOST": "::"})
    assert (s.target_host, s.listen_host) == ("::1", "::")


def test_values_are_trimmed_and_normalised() -> None:
    """Whitespace around values is ignored, digits may use underscores, choices any case."""
    env = {
        "STATSD_FILTER_TARGET_PORT": " 9_000 ",
        "STATSD_FILTER_PROTOCOLS": " TCP , udp ",
        "STATSD_FILTER_LOG_LEVEL": " Warning ",
        "STATSD_FILTER_ADMIN": " YES ",
    }
    s = load_settings(env=env)
    assert (s.target_port, s.protocols, s.log_level, s.admin) == (
        9000,
        ("tcp", "udp"),
        "warning",
        True,
    )


def test_blocklist_list_in_file(tmp_path: Path) -> None:
    """A TOML blocklist array keeps order, drops blanks and duplicates, strips spaces."""
    path = write_toml(tmp_path, 'blocklist = [" a. ", "", "b.", "a.", "é.*"]\n')
    s = load_settings(env={}, config_file=str(path))
    assert s.blocklist == ("a.", "b.", "é.*")


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after validation."""
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.target_port = 1  # type: ignore[misc]


def test_protocols_are_deduplicated_after_lowercasing() -> None:
    """'udp,UDP' names one listener, not two."""
    assert load_settings(cli={"protocols": "udp,UDP,tcp"}, env={}).protocols == ("udp", "tcp")


# ------------------------------------------------------------------ Unix sockets


@pytest.mark.parametrize(
    ("raw", "mode"),
    [("0722", 0o722), ("722", 0o722), ("0o600", 0o600), (" 0777 ", 0o777), ("0", 0)],
)
def test_unix_socket_mode_strings_are_octal(raw: str, mode: int) -> None:
    """A mode given as text is octal, as chmod writes it."""
    s = load_settings(env={"STATSD_FILTER_UNIX_SOCKET_MODE": raw})
    assert s.unix_socket_mode == mode
    assert s.as_dict()["unix_socket_mode"] == f"0{mode:o}"


@pytest.mark.parametrize(
    ("toml", "reason"),
    [
        ("unix_socket_mode = 722", "722 is not a file mode between 0 and 0777"),
        ('unix_socket_mode = "0800"', "'0800' is not an octal file mode (like 0722)"),
        ("unix_socket_mode = true", "expected a file mode, got a boolean"),
        ("unix_socket_mode = 1.5", "expected an octal file mode, got float"),
        ('unix_stream_framing = "json"', "'json' is not one of length, newline"),
        ("unix_socket_max_payload = 100", "100 is out of range: must be between 512 and 1048576"),
        ("unix_socket = 7", "expected a string, got int"),
    ],
)
def test_bad_unix_values_in_file(toml: str, reason: str, tmp_path: Path) -> None:
    """Bad Unix socket settings are refused, naming setting, file and reason."""
    path = write_toml(tmp_path, toml + "\n")
    name = toml.split(" ", 1)[0]
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=str(path))
    assert str(err.value).startswith(f"invalid {name} from config file {path}: {reason}")


def test_unix_socket_mode_as_toml_octal(tmp_path: Path) -> None:
    """TOML's own octal integers (0o722) are taken as they are."""
    path = write_toml(tmp_path, "unix_socket_mode = 0o660\n")
    assert load_settings(env={}, config_file=str(path)).unix_socket_mode == 0o660


def test_empty_unix_socket_path_means_none(tmp_path: Path) -> None:
    """An empty path turns a Unix socket off (and is how check-config shows it unset)."""
    path = write_toml(tmp_path, 'unix_socket = ""\n')
    s = load_settings(env={"STATSD_FILTER_UNIX_STREAM_SOCKET": " "}, config_file=str(path))
    assert s.unix_socket is None
    assert s.unix_stream_socket is None
    assert s.as_dict()["unix_socket"] == ""


def test_unix_socket_path_too_long() -> None:
    """A path longer than sockaddr_un can hold is refused before anything is bound."""
    path = "/tmp/" + "x" * 103
    with pytest.raises(ConfigError) as err:
        load_settings(env={"STATSD_FILTER_UNIX_SOCKET": path})
    assert str(err.value) == (
        "invalid unix_socket from environment variable STATSD_FILTER_UNIX_SOCKET: "
        f"{path!r} is 108 bytes long; Unix socket paths are limited to 107 bytes"
    )


def test_unix_sockets_cannot_share_a_path() -> None:
    """The datagram and stream sockets need two paths."""
    env = {
        "STATSD_FILTER_UNIX_SOCKET": "/tmp/same.sock",
        "STATSD_FILTER_UNIX_STREAM_SOCKET": "/tmp/same.sock",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert str(err.value) == (
        "invalid unix_stream_socket from environment variable STATSD_FILTER_UNIX_STREAM_SOCKET: "
        "/tmp/same.sock is also the unix_socket (from environment variable "
        "STATSD_FILTER_UNIX_SOCKET)"
    )


@pytest.mark.parametrize("listener", ["UNIX_SOCKET", "UNIX_STREAM_SOCKET"])
def test_upstream_cannot_be_our_own_unix_socket(listener: str) -> None:
    """Forwarding to our own Unix socket would loop: refused at load."""
    env = {
        f"STATSD_FILTER_{listener}": "/tmp/own.sock",
        "STATSD_FILTER_TARGET": "unix:///tmp/own.sock",
    }
    with pytest.raises(ConfigError) as err:
        load_settings(env=env)
    assert str(err.value) == (
        "invalid target from environment variable STATSD_FILTER_TARGET: unix:///tmp/own.sock "
        f"is this proxy's own {listener.lower()}: it would forward to itself"
    )


def test_unix_targets_keep_their_protocol(tmp_path: Path) -> None:
    """target_protocol fills in host:port upstreams only; Unix ones keep their scheme's."""
    path = write_toml(
        tmp_path,
        'target_protocol = "tcp"\n[[upstreams]]\naddress = "unix:///a.sock"\n'
        '[[upstreams]]\naddress = "h:1"\n',
    )
    s = load_settings(env={}, config_file=str(path))
    assert [(u.address, u.protocol) for u in s.effective_upstreams] == [
        ("unix:///a.sock", "unix"),
        ("h:1", "tcp"),
    ]
