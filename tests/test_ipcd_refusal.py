"""connect() through ipcd when ipcd refuses with a reason ("ne CODE TEXT",
pyipc's addition to libIPC's protocol): the client raises a clear error
naming the code and the reason, the same class and text on both backends and
in pyipc.aio. ipcd is a stand-in in a thread answering the raw bytes given."""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
from typing import Iterator, List

import pytest

import pyipc
import pyipc.aio
from pyipc._types import MAX_IPCD_REASON as MAX_REASON

from conftest import raises
from test_aio import run


class RefusingIpcd:
    """A stand-in for ipcd at RUNDIR/ipc answering each request with
    `reply` (raw bytes, no fd), then closing; `requests` lists what came."""

    def __init__(self, rundir: str) -> None:
        self.path = os.path.join(rundir, "ipc")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.reply = b""
        #: False: an ipcd at its bounds, which answers without reading.
        self.read_requests = True
        self.closing = False
        self.requests: List[bytes] = []
        #: Requests answered and their connection closed (the fd is gone).
        self.done = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return              # closed: the test is over
            with conn:
                if self.closing:
                    return          # the wake-up connection of close()
                if not self.read_requests:
                    conn.sendall(self.reply)
                    self.done.release()
                    continue
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    return          # the wake-up connection of close()
                (size,) = struct.unpack(">I", head)
                self.requests.append(conn.recv(size, socket.MSG_WAITALL))
                conn.sendall(self.reply)
            self.done.release()

    def close(self) -> None:
        self.closing = True
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
            wake.connect(self.path)     # ends accept() in the thread
        self.thread.join(10)
        self.listener.close()
        os.unlink(self.path)


@pytest.fixture
def ipcd(rundir, monkeypatch) -> Iterator[RefusingIpcd]:
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://10.9.9.9:9000/pong")
    fake = RefusingIpcd(rundir)
    try:
        yield fake
    finally:
        fake.close()


NOT_FOUND = pyipc.ServiceNotFoundError
NETWORK = pyipc.NetworkError
BASE = "ipcd could not connect to service pong"

#: ipcd's answer -> the class and text the client raises.
CASES = [
    (b"ne norule no rule for pong in IPC_NETWORK", NOT_FOUND,
     f"{BASE} (norule): no rule for pong in IPC_NETWORK"),
    (b"ne noservice remote tcpd at 10.9.9.9:9000 has no service pong", NOT_FOUND,
     f"{BASE} (noservice): remote tcpd at 10.9.9.9:9000 has no service pong"),
    (b"ne nodaemon no service tcp in /run/x (is pyipc tcpd running?)", NETWORK,
     f"{BASE} (nodaemon): no service tcp in /run/x (is pyipc tcpd running?)"),
    (b"ne unreachable 10.9.9.9:9000: Connection refused", NETWORK,
     f"{BASE} (unreachable): 10.9.9.9:9000: Connection refused"),
    (b"ne refused pong is not exposed", NETWORK, f"{BASE} (refused): pong is not exposed"),
    (b"ne tls certificate verify failed", NETWORK, f"{BASE} (tls): certificate verify failed"),
    (b"ne timeout no answer in 10 s", NETWORK, f"{BASE} (timeout): no answer in 10 s"),
    (b"ne busy", NETWORK, f"{BASE} (busy)"),
    # A code from a newer ipcd: still a network failure, with its words.
    (b"ne martians landed", NETWORK, f"{BASE} (martians): landed"),
    # One line only; the bytes after a NUL, CR or LF are not shown.
    (b"ne busy too many\nrequests", NETWORK, f"{BASE} (busy): too many"),
    (b"ne busy a\0b", NETWORK, f"{BASE} (busy): a"),
    # Bad UTF-8 is shown replaced, never an exception of its own.
    (b"ne refused caf\xe9", NETWORK, f"{BASE} (refused): caf\ufffd"),
    # Not a refusal: libIPC's bare failure text.
    (b"", pyipc.IPCError, BASE),
    (b"no", pyipc.IPCError, BASE),
    (b"ne ", pyipc.IPCError, BASE),
    (b"ne  busy", pyipc.IPCError, BASE),
    (b"ok", pyipc.IPCError, BASE),          # "ok" without a fd
]


