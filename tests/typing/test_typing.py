"""The programs of tests/typing/ as a user runs them, on both backends, and
the mistakes of tests/typing/must_fail/ as ``mypy --strict`` must report them.

(``ci/mypy`` checks that the programs themselves pass ``mypy --strict``.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyipc import Event, EventType, Registry
from pyipc.typed import TypedMessageError, UnexpectedTypeError, UnknownTypeError

from conftest import CHILD_ENV, ROOT

HERE = Path(__file__).resolve().parent
PROGRAMS = sorted(p.name for p in HERE.glob("*.py") if not p.name.startswith("test_"))
MUST_FAIL = sorted(p.name for p in (HERE / "must_fail").glob("*.py"))
#: "# error: [code]" at the end of a line of a must_fail program.
EXPECTED = re.compile(r"#\s*error:\s*\[([a-z-]+)\]\s*$")
#: One error line of mypy's output: path:line: error: text  [code]
REPORTED = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")


@pytest.mark.parametrize("program", PROGRAMS)
def test_program_runs(backend, rundir, program):
    env = {**CHILD_ENV, "PYIPC_BACKEND": backend, "RUNDIR": rundir}
    done = subprocess.run([sys.executable, str(HERE / program)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=rundir)
    assert done.returncode == 0, done.stdout + done.stderr


def _expected(path: Path) -> set[tuple[int, str]]:
    lines = path.read_text().splitlines()
    return {(i, m[1]) for i, line in enumerate(lines, 1) if (m := EXPECTED.search(line))}


@pytest.mark.parametrize("program", MUST_FAIL)
def test_mypy_reports_each_mistake(tmp_path, program):
    path = HERE / "must_fail" / program
    assert _expected(path), "a must_fail program marks its errors"
    # From the checkout, as ci/mypy checks the package: --follow-imports=silent
    # keeps errors inside pyipc out of this program's list.
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
         "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path),
         "--no-error-summary", "--hide-error-context", str(path)],
        capture_output=True, text=True, cwd=ROOT, env=CHILD_ENV, timeout=300)
    reported = {(int(m["line"]), m["code"]) for m in map(REPORTED.match, done.stdout.splitlines())
                if m}
    assert done.returncode == 1, done.stdout + done.stderr
    assert reported == _expected(path), done.stdout


# -- decode(payload, cls): what the checker is told is what comes back -------------
@dataclass
class Ping:
    seq: int


@dataclass
class Pong:
    seq: int


class LoudPing(Ping):
    """A subclass of Ping, registered on its own."""


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register(1, Ping)
    reg.register(2, Pong)
    reg.register(3, LoudPing)
    return reg


def test_decode_with_the_class_of_the_message(registry):
    assert registry.decode(registry.encode(Ping(4)), Ping) == Ping(4)
    assert registry.decode(registry.encode(LoudPing(5)), Ping) == LoudPing(5)    # a subclass
    event = Event(EventType.MESSAGE_RX, 3, 0, registry.encode(Pong(6)))
    assert registry.decode_event(event, Pong) == Pong(6)


def test_decode_with_another_class_raises(registry):
    with pytest.raises(UnexpectedTypeError) as caught:
        registry.decode(registry.encode(Ping(4)), Pong)
    assert str(caught.value) == "message type 1 (Ping) is not the expected Pong"
    assert (caught.value.number, caught.value.expected) == (1, Pong)
    assert isinstance(caught.value, TypedMessageError)
    event = Event(EventType.MESSAGE_RX, 3, 0, registry.encode(Ping(4)))
    with pytest.raises(UnexpectedTypeError):
        registry.decode_event(event, LoudPing)          # a Ping is not a LoudPing
    with pytest.raises(UnknownTypeError):
        registry.decode(b"\x09\xa0", Ping)             # unknown first, as without cls


def test_decode_cls_must_be_a_class(registry):
    with pytest.raises(TypeError, match="^cls must be a class, not str$"):
        registry.decode(registry.encode(Ping(4)), "Ping")
