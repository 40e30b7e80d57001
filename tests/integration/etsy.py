"""A real Etsy StatsD daemon (npm ``statsd`` 0.9.0) as an upstream for integration tests.

Install it with ``npm ci --no-audit --no-fund --prefix tests/node`` (package.json and
package-lock.json live there); :func:`etsy_available` tells whether that was done and a
``node`` binary is on PATH.  :class:`EtsyStatsd` runs ``node stats.js <config>`` on
127.0.0.1 only (data port over UDP or TCP, admin port over TCP), with no backend (so
nothing reaches the network) and a flush interval of ~11.5 days, so counters are never
reset during a test.  Counters, gauges and timers are read back from the admin port.

Facts about Etsy statsd 0.9.0 that our tests rely on.  Each was checked by sending the
line over UDP and over TCP (same results) to a running daemon and reading the admin port;
paths are under ``tests/node/node_modules/statsd``:

* Always-present counters, created as 0 at startup (stats.js 214-225):
  ``statsd.bad_lines_seen``, ``statsd.packets_received``, ``statsd.metrics_received``.
  ``packets_received`` counts UDP datagrams, or TCP ``data`` events that contain a
  newline (so it is not deterministic over TCP); ``metrics_received`` counts every
  non-empty line, good or bad (stats.js 237-251).  No gauge exists at startup
  (``statsd.timestamp_lag`` only appears at the second flush, stats.js 74-76).  A
  restarted daemon starts from these three zeros again.
* Lines are split on ``\\n`` only; empty lines are skipped, not counted (stats.js
  240-249).  Over TCP only data up to the last ``\\n`` is processed; an unterminated
  tail is dropped when the connection closes (servers/tcp.js 16-22).  The TCP server
  decodes as ``ascii``, UDP as UTF-8 (servers/tcp.js 13, stats.js 239).
* DogStatsD tags are **folded into the name**, not dropped and not rejected: the line is
  split on ``|#`` and the tags are appended as ``;k=v`` (first ``:`` of each tag becomes
  ``=``, first ``;`` becomes ``_``), then the key is sanitized (stats.js 256-268): spaces
  -> ``_``, ``/`` -> ``-``, every char outside ``[a-zA-Z0-9_.;=-]`` removed (stats.js
  164-172).  ``name:1|c|#env:dev,a:b`` -> counter ``name;env=dev;a=b`` = 1;
  ``name:1|c|@0.5|#env:dev`` -> ``name;env=dev`` = 2; ``g:3|g|#env:dev`` -> gauge
  ``g;env=dev``; ``t:3|ms|#env:dev`` -> timer ``t;env=dev``; ``x:1|c|#a:b|c:abc``
  (container id field) -> ``x;a=bcabc``; ``x:1|c|#a:b|T1656581400`` -> ``x;a=bT1656581400``.
  So the bare name is never incremented by a tagged line.
* ``|T<ts>`` without tags (``x:1|c|T1656581400``) is a bad line: the 3rd field must be a
  sample rate ``@<non-negative number>`` (lib/helpers.js 18-39).
* Events ``_e{5,4}:title|text`` are **bad lines** (+1 ``statsd.bad_lines_seen``, nothing
  stored): the value ``title`` is not a number (lib/helpers.js 49-53, stats.js 284-289).
  Validation is per ``:``-separated value, not per line, so one event can add several
  bad lines, or even a counter: ``_e{5,4}:title|text|d:1656581400|h:host|#env:dev`` adds
  2 bad lines AND counter ``_e54;env=dev`` = 1656581400.  Avoid ``:`` in test events.
* Service checks ``_sc|name|0`` (also with ``|#tags|m:msg``) are **bad lines** (+1): with
  no ``:`` the value defaults to ``1`` and there is no type field (stats.js 277-279,
  lib/helpers.js 30-32).  Bare ``name`` and ``name:1`` (no type) are bad lines too.
* ``\\r`` at line end is tolerated: the type is ``.trim()``-ed (stats.js 294) and
  ``Number()`` ignores whitespace, so ``a:1|c\\r``, ``g:5|g\\r``, ``t:5|ms\\r``,
  ``a:1|c|@0.5\\r`` (=2) and ``\\r\\n``-separated lines all count normally.  But a ``\\r``
  after tags lands in the name as ``_`` (``a:1|c|#env:dev\\r`` -> ``a;env=dev_``), a lone
  ``\\r`` line (e.g. from ``\\r\\n\\r\\n``) is a bad line, and ``t:-5|ms\\r`` is accepted
  (negative timers are otherwise bad lines: the ``'ms'`` case misses ``'ms\\r'``,
  lib/helpers.js 42-48).
* Sample rates scale counters only: ``name:1|c|@0.1`` adds 10, ``name:3|c|@0.5`` adds 6
  (stats.js 290-291, 321).  Timers store the raw value (``t:10|ms|@0.1`` -> ``[10]``;
  the rate only affects the flushed count, stats.js 300-301); gauges ignore it.
* Other types: ``h`` and ``d`` (and any unknown type with a numeric value) are counted as
  **counters** (stats.js 317-322); counters accept negatives and floats (``-4``,
  ``1.5``).  ``name:1|c:2|c`` adds 3.  Gauges: ``+N``/``-N`` are relative only if the
  gauge already exists and is non-zero, else absolute (stats.js 307-311).  Sets
  (``|s``) are stored but not visible through the admin port (no ``sets`` command).
* The admin port prints ``util.inspect()`` of the objects, not JSON (stats.js 403-416):
  single-quoted keys when not identifiers, one entry per line once long, arrays of
  more than 6 numbers in aligned columns, and only the first 100 array items unless
  ``util.inspect.defaultOptions.maxArrayLength`` is raised -- which this module does in a
  script preloaded with ``node -r`` (it also restores ``util.log``, which stats.js and
  lib/config.js call but Node 23+ removed).  Answers end with ``END\\n\\n``, except
  ``health``/``help``/``config``/unknown commands (``ERROR``).
* Config: ``servers: [{server: "./servers/udp"|"./servers/tcp", address, port}]``
  (stats.js 330-335, servers/udp.js 7, servers/tcp.js 35), ``mgmt_address`` /
  ``mgmt_port`` (lib/mgmt_server.js 21); ``backends: []`` loads no backend (omitting it
  loads graphite, stats.js 455-462).  The config file is ``eval``-ed (lib/config.js 19),
  so JSON works.  ``flushInterval`` must stay below 2**31-1 ms or Node's setTimeout
  fires at once.  A port already in use makes the daemon crash at startup
  (``EADDRINUSE``), which :meth:`EtsyStatsd.start` reports with its output.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Self, TypeAlias

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "ETSY_DIR",
    "LOCALHOST",
    "NODE_DIR",
    "STATS_JS",
    "EtsyStatsd",
    "EtsyStatsdError",
    "etsy_available",
    "parse_inspect",
    "pick_free_port",
]

#: ``<repo>/tests/node``: holds package.json / package-lock.json pinning statsd 0.9.0.
NODE_DIR: Final[Path] = Path(__file__).resolve().parent.parent / "node"
#: The installed Etsy statsd package (``npm ci --prefix tests/node`` puts it there).
ETSY_DIR: Final[Path] = NODE_DIR / "node_modules" / "statsd"
#: The daemon's entry point.
STATS_JS: Final[Path] = ETSY_DIR / "stats.js"
#: The only address the daemon ever listens on.
LOCALHOST: Final[str] = "127.0.0.1"

#: Flush interval in ms: ~11.5 days, so counters are never reset during a test.  It must
#: stay below 2**31 - 1 ms, otherwise Node's setTimeout overflows and fires after 1 ms.
FLUSH_INTERVAL_MS: Final[int] = 1_000_000_000

Protocol: TypeAlias = Literal["udp", "tcp"]
InspectValue: TypeAlias = float | str | list["InspectValue"] | dict[str, "InspectValue"]

# Admin commands whose answer ends with an "END" line (stats.js, lib/mgmt_console.js).
_END_COMMANDS: Final[frozenset[str]] = frozenset(
    {"stats", "counters", "timers", "gauges", "delcounters", "deltimers", "delgauges"}
)
_END_RE: Final[re.Pattern[bytes]] = re.compile(rb"(?:^|\n)END\n")

# Preloaded with ``node -r``: makes util.inspect print timer arrays of any length (its
# default maxArrayLength of 100 would print "... N more items"), and puts back util.log,
# which statsd 0.9.0 calls at startup but Node 23+ removed (DEP0059).
_PRELOAD_JS: Final[str] = """\
const util = require('util');
util.inspect.defaultOptions.maxArrayLength = null;
if (typeof util.log !== 'function') {
  util.log = (...args) => console.log(new Date().toISOString() + ' - ' + util.format(...args));
}
"""


class EtsyStatsdError(RuntimeError):
    """The Etsy statsd daemon could not be started or did not answer."""


def etsy_available() -> bool:
    """True when a ``node`` binary is on PATH and statsd is installed under ETSY_DIR."""
    return shutil.which("node") is not None and STATS_JS.is_file()


def pick_free_port(*, udp: bool = True, tcp: bool = True, attempts: int = 50) -> int:
    """A port on 127.0.0.1 that is currently free for every requested protocol.

    Binds to port 0 (UDP first when requested), then checks that the same port number
    can also be bound with the other protocol, and closes everything.
    """
    if not (udp or tcp):
        raise ValueError("ask for at least one of udp/tcp")
    kinds = [k for k, wanted in ((socket.SOCK_DGRAM, udp), (socket.SOCK_STREAM, tcp)) if wanted]
    for _ in range(attempts):
        first = socket.socket(socket.AF_INET, kinds[0])
        try:
            first.bind((LOCALHOST, 0))
            port: int = first.getsockname()[1]
            ok = True
            for kind in kinds[1:]:
                other = socket.socket(socket.AF_INET, kind)
                try:
                    other.bind((LOCALHOST, port))
                except OSError:
                    ok = False
                finally:
                    other.close()
            if ok:
                return port
        finally:
            first.close()
    raise EtsyStatsdError(f"no free port on {LOCALHOST} after {attempts} attempts")


# --------------------------------------------------------------------------------------
# Parser for the subset of Node's util.inspect() output that the admin port prints:
# objects with bare or quoted keys, arrays, numbers (incl. NaN, Infinity, -0, 1e+21),
# strings, and "... N more items" markers (skipped).
# --------------------------------------------------------------------------------------

_TOKEN_RE: Final[re.Pattern[str]] = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<more>\.\.\.\ \d+\ more\ items?)
  | (?P<punct>[{}\[\],:])
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`)
  | (?P<num>-?(?:Infinity|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
  | (?P<ident>[A-Za-z_$][\w$]*)
    """,
    re.VERBOSE,
)