@pytest.mark.parametrize("answer,cls,text", CASES, ids=[repr(c[0])[:30] for c in CASES])
def test_refusal_is_raised_with_its_reason(ipcd, ctx_factory, answer, cls, text):
    ipcd.reply = answer
    raises(cls, text, ctx_factory().connect, "pong")
    assert ipcd.requests == [b"pong;pong tcp://10.9.9.9:9000/pong"]


def test_network_error_is_a_connection_error():
    assert issubclass(pyipc.NetworkError, pyipc.IPCError)
    assert issubclass(pyipc.NetworkError, ConnectionError)
    assert not issubclass(pyipc.NetworkError, FileNotFoundError)


def test_reason_is_bounded_at_max_reason(ipcd, ctx_factory):
    """Code and text after "ne " are cut at MAX_REASON bytes (the edge and past it)."""
    for extra in (0, 1, 1000):
        body = b"busy " + b"x" * (MAX_REASON - 5 + extra)
        ipcd.reply = b"ne " + body
        shown = (b"x" * (MAX_REASON - 5)).decode()
        raises(NETWORK, f"{BASE} (busy): {shown}", ctx_factory().connect, "pong")


CUT_CASES = [(ch, k) for ch in ("\u00e9", "\u20ac", "\U0001f600")
             for k in range(1, len(ch.encode()) + 1)]


@pytest.mark.parametrize("char,start", CUT_CASES,
                         ids=[f"{len(c.encode())}bytes-{k}before" for c, k in CUT_CASES])
def test_reason_is_cut_between_utf8_characters(ipcd, ctx_factory, char, start):
    """A foreign ipcd's reason cut at MAX_REASON inside a character leaves
    that character out (no U+FFFD); one ending at the cut is kept. `start`:
    the character's first byte is that many bytes before the cut."""
    pad = "x" * (MAX_REASON - 5 - start)
    ipcd.reply = f"ne busy {pad}{char}yyyy".encode()
    fits = start >= len(char.encode())
    raises(NETWORK, f"{BASE} (busy): {pad}{char if fits else ''}", ctx_factory().connect, "pong")


def _open_fds() -> set[int]:
    """This process's open fds, without the one that listing them used."""
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    return {fd for fd in listed if _is_open(fd)}


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_no_fd_is_left_open_after_a_refusal(ipcd, ctx_factory):
    ctx = ctx_factory()
    ipcd.reply = b"ne unreachable down"
    gc.collect()                # what earlier tests left closes now, not during the count
    before = _open_fds()
    for _ in range(20):
        with pytest.raises(NETWORK):
            ctx.connect("pong")
    # The stand-in's own end of each connection is an fd of this process too:
    # counted once its thread has closed it (the client may raise first).
    for _ in range(20):
        assert ipcd.done.acquire(timeout=10)
    gc.collect()
    assert _open_fds() - before == set()        # none new (others may have closed)


def test_aio_connect_raises_the_same(ipcd, backend):
    ipcd.reply = b"ne unreachable 10.9.9.9:9000: No route to host"

    async def main() -> pyipc.IPCError:
        async with pyipc.aio.Context(rundir=os.path.dirname(ipcd.path), backend=backend) as ctx:
            with pytest.raises(pyipc.IPCError) as info:
                await ctx.connect("pong")
            return info.value

    err = run(main)
    assert type(err) is NETWORK
    assert str(err) == f"{BASE} (unreachable): 10.9.9.9:9000: No route to host"


