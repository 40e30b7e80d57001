"""Unit tests for statsd_filter.upstream.spec: upstream addresses, Unix sockets included."""

from __future__ import annotations

import pytest

from statsd_filter.upstream.spec import UpstreamSpec, parse_upstreams


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "unix:///var/run/datadog/dsd.socket",
            UpstreamSpec("/var/run/datadog/dsd.socket", 0, "unix"),
        ),
        ("unix+stream:///run/dsd.sock", UpstreamSpec("/run/dsd.sock", 0, "unix+stream")),
        (" unix:///a.sock ", UpstreamSpec("/a.sock", 0, "unix")),
        ("10.0.0.1:8125", UpstreamSpec("10.0.0.1", 8125, "udp")),
        ("[::1]:8125", UpstreamSpec("::1", 8125, "udp")),
    ],
)
def test_address_strings(raw: str, expected: UpstreamSpec) -> None:
    """--target strings: Unix addresses name their protocol; host:port takes the default."""
    assert parse_upstreams(raw, "udp") == (expected,)


@pytest.mark.parametrize(
    "address", ["unix:///var/run/datadog/dsd.socket", "unix+stream:///run/x.sock", "h:1", "[::1]:2"]
)
def test_address_round_trips_as_written(address: str) -> None:
    """The node id (address) is the string as written: what the hash ring hashes."""
    (spec,) = parse_upstreams([address], "udp")
    assert spec.address == address


def test_unix_tables_and_matching_protocol() -> None:
    """[[upstreams]] tables take Unix addresses; repeating the protocol is allowed."""
    specs = parse_upstreams(
        [
            {"address": "unix:///a.sock", "weight": 7},
            {"address": "unix+stream:///b.sock", "protocol": "unix+stream"},
            {"address": "h:1"},
        ],
        "tcp",
    )
    assert specs == (
        UpstreamSpec("/a.sock", 0, "unix", 7),
        UpstreamSpec("/b.sock", 0, "unix+stream"),
        UpstreamSpec("h", 1, "tcp"),
    )
    assert [s.is_unix for s in specs] == [True, True, False]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            "unix://run/x.sock",
            "'unix://run/x.sock': the socket path must be absolute (unix:///path)",
        ),
        ("unix://", "'unix://': the socket path must be absolute (unix:///path)"),
        (
            "unixgram:///x.sock",
            "'unixgram:///x.sock': write unix:///path (datagram) or unix+stream:///path (stream)",
        ),
        (
            "unixstream:///x.sock",
            "'unixstream:///x.sock': write unix:///path (datagram) or unix+stream:///path (stream)",
        ),
        (
            "udp://h:1",
            (
                "'udp://h:1' is not host:port, unix:///path or unix+stream:///path "
                "(unknown scheme 'udp')"
            ),
        ),
        (
            "unix:///" + "x" * 107,
            f"'/{'x' * 107}' is 108 bytes long; Unix socket paths are limited to 107 bytes",
        ),
        ("unix:///a\0b", "'/a\\x00b' contains a NUL byte"),
        ("unix:///a.sock,unix:///a.sock", "upstream unix:///a.sock is listed twice"),
    ],
)
def test_bad_unix_addresses(raw: str, message: str) -> None:
    """A Unix address that cannot work is refused with the reason."""
    with pytest.raises(ValueError) as err:
        parse_upstreams(raw, "udp")
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"address": "unix:///a.sock", "protocol": "udp"},
            (
                "upstream unix:///a.sock: protocol 'udp' contradicts the address "
                "(a unix:// address is protocol 'unix')"
            ),
        ),
        (
            {"address": "unix+stream:///a.sock", "protocol": "unix"},
            (
                "upstream unix+stream:///a.sock: protocol 'unix' contradicts the address "
                "(a unix+stream:// address is protocol 'unix+stream')"
            ),
        ),
        (
            {"address": "h:1", "protocol": "unix"},
            (
                "upstream h:1: protocol 'unix' is not udp or tcp "
                "(a Unix socket is written unix:///path or unix+stream:///path)"
            ),
        ),
        (
            {"address": "unix:///a.sock", "admin_port": 8126},
            "upstream unix:///a.sock: admin_port needs a host:port upstream",
        ),
        ({"protocol": "udp"}, 'upstream #1: needs address = "host:port" or "unix:///path"'),
    ],
)
def test_bad_unix_tables(table: dict[str, object], message: str) -> None:
    """[[upstreams]] tables that contradict a Unix address are refused with the reason."""
    with pytest.raises(ValueError) as err:
        parse_upstreams([table], "udp")
    assert str(err.value) == message