_ESCAPES: Final[dict[str, str]] = {
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    "v": "\v",
    "0": "\0",
}


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\" or i + 1 >= len(body):
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt == "x" and i + 3 < len(body):
            out.append(chr(int(body[i + 2 : i + 4], 16)))
            i += 4
        elif nxt == "u" and i + 5 < len(body):
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
    return "".join(out)


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"cannot parse util.inspect output at {pos}: {text[pos : pos + 40]!r}")
        pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        if kind != "ws":
            tokens.append((kind, m.group()))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokenize(text)
        self._pos = 0

    def _peek(self) -> tuple[str, str]:
        if self._pos >= len(self._tokens):
            return ("eof", "")
        return self._tokens[self._pos]

    def _take(self, kind: str, value: str | None = None) -> str:
        tok = self._peek()
        if tok[0] != kind or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value or kind}, got {tok[1]!r} (token {self._pos})")
        self._pos += 1
        return tok[1]

    def parse(self) -> InspectValue:
        value = self._value()
        if self._peek()[0] != "eof":
            raise ValueError(f"trailing data in util.inspect output: {self._peek()[1]!r}")
        return value

    def _value(self) -> InspectValue:
        kind, text = self._peek()
        if kind == "num":
            self._pos += 1
            return float(text)
        if kind == "str":
            self._pos += 1
            return _unquote(text)
        if (kind, text) == ("punct", "{"):
            return self._object()
        if (kind, text) == ("punct", "["):
            return self._array()
        raise ValueError(f"unexpected token {text!r} in util.inspect output")

    def _object(self) -> dict[str, InspectValue]:
        self._take("punct", "{")
        result: dict[str, InspectValue] = {}
        while self._peek() != ("punct", "}"):
            kind, text = self._peek()
            if kind == "more":
                self._pos += 1
            else:
                if kind == "str":
                    key = _unquote(text)
                elif kind in ("ident", "num"):
                    key = text
                else:
                    raise ValueError(f"unexpected object key {text!r}")
                self._pos += 1
                self._take("punct", ":")
                result[key] = self._value()
            if self._peek() == ("punct", ","):
                self._pos += 1
            elif self._peek() != ("punct", "}"):
                raise ValueError(f"expected ',' or '}}', got {self._peek()[1]!r}")
        self._take("punct", "}")
        return result

    def _array(self) -> list[InspectValue]:
        self._take("punct", "[")
        result: list[InspectValue] = []
        while self._peek() != ("punct", "]"):
            if self._peek()[0] == "more":
                self._pos += 1
            else:
                result.append(self._value())
            if self._peek() == ("punct", ","):
                self._pos += 1
            elif self._peek() != ("punct", "]"):
                raise ValueError(f"expected ',' or ']', got {self._peek()[1]!r}")
        self._take("punct", "]")
        return result


