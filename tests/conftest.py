"""Shared fixtures: every API test runs once per backend.

``backend`` is parametrised over "pure" and "native". A backend that cannot
load is skipped with the reason, except when PYIPC_REQUIRE_NATIVE=1 (CI): then
the test fails, so a broken native build can never pass as "skipped".
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn, Union

import pytest

import pyipc
import pyipc.aio
from pyipc import Event, EventType

BACKENDS = ["pure", "native"]
ROOT = Path(__file__).resolve().parent.parent

Predicate = Union[EventType, Callable[[Event], bool]]


def unavailable(why: str, required_by: str) -> NoReturn:
    """Skip the test because of `why`, or fail it when env `required_by` is
    "1" (ci/test sets PYIPC_REQUIRE_NATIVE, PYIPC_REQUIRE_BROWSER and
    PYIPC_REQUIRE_NETWORK): what CI must run never passes as skipped."""
    if os.environ.get(required_by) == "1":
        pytest.fail(f"{why} ({required_by}=1)")
    pytest.skip(why)


def require_network() -> None:
    """Skip a test that needs network namespaces where they cannot be made,
    or fail it when PYIPC_REQUIRE_NETWORK=1 (CI runs as root, ci/test installs ip)."""
    import netns        # tests/netns.py (imported here: bench/ uses it without pytest)
    why = netns.available()
    if why is not None:
        unavailable(why, "PYIPC_REQUIRE_NETWORK")


def require_socat() -> None:
    """The same for socat, the standard tool the tests talk to the daemons with."""
    if shutil.which("socat") is None:
        unavailable("socat is not installed (ci/test installs it)", "PYIPC_REQUIRE_NETWORK")


def require_openssl() -> None:
    """The same for the openssl command (a TLS peer no one here wrote)."""
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed (ci/test installs it)", "PYIPC_REQUIRE_NETWORK")


def require_backend(name: str) -> str:
    """``name`` if it loads; else skip, or fail when PYIPC_REQUIRE_NATIVE=1."""
    why = pyipc.available_backends()[name]
    if why is not None:
        unavailable(f"backend {name} cannot load: {why}", "PYIPC_REQUIRE_NATIVE")
    return name


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return require_backend(request.param)


@pytest.fixture
def rundir():
    """A short, private, existing run directory (sun_path is only 108 bytes)."""
    path = tempfile.mkdtemp(prefix="pyipc-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def ctx_factory(backend, rundir):
    """Make Contexts on the test's backend and run dir; all closed at teardown."""
    made: list[pyipc.Context] = []

    def make(**kwargs) -> pyipc.Context:
        kwargs.setdefault("rundir", rundir)
        kwargs.setdefault("backend", backend)
        ctx = pyipc.Context(**kwargs)
        made.append(ctx)
        return ctx

    try:
        yield make
    finally:
        for ctx in made:
            ctx.close_all()


def _matcher(what: Predicate) -> Callable[[Event], bool]:
    if isinstance(what, EventType):
        return lambda ev: ev.type == what
    return what


def wait_for(ctx: pyipc.Context, what: Predicate, timeout: float = 10.0,
             tick_ms: int = 50) -> list[Event]:
    """Events of ctx (wait_event, one at a time) up to and including the first
    that matches ``what`` (an EventType or a predicate). TIMER events from the
    polling tick are left out. Fails when nothing matches within ``timeout`` s.
    The events after the match stay pending in ctx."""
    match = _matcher(what)
    seen: list[Event] = []
    saved = ctx.timer
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no event matching {what!r} within {timeout} s on "
                            f"{ctx.backend}; saw {seen!r}")
            ctx.timer = max(1, min(tick_ms, int(left * 1000)))
            ev = ctx.wait_event()
            if ev.type == EventType.TIMER and not match(ev):
                continue
            seen.append(ev)
            if match(ev):
                return seen
    finally:
        ctx.timer = saved


