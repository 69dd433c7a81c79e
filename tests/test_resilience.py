"""Resilience: the run dir removed under a live service, a service killed and
restarted while its client reconnects, and every call interrupted by signals
(EINTR) again and again. Each test runs on both backends."""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import stat
import subprocess
import threading
import time
import zlib

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, raises, wait_for

TIMEOUT = 30.0



# -- the run dir removed under a running service --------------------------------------
def test_rundir_removed_under_a_running_service(ctx_factory, rundir, monkeypatch):
    monkeypatch.delenv("IPC_NETWORK", raising=False)    # connect() goes direct
    server, client = ctx_factory(), ctx_factory()
    service_fd = server.service_init("svc")
    cfd = client.connect_service("svc")
    sfd = wait_for(server, EventType.CONNECTION)[-1].fd

    shutil.rmtree(rundir)
    assert not os.path.exists(rundir)

    # The connection does not depend on the socket file: both ways still work.
    client.write(cfd, b"to the service")
    ev = wait_for(server, EventType.MESSAGE_RX)[-1]
    assert (ev.fd, ev.message) == (sfd, b"to the service")
    server.write(sfd, b"to the client")
    assert client.read(cfd) == b"to the client"
    client.schedule(cfd, b"scheduled" * 1000)
    wait_for(client, EventType.MESSAGE_TX)
    assert server.read(sfd) == b"scheduled" * 1000

    # Nobody new can find the service.
    newcomer = ctx_factory()
    raises(pyipc.ServiceNotFoundError, f"no service svc in {rundir}",
           newcomer.connect_service, "svc")
    raises(pyipc.ServiceNotFoundError, f"no service svc in {rundir}",
           newcomer.connect, "svc")

    # Closing the service (its socket file and run dir are gone) does not raise,
    # and its connection goes on.
    server.close(service_fd)
    server.write(sfd, b"after close")
    assert client.read(cfd) == b"after close"

    # A new service in the same, missing, run dir re-creates it with mode 0770.
    again = ctx_factory()
    again.service_init("svc")
    st = os.stat(rundir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o770
    assert stat.S_ISSOCK(os.stat(os.path.join(rundir, "svc")).st_mode)
    fd = newcomer.connect_service("svc")
    newcomer.write(fd, b"new")
    ev = wait_for(again, EventType.MESSAGE_RX)[-1]
    assert ev.message == b"new"
    again.write(ev.fd, b"welcome")
    assert newcomer.read(fd) == b"welcome"


# -- a service killed and restarted while its client reconnects -----------------------
ECHO_SERVICE = r"""
import sys, pyipc
from pyipc import EventType
with pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2]) as ctx:
    ctx.service_init(sys.argv[3])
    print("ready", flush=True)
    while True:
        for ev in ctx.wait_events():
            if ev.type == EventType.MESSAGE_RX:
                try:
                    ctx.schedule(ev.fd, ev.message)
                except pyipc.ConnectionClosedError:
                    pass
"""


class Lines:
    """stdout lines of a child, read with select and a deadline (never hangs)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.buf = proc, b""

    def expect(self, line: str, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                pytest.fail(f"no line {line!r} within {timeout} s; got {self.buf!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                self.proc.wait(TIMEOUT)
                pytest.fail(f"child ended (exit {self.proc.returncode}) before "
                            f"{line!r}; got {self.buf!r}; stderr: {self.proc.stderr.read()!r}")
            self.buf += chunk
        got, self.buf = self.buf.split(b"\n", 1)
        assert got.decode() == line


def start_echo(processes, rundir: str, backend: str, name: str) -> subprocess.Popen:
    proc = processes(ECHO_SERVICE, rundir, backend, name,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    Lines(proc).expect("ready")
    return proc


def reconnect(ctx: pyipc.Context, name: str, timeout: float = TIMEOUT) -> tuple[int, int]:
    """connect_service(name), retried on ServiceNotFoundError until the deadline;
    (fd, attempts)."""
    end = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            return ctx.connect_service(name), attempts
        except pyipc.ServiceNotFoundError:
            if time.monotonic() > end:
                raise
        select.select([], [], [], 0.01)     # a pause between attempts


def echo(ctx: pyipc.Context, fd: int, rounds: int = 20) -> None:
    for i in range(rounds):
        payload = os.urandom(i * 997)
        ctx.write(fd, payload)
        assert ctx.read(fd) == payload


def test_service_killed_and_restarted_while_the_client_reconnects(ctx_factory, rundir,
                                                                 backend, processes):
    path = os.path.join(rundir, "echo")
    first = start_echo(processes, rundir, backend, "echo")
    client = ctx_factory()
    watched = client.connect_service("echo")   # sees the end through the event loop
    direct = client.connect_service("echo")    # sees it through read()
    echo(client, watched)
    echo(client, direct)

    first.kill()
    assert first.wait(TIMEOUT) == -signal.SIGKILL

    ev = wait_for(client, EventType.DISCONNECTION)[-1]
    assert ev.fd in (watched, direct)
    with pytest.raises(pyipc.ConnectionClosedError):
        client.read(direct)
    with pytest.raises(pyipc.ConnectionClosedError):
        client.write(direct, b"anyone?")
    events = collect(client, lambda evs: any(e.type == EventType.DISCONNECTION
                                             for e in evs))
    assert {ev.fd} | {e.fd for e in events if e.type == EventType.DISCONNECTION} \
        == {watched, direct}

    # The dead service left its socket file (and its lock file, unlocked).
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert os.path.exists(path + ".lock")
    raises(pyipc.ServiceNotFoundError, f"no service echo in {rundir}",
           client.connect_service, "echo")

    # A new process takes the name over: the stale socket is replaced and the
    # lock that died with the first one is free.
    second = start_echo(processes, rundir, backend, "echo")
    fd, attempts = reconnect(client, "echo")
    assert attempts == 1      # "ready" is printed once the service listens
    echo(client, fd)
    client.schedule(fd, b"queued")
    wait_for(client, EventType.MESSAGE_TX)
    assert client.read(fd) == b"queued"

    # While it lives, the name is taken: another service of that name (here in
    # this process) is refused, and the live one is untouched.
    intruder = ctx_factory()
    raises(pyipc.ServiceBusyError, f"service echo is already running in {rundir}",
           intruder.service_init, "echo")
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    echo(client, fd)
    other, _ = reconnect(client, "echo")
    echo(client, other)
    assert second.poll() is None


def test_reconnect_loop_waits_for_a_service_that_comes_later(ctx_factory, rundir,
                                                            backend, processes):
    """The retry loop itself: started before the service process listens (stale
    socket there, refused), it connects once the new service is up."""
    first = start_echo(processes, rundir, backend, "late")
    first.kill()
    first.wait(TIMEOUT)
    client = ctx_factory()
    raises(pyipc.ServiceNotFoundError, f"no service late in {rundir}",
           client.connect_service, "late")
    second = processes(ECHO_SERVICE, rundir, backend, "late",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fd, _ = reconnect(client, "late")
    echo(client, fd)
    Lines(second).expect("ready")
    assert second.poll() is None


# -- EINTR everywhere ------------------------------------------------------------------
LATE_SENDER = r"""
import sys, time, pyipc
with pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2]) as ctx:
    fd = ctx.connect_service(sys.argv[3])
    time.sleep(0.1)
    ctx.write(fd, b"late" * 50000)
    assert ctx.read(fd) == b"thanks"
