"""Helpers for the networking daemons' tests: run a daemon in a thread for the
length of a test, a pong service, and stand-ins for a scheme daemon."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Iterator, List, Optional

import pytest

import pyipc
from pyipc.daemons import Daemon
from conftest import frame


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    """The daemon serving in a thread; stopped and joined on exit."""
    runner = threading.Thread(target=daemon.run, kwargs={"handle_signals": False})
    runner.start()
    try:
        assert daemon.ready.wait(10), f"{daemon.name} did not become ready"
        yield daemon
    finally:
        daemon.stop()
        runner.join(10)
        assert not runner.is_alive(), f"{daemon.name} did not stop"


@contextlib.contextmanager
def stuck_service(rundir: str, name: str) -> Iterator[None]:
    """A service `name` in `rundir` that accepts nobody, its listen backlog
    full: the next connect() to it would wait (a hung or swamped service)."""
    path = os.path.join(rundir, name)
    filling: List[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(0)
        try:
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                try:
                    sock.connect(path)
                except BlockingIOError:
                    sock.close()
                    break
                filling.append(sock)
            yield
        finally:
            for sock in filling:
                sock.close()


def stops_cleanly(proc: subprocess.Popen, notify: socket.socket) -> None:
    """SIGTERM a daemon started under (stand-in) systemd: it says
    STOPPING=1 on the notify socket, then exits 0."""
    proc.terminate()
    assert notify.recv(100) == b"STOPPING=1"
    assert proc.wait(20) == 0


def reap(proc: subprocess.Popen) -> None:
    """After a daemon's test: kill it if the test failed before it stopped,
    and close the stderr pipe it was started with."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    proc.stderr.close()


class Pong(Daemon):
    """The service `pong` (or another name): answers each message with itself."""

    name = "pong"

    def __init__(self, service: str = "pong", **kw) -> None:
        super().__init__(**kw)
        self.service = service

    def setup(self) -> None:
        self.ctx.service_init(self.service)

    def on_event(self, ev: pyipc.Event) -> None:
        if ev.type == pyipc.EventType.MESSAGE_RX:
            self.ctx.schedule(ev.fd, ev.message)


class Burst(Daemon):
    """The service `burst`: to each client, `count` messages of `size`
    bytes (message i filled with its number), then it closes (waiting,
    linger, until they are written)."""

    name = "burst"

    def __init__(self, count: int = 40, size: int = 1 << 20, **kw) -> None:
        super().__init__(**kw)
        self.messages = [(b"%08d" % i) * (size // 8) for i in range(count)]

    def setup(self) -> None:
        self.ctx.service_init("burst")

    def on_event(self, ev: pyipc.Event) -> None:
        if ev.type == pyipc.EventType.CONNECTION:
            for message in self.messages:
                self.ctx.schedule(ev.fd, message)
            self.ctx.close(ev.fd, linger=60)


def send_while_slow_to_read(sendall) -> None:
    """A relay's peer that is busy for a moment (the service has written
    and closed meanwhile), sends 200 messages, and is busy again before it
    reads (the graceful-close tests of tcpd and tlsd). The scenario's pace,
    not a synchronisation."""
    time.sleep(1)
    for _ in range(200):
        sendall(frame(b"y" * 1000))
    time.sleep(1)


def frames_of(data: bytes) -> List[bytes]:
    """The payloads of the whole frames in `data` (a partial one left out)."""
    out, at = [], 0
    while len(data) - at >= 4:
        (size,) = struct.unpack_from(">I", data, at)
        if len(data) - at - 4 < size:
            break
        out.append(data[at + 4:at + 4 + size])
        at += 4 + size
    return out


def read_exactly(sock: socket.socket, n: int) -> bytes:
    """n bytes from sock (fewer only at its end). MSG_WAITALL does not wait
    on a socket with a timeout set: hence the loop."""
    got = b""
    while len(got) < n:
        more = sock.recv(n - len(got))
        if not more:
            break
        got += more
    return got


def read_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">I", read_exactly(sock, 4))
    return read_exactly(sock, size)


class FakeScheme:
    """A stand-in for a scheme daemon (service `scheme` in rundir): each
    request (a framed URI) is given to `answer(conn, uri)` on its own thread,
    which answers however the test wants (or never: it may wait on `release`)."""

    def __init__(self, rundir: str, scheme: str,
                 answer: Callable[[socket.socket, bytes], None]) -> None:
        self.path = os.path.join(rundir, scheme)
        self.answer = answer
        self.uris: List[bytes] = []
        self.got = threading.Semaphore(0)          # one release per request received
        self.release = threading.Event()
        self.closed_by_ipcd: List[bool] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(64)
        self.threads: List[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            # Listed before it starts: a test woken by what the thread does
            # (wait_requests) may look at `threads` at once.
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                uri = read_frame(conn)
            except (struct.error, OSError):
                return                          # the wake-up connection of close()
            self.uris.append(uri)
            self.got.release()
            self.answer(conn, uri)

    def wait_requests(self, n: int, timeout: float = 10) -> None:
        for _ in range(n):
            assert self.got.acquire(timeout=timeout), f"fewer than {n} requests: {self.uris}"

    def close(self) -> None:
        self.release.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
            with contextlib.suppress(OSError):
                wake.connect(self.path)
        # shutdown() ends an accept() blocked in the kernel (close() alone does
        # not, when the acceptor went back into accept() after the wake-up
        # connection); the acceptor is joined first, so that no thread it
        # starts is missed (a thread left running fails tests that need the
        # process alone, tests/test_schedule_buffer.py).
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.acceptor.join(10)
        assert not self.acceptor.is_alive(), "the stand-in daemon's acceptor did not end"
        for t in self.threads:
            t.join(10)
        os.unlink(self.path)


def ask_raw(rundir: str, request: bytes) -> socket.socket:
    """A raw client of ipcd that has sent `request` (framed) and not read."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.path.join(rundir, "ipc"))
    sock.sendall(frame(request))
    return sock


def raw_answer(sock: socket.socket, timeout: float = 10) -> tuple[bytes, Optional[int]]:
    """ipcd's raw answer and the fd that came with it (None when none did)."""
    sock.settimeout(timeout)
    data, fds, _, _ = socket.recv_fds(sock, 1000, 4)
    for extra in fds[1:]:
        os.close(extra)
    return data, (fds[0] if fds else None)


@contextlib.contextmanager
def hung_lookups(monkeypatch: pytest.MonkeyPatch, host: str) -> Iterator[None]:
    """Name lookups of `host` hang until the block ends, as with a resolver
    that never answers (stood in for in this process: the daemon runs in a
    thread of it); other names resolve as usual."""
    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(name, *args, **kw):
        if name == host:
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(name, *args, **kw)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    try:
        yield
    finally:
        release.set()


def fail_first_offload(daemon: Daemon) -> None:
    """The daemon's first offload() raises, as when no worker thread can be
    started ("can't start new thread"); the next ones work."""
    real, calls = daemon.offload, []

    def offload(fn, on_done) -> None:
        calls.append(fn)
        if len(calls) == 1:
            raise RuntimeError("can't start new thread")
        real(fn, on_done)
    daemon.offload = offload          # type: ignore[method-assign]