def test_signals_while_ipcd_answers_do_not_restart_the_request(backend, rundir, monkeypatch):
    """A handler that returns, running every 50 ms while a slow ipcd answers:
    connect() waits on, ipcd is asked once, and the fd it hands over is the
    connection (the native core's exchange started over at each signal:
    several requests, and with signals faster than ipcd, no end)."""
    import signal
    import time
    requests: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "ipc"))
    listener.listen(8)
    kept: list[socket.socket] = []

    def slow_ipcd() -> None:
        listener.settimeout(2)                  # more requests come at once, or none
        try:
            while True:
                conn, _ = listener.accept()
                kept.append(conn)
                requests.append(conn.recv(4096))
                time.sleep(0.3)                 # the slow answer is the scenario
                mine, theirs = socket.socketpair()
                kept.append(mine)
                socket.send_fds(conn, [b"ok"], [theirs.fileno()])
                theirs.close()
                mine.sendall(b"\0\0\0\5hello")   # a first message on the connection
        except OSError:
            return                              # accept timed out or closed: done

    thread = threading.Thread(target=slow_ipcd, daemon=True)
    thread.start()
    monkeypatch.setenv("IPC_NETWORK", "svc tcp://somewhere:1/svc")
    ticks: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            fd = ctx.connect("svc", timeout=10)
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert ctx.read(fd, timeout=10) == b"hello"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        listener.close()
        thread.join(20)
        for sock in kept:
            sock.close()
    assert len(ticks) >= 3
    assert len(requests) == 1 and requests[0].endswith(b"svc;svc tcp://somewhere:1/svc")


# ------------------------------------------------------------ faults found by review

def test_a_refusal_sent_before_ipcd_closed_on_the_request_is_raised(ipcd, ctx_factory,
                                                                     monkeypatch):
    """ipcd at its bounds answers at once and closes without reading: a
    request larger than the socket's buffer meets EPIPE, and the answer
    waiting in the socket is what connect() raises (a bare IPCError, and
    aio said it, until then)."""
    monkeypatch.setenv("IPC_NETWORK", "x" * (4 << 20))
    ipcd.read_requests = False
    ipcd.reply = b"ne busy ipcd is full"
    raises(NETWORK, f"{BASE} (busy): ipcd is full", ctx_factory().connect, "pong")


def test_a_request_over_max_message_size_is_that_error(ipcd, ctx_factory, backend,
                                                        monkeypatch):
    """Both backends and aio: MessageTooLargeError, not ipcd's bare failure."""
    monkeypatch.setenv("IPC_NETWORK", "x" * 2000)
    text = "message of 2005 bytes exceeds max_message_size (1024)"
    raises(pyipc.MessageTooLargeError, text, ctx_factory(max_message_size=1024).connect, "pong")

    async def main() -> None:
        async with pyipc.aio.Context(rundir=os.path.dirname(ipcd.path), backend=backend,
                                     max_message_size=1024) as ctx:
            with pytest.raises(pyipc.MessageTooLargeError, match=text.replace("(", r"\(")
                               .replace(")", r"\)")):
                await ctx.connect("pong")
    run(main)
    assert ipcd.requests == []                      # ipcd was never asked


@pytest.mark.parametrize("via", ["sync", "aio"])
def test_a_name_ipcd_cannot_be_asked_for_is_an_invalid_name(ipcd, ctx_factory, backend, via):
    """A lone surrogate (a file name's undecodable byte) cannot be sent as
    UTF-8: InvalidNameError, not UnicodeEncodeError."""
    text = "service name 'x\\udcff' is not valid UTF-8: ipcd cannot be asked for it"
    if via == "sync":
        raises(pyipc.InvalidNameError, text, ctx_factory().connect, "x\udcff")
        return

    async def main() -> None:
        async with pyipc.aio.Context(rundir=os.path.dirname(ipcd.path), backend=backend) as ctx:
            with pytest.raises(pyipc.InvalidNameError):
                await ctx.connect("x\udcff")
    run(main)


def test_a_signal_handlers_exception_comes_out_of_connect(backend, rundir, monkeypatch):
    """ipcd never answers; a SIGALRM handler raises an OSError subclass:
    that exception comes out of connect() (it was taken for a socket
    failure and replaced by ipcd's bare failure)."""
    import signal
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "ipc"))
    listener.listen(8)                              # accepted by the backlog, never answered

    class Watchdog(ConnectionAbortedError):
        pass

    def fire(*_: object) -> None:
        raise Watchdog("my own watchdog fired")
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://10.9.9.9:9000/pong")
    old = signal.signal(signal.SIGALRM, fire)
    try:
        with pyipc.Context(rundir=rundir, backend=backend) as ctx:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(Watchdog, match="my own watchdog fired"):
                ctx.connect("pong", timeout=20)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        listener.close()