"""


def test_signals_interrupt_everything(pair, ctx_factory, processes, rundir, backend):
    fired = [0]

    def on_alarm(signum, frame):
        fired[0] += 1

    rng = random.Random(1234)
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        # 1. write/read round trips (up to 200 KB) through an echo loop in a thread.
        stop = threading.Event()
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                pair.server.timer = 20
                while not stop.is_set():
                    for ev in pair.server.wait_events():
                        if ev.type == EventType.MESSAGE_RX:
                            pair.server.write(ev.fd, ev.message)
                        elif ev.type in (EventType.ERROR, EventType.DISCONNECTION):
                            raise AssertionError(f"echo side saw {ev!r}")
            except BaseException as e:      # reported by the main thread
                failures.append(e)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            for i in range(2000):
                size = rng.choice((0, 1, 4, rng.randrange(4096),
                                   rng.randrange(200 * 1024 + 1)))
                payload = rng.randbytes(size)
                pair.client.write(pair.client_fd, payload)
                got = pair.client.read(pair.client_fd)
                assert len(got) == size and got == payload, (i, size, len(got))
                if failures:
                    break
        finally:
            stop.set()
            thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert not failures, failures
        after_round_trips = fired[0]
        assert after_round_trips > 0

        # 2. schedule + wait_event in both directions, with a timer.
        sent = [rng.randbytes(rng.choice((0, 10, 5000, 150_000))) for _ in range(300)]
        for payload in sent:
            pair.client.schedule(pair.client_fd, payload)
        got: list[bytes] = []
        crcs: list[int] = []
        tx = 0
        pair.server.timer = pair.client.timer = 1
        end = time.monotonic() + 60
        while len(got) < len(sent) or tx < len(sent) or len(crcs) < len(sent):
            assert time.monotonic() < end, (len(got), tx, len(crcs))
            for ev in pair.client.wait_events():
                if ev.type == EventType.MESSAGE_TX:
                    tx += 1
                elif ev.type == EventType.MESSAGE_RX:
                    crcs.append(int.from_bytes(ev.message, "big"))
                else:
                    assert ev.type == EventType.TIMER, ev
            for ev in pair.server.wait_events():
                if ev.type == EventType.MESSAGE_RX:
                    got.append(ev.message)
                    pair.server.schedule(ev.fd, zlib.crc32(ev.message).to_bytes(4, "big"))
                else:
                    assert ev.type in (EventType.TIMER, EventType.MESSAGE_TX), ev
        assert got == sent
        assert tx == len(sent)
        assert crcs == [zlib.crc32(p) for p in sent]

        # A TIMER is reported after the full timer, not early when a signal
        # interrupts the wait.
        for ms in (5, 20, 50):
            pair.client.timer = ms
            t0 = time.monotonic()
            ev = pair.client.wait_event()
            elapsed = time.monotonic() - t0
            assert ev.type == EventType.TIMER
            assert elapsed >= ms / 1000 - 0.002, (ms, elapsed)
        pair.server.timer = pair.client.timer = None

        # 3. a blocking read that waits ~100 ms for a message from another process.
        proc = processes(LATE_SENDER, rundir, backend, pair.name, stderr=subprocess.PIPE)
        late_fd = wait_for(pair.server, EventType.CONNECTION)[-1].fd
        assert pair.server.read(late_fd) == b"late" * 50000
        pair.server.write(late_fd, b"thanks")
        assert proc.wait(TIMEOUT) == 0, proc.stderr.read()

        # 4. connect_service, again and again, and to a service that is not there.
        others = [pair.client.connect_service(pair.name) for _ in range(200)]
        events = collect(pair.server, lambda evs: sum(
            e.type == EventType.CONNECTION for e in evs) >= len(others))
        accepted = [e.fd for e in events if e.type == EventType.CONNECTION]
        assert len(accepted) == len(others)
        for fd in others:
            pair.client.write(fd, b"%d" % fd)
        for fd in accepted:
            assert pair.server.read(fd).isdigit()
        for _ in range(50):
            raises(pyipc.ServiceNotFoundError, f"no service nobody in {rundir}",
                   pair.client.connect_service, "nobody")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired[0] > 100, fired[0]