def parse_inspect(text: str) -> InspectValue:
    """Parse Node ``util.inspect`` output (as printed by the admin port) into Python.

    A trailing ``END`` line (the admin terminator) is ignored.  Numbers become floats.
    """
    lines = text.rstrip().splitlines()
    if lines and lines[-1].strip() == "END":
        lines = lines[:-1]
    return _Parser("\n".join(lines)).parse()


def _as_float_dict(value: InspectValue) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {value!r}")
    out: dict[str, float] = {}
    for key, item in value.items():
        if not isinstance(item, float):
            raise TypeError(f"expected a number for {key!r}, got {item!r}")
        out[key] = item
    return out


def _as_float_list_dict(value: InspectValue) -> dict[str, list[float]]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {value!r}")
    out: dict[str, list[float]] = {}
    for key, item in value.items():
        if not isinstance(item, list) or not all(isinstance(v, float) for v in item):
            raise TypeError(f"expected a list of numbers for {key!r}, got {item!r}")
        out[key] = [v for v in item if isinstance(v, float)]
    return out


class EtsyStatsd:
    """A real Etsy statsd 0.9.0 daemon on 127.0.0.1, for integration tests.

    Ports are chosen (or taken from the arguments) once, in the constructor, so that a
    proxy can be pointed at ``.port`` before the daemon runs, and so that ``stop()``
    followed by ``start()`` brings the daemon back on the same ports ("upstream down,
    then back").  A restarted daemon starts with fresh counters.

    Use as a context manager (starts on enter, stops and removes its temp dir on exit)::

        with EtsyStatsd(protocol="udp") as etsy:
            send_to(("127.0.0.1", etsy.port), b"a:1|c")
            etsy.wait_for_counter("a", 1)
    """

    def __init__(
        self,
        protocol: Protocol = "udp",
        *,
        port: int | None = None,
        admin_port: int | None = None,
        startup_timeout: float = 15.0,
        admin_timeout: float = 5.0,
    ) -> None:
        if protocol not in ("udp", "tcp"):
            raise ValueError(f"protocol must be 'udp' or 'tcp', not {protocol!r}")
        self.protocol: Protocol = protocol
        self.host: str = LOCALHOST
        self.port: int = port if port is not None else pick_free_port()
        self.admin_port: int = (
            admin_port if admin_port is not None else self._pick_admin_port(self.port)
        )
        self.startup_timeout = startup_timeout
        self.admin_timeout = admin_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._starts = 0

    @staticmethod
    def _pick_admin_port(data_port: int) -> int:
        for _ in range(50):
            candidate = pick_free_port(udp=False, tcp=True)
            if candidate != data_port:
                return candidate
        raise EtsyStatsdError("could not pick an admin port distinct from the data port")

    # ------------------------------------------------------------------ lifecycle

    @property
    def config(self) -> dict[str, object]:
        """The daemon configuration (written as a JS object literal)."""
        return {
            "servers": [
                {"server": f"./servers/{self.protocol}", "address": LOCALHOST, "port": self.port}
            ],
            "mgmt_address": LOCALHOST,
            "mgmt_port": self.admin_port,
            # An empty list loads no backend at all (the default would be graphite).
            "backends": [],
            "flushInterval": FLUSH_INTERVAL_MS,
            "automaticConfigReload": False,
            "log": {"backend": "stdout"},
        }

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure_files(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="etsy-statsd-"))
        tmp = self._tmpdir
        (tmp / "config.js").write_text(json.dumps(self.config, indent=2) + "\n")
        (tmp / "preload.js").write_text(_PRELOAD_JS)
        return tmp

    def _output(self) -> str:
        if self._tmpdir is None:
            return ""
        parts: list[str] = []
        for name in (f"stdout.{self._starts}.log", f"stderr.{self._starts}.log"):
            path = self._tmpdir / name
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ---\n{text[-4000:]}")
        return "\n".join(parts)

    def output(self) -> str:
        """The current run's stdout and stderr (tails), for diagnostics."""
        return self._output()

    def start(self) -> Self:
        """Start the daemon (no-op if running) and wait until the admin port answers."""
        if self.running:
            return self
        if not etsy_available():
            raise EtsyStatsdError(
                f"Etsy statsd not available: need `node` on PATH and {STATS_JS} "
                f"(run `npm ci --no-audit --no-fund --prefix {NODE_DIR}`)"
            )
        node = shutil.which("node")
        assert node is not None
        tmp = self._ensure_files()
        self._starts += 1
        stdout_path = tmp / f"stdout.{self._starts}.log"
        stderr_path = tmp / f"stderr.{self._starts}.log"
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                [node, "-r", str(tmp / "preload.js"), str(STATS_JS), str(tmp / "config.js")],
                cwd=str(ETSY_DIR),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            self._wait_until_up()
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        interval = 0.05
        last_error = "no attempt"
        for _ in range(int(self.startup_timeout / interval) + 2):
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                raise EtsyStatsdError(
                    f"Etsy statsd exited with code {code} during startup "
                    f"(udp/tcp port {self.port}, admin port {self.admin_port})\n{self._output()}"
                )
            try:
                answer = self.admin("counters", timeout=min(1.0, self.admin_timeout))
                if answer.startswith("{") and self._data_port_ready():
                    # stats.js binds the data server before the admin server; a bind
                    # error kills the process, so check once more that it is alive.
                    time.sleep(0.05)
                    if proc.poll() is None:
                        return
                    continue
                last_error = f"unexpected admin answer {answer!r}"
            except (OSError, EtsyStatsdError) as exc:
                last_error = repr(exc)
            if time.monotonic() >= deadline:
                break
            time.sleep(interval)
        raise EtsyStatsdError(
            f"Etsy statsd did not come up within {self.startup_timeout}s on admin port "
            f"{self.admin_port} (last error: {last_error})\n{self._output()}"
        )

    def _data_port_ready(self) -> bool:
        if self.protocol == "udp":
            return True
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
        self._proc = None

    def stop(self) -> None:
        """Terminate the daemon (SIGTERM, then SIGKILL after 5 s).  Ports are kept."""
        self._kill()

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the daemon and remove its temporary directory."""
        self.stop()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    # ------------------------------------------------------------------ traffic

    def send(self, payload: bytes | str) -> None:
        """Send raw bytes to the daemon's data port (one datagram, or one TCP stream).

        Etsy's TCP server only processes data up to the last newline, so a newline is
        appended to TCP payloads that lack one.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        if self.protocol == "udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(data, (self.host, self.port))
        else:
            if not data.endswith(b"\n"):
                data += b"\n"
            with socket.create_connection((self.host, self.port), timeout=5.0) as sock:
                sock.sendall(data)

    # ------------------------------------------------------------------ admin port

    def admin(self, command: str, *, timeout: float | None = None) -> str:
        """Send one command to the admin (management) port and return the raw answer.

        For commands whose answer ends with an ``END`` line (stats, counters, timers,
        gauges, del*), reads until that line; the returned text includes it.  For the
        others (health, help, config, unknown -> ``ERROR``) reads until the daemon has
        been silent for 0.2 s after answering.  Bounded by ``timeout`` seconds overall.
        """
        limit = self.admin_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        wants_end = command.split(" ", 1)[0].strip() in _END_COMMANDS
        buf = b""
        with socket.create_connection((self.host, self.admin_port), timeout=limit) as sock:
            sock.sendall(command.encode() + b"\n")
            max_reads = 100_000
            for _ in range(max_reads):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if wants_end or not buf:
                    sock.settimeout(remaining)
                else:
                    sock.settimeout(min(remaining, 0.2))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    if buf and not wants_end:
                        return buf.decode(errors="replace")
                    break
                if not chunk:
                    if wants_end:
                        break
                    return buf.decode(errors="replace")
                buf += chunk
                if wants_end and _END_RE.search(buf):
                    return buf.decode(errors="replace")
        raise EtsyStatsdError(
            f"admin command {command!r} on port {self.admin_port}: no complete answer "
            f"within {limit}s (got {buf[-500:]!r})"
        )

    def counters(self) -> dict[str, float]:
        """Current counters (never flushed/reset during a test)."""
        return _as_float_dict(parse_inspect(self.admin("counters")))

    def gauges(self) -> dict[str, float]:
        return _as_float_dict(parse_inspect(self.admin("gauges")))

    def timers(self) -> dict[str, list[float]]:
        """Raw timer values, in arrival order (not multiplied by sample rates)."""
        return _as_float_list_dict(parse_inspect(self.admin("timers")))

    def wait_for_counter(
        self, name: str, value: float, timeout: float = 10.0, *, interval: float = 0.05
    ) -> dict[str, float]:
        """Poll until counter ``name`` equals ``value`` (or ``timeout`` passes).

        Returns the last counters read either way; the caller asserts on them.
        """
        deadline = time.monotonic() + timeout
        counters = self.counters()
        for _ in range(int(timeout / interval) + 2):
            if counters.get(name) == value or time.monotonic() >= deadline:
                break
            time.sleep(interval)
            counters = self.counters()
        return counters

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"EtsyStatsd(protocol={self.protocol!r}, port={self.port}, "
            f"admin_port={self.admin_port}, {state})"
        )