def collect(ctx: pyipc.Context, until: Callable[[list[Event]], bool],
            timeout: float = 10.0) -> list[Event]:
    """Non-TIMER events of ctx until ``until(events)`` is true (or fail)."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    saved = ctx.timer
    try:
        while not until(seen):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"condition not met within {timeout} s on {ctx.backend}; "
                            f"saw {seen!r}")
            ctx.timer = max(1, min(50, int(left * 1000)))
            seen.extend(ev for ev in ctx.wait_events() if ev.type != EventType.TIMER)
        return seen
    finally:
        ctx.timer = saved


def quiet(ctx: pyipc.Context, ms: int = 100) -> list[Event]:
    """Every non-TIMER event of ctx until ``ms`` pass with nothing happening
    (only to check that nothing more comes)."""
    seen: list[Event] = []
    saved = ctx.timer
    ctx.timer = ms
    try:
        while True:
            events = [ev for ev in ctx.wait_events() if ev.type != EventType.TIMER]
            if not events:
                return seen
            seen.extend(events)
    finally:
        ctx.timer = saved


def settle(ctx: pyipc.Context) -> list[Event]:
    """Run rounds (timer 0) until two in a row find nothing; return the non-TIMER
    events. (A round may consume bytes without an event, e.g. part of a frame;
    what follows them, such as the EOF, is seen by the next round.)

    After it, every connection that ended before is released: its fd number is
    closed and unknown to ctx (an ended connection's fd may stay reserved until
    the round after its DISCONNECTION)."""
    seen: list[Event] = []
    saved = ctx.timer
    ctx.timer = 0
    quiet = 0
    try:
        while quiet < 2:
            events = [ev for ev in ctx.wait_events() if ev.type != EventType.TIMER]
            quiet = 0 if events else quiet + 1
            seen.extend(events)
        return seen
    finally:
        ctx.timer = saved


def deadline(timeout: float = 30.0) -> Callable[[], None]:
    """A tick() for polling loops: fails the test once ``timeout`` s have
    passed, so a lost message fails instead of hanging."""
    end = time.monotonic() + timeout

    def tick() -> None:
        if time.monotonic() > end:
            pytest.fail(f"loop did not finish within {timeout} s")
    return tick


def spin_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Busy-wait (no sleep) for a condition another party makes true; fail
    after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")


def unread_bytes(fd: int) -> int:
    """Bytes waiting in fd's socket receive buffer (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def raises(cls, text, call, *args):
    """Assert that call(*args) raises exactly ``cls`` with message ``text``."""
    with pytest.raises(pyipc.IPCError) as info:
        call(*args)
    assert type(info.value) is cls, info.value
    assert str(info.value) == text
    return info.value


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def check_echo_large_and_in_order(ctx, fd: int, greeting: bytes) -> None:
    """Through an echo service on fd: `greeting`, a 1 MiB message, then
    1,000 messages, each back whole and in order (then fd is closed)."""
    ctx.write(fd, greeting)
    assert ctx.read(fd, timeout=10) == greeting
    big = os.urandom(1 << 20)
    ctx.write(fd, big, timeout=10)
    assert ctx.read(fd, timeout=10) == big
    sent = [b"%d" % i for i in range(1000)]
    ctx.write_many(fd, sent, timeout=10)
    got: list = []
    while len(got) < len(sent):
        got += ctx.read_many(fd, timeout=10)
    assert got == sent
    ctx.close(fd)


def raw_connect(rundir: str, name: str) -> socket.socket:
    """A plain Unix socket connected to service ``name`` (a foreign peer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.path.join(rundir, name))
    return sock


class Pair:
    """A service context and a client context connected to it in this process."""

    def __init__(self, server: pyipc.Context, client: pyipc.Context, name: str) -> None:
        self.server, self.client, self.name = server, client, name
        self.service_fd = server.service_init(name)
        self.client_fd = client.connect_service(name)
        ev = wait_for(server, EventType.CONNECTION)[-1]
        self.server_fd = ev.fd
        self.server_index = ev.index


@pytest.fixture
def pair(ctx_factory) -> Pair:
    return Pair(ctx_factory(), ctx_factory(), "svc")


@pytest.fixture
def native_pair(rundir):
    """A Pair on the native backend, whatever the test's backend (white-box
    tests of the native backend's internals); both closed at teardown."""
    require_backend("native")
    server = pyipc.Context(rundir=rundir, backend="native")
    client = pyipc.Context(rundir=rundir, backend="native")
    try:
        yield Pair(server, client, "svc")
    finally:
        client.close_all()
        server.close_all()


@pytest.fixture
def wait():
    """The wait_for helper, for tests that prefer a fixture to an import."""
    return wait_for


#: Children import the same pyipc as the tests (the checkout or the installed one).
PYIPC_HOME = str(Path(pyipc.__file__).resolve().parent.parent)
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    p for p in (PYIPC_HOME, os.environ.get("PYTHONPATH", "")) if p))


def spawn(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """A Python child running ``code`` with the checkout importable."""
    kwargs.setdefault("env", CHILD_ENV)
    return subprocess.Popen([sys.executable, "-c", code, *args], **kwargs)


@pytest.fixture
def processes():
    """Start children with ``processes(code, *args)``; all killed and reaped at teardown."""
    started: list[subprocess.Popen] = []

    def start(code: str, *args: str, **kwargs) -> subprocess.Popen:
        proc = spawn(code, *args, **kwargs)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


# -- pyipc.aio -------------------------------------------------------------------------

def run_aio(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    """asyncio.run the coroutine, bounded."""
    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(bounded())


@pytest.fixture
def actx(backend, rundir):
    """Make pyipc.aio.Contexts on the test's backend and run dir."""
    def make(**kwargs: Any) -> pyipc.aio.Context:
        kwargs.setdefault("rundir", rundir)
        kwargs.setdefault("backend", backend)
        return pyipc.aio.Context(**kwargs)
    return make
