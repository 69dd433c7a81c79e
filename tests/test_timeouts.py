"""Timeouts per call (issue 16, point 3), on both backends.

Every blocking call takes ``timeout=`` (seconds, None: no limit). When it
passes first, pyipc.TimeoutError (an IPCError and a built-in TimeoutError)
is raised and nothing changed: no message consumed (the bytes of a partial
frame stay for the next read), no frame half written (the rest of a begun
frame is queued ahead of anything else; frames not begun are not sent).

Timing bounds are generous (this checks behaviour, it is not a benchmark):
a call that times out took at least its timeout and less than SLACK more.
No sleep stands in for an event: a peer that must write while a call blocks
first observes, in /proc, that the calling thread sleeps in the kernel (the
one sleep is the time a call must go on waiting, in the no-leak tests).
"""

from __future__ import annotations

import builtins
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Callable, Optional

import pytest

import pyipc
from pyipc import EventType

from conftest import Pair, frame, raw_connect, settle, spin_until, wait_for

#: How much longer than its timeout a call may take to time out.
SLACK = 1.0
#: A short timeout for calls that must time out.
SHORT = 0.1
MIB = 1 << 20
#: Large enough for read_into's direct path (pyipc._pure.framing.DIRECT_READ_MIN).
DIRECT = 100_000

ReadCall = Callable[[pyipc.Context, int, Optional[float]], bytes]


def _read(ctx: pyipc.Context, fd: int, timeout: Optional[float]) -> bytes:
    return ctx.read(fd, timeout=timeout)


def _read_many(ctx: pyipc.Context, fd: int, timeout: Optional[float]) -> bytes:
    messages = ctx.read_many(fd, 1, timeout=timeout)
    assert len(messages) == 1
    return messages[0]


def _read_into(ctx: pyipc.Context, fd: int, timeout: Optional[float]) -> bytes:
    buf = bytearray(2 * DIRECT)         # large: the direct path when the message is
    return bytes(buf[:ctx.read_into(fd, buf, timeout=timeout)])


READS: dict[str, ReadCall] = {"read": _read, "read_many": _read_many, "read_into": _read_into}


def times_out(call: Callable[[], object], timeout: float, text: str) -> float:
    """Run ``call``, which must raise pyipc.TimeoutError(``text``) after
    ``timeout`` s and not much more; the time it took."""
    start = time.monotonic()
    with pytest.raises(pyipc.TimeoutError) as caught:
        call()
    elapsed = time.monotonic() - start
    error = caught.value
    assert str(error) == text
    assert isinstance(error, builtins.TimeoutError) and isinstance(error, pyipc.IPCError)
    assert timeout <= elapsed < timeout + SLACK, elapsed
    return elapsed


def read_text(fd: int) -> str:
    return f"read on fd {fd} timed out"


# ---------------------------------------------------------------- a silent connection


@pytest.mark.parametrize("call", list(READS))
def test_a_read_on_a_silent_connection_times_out_and_consumes_nothing(pair: Pair, call):
    server, fd = pair.server, pair.server_fd
    times_out(lambda: READS[call](server, fd, SHORT), SHORT, read_text(fd))
    pair.client.write_many(pair.client_fd, [b"first", b"second"])
    assert READS[call](server, fd, None) == b"first"
    assert server.read(fd) == b"second"
    assert settle(server) == []


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_wait_with_nothing_to_report_times_out(pair: Pair, call):
    server = pair.server
    times_out(lambda: getattr(server, call)(timeout=SHORT), SHORT, "wait timed out")
    pair.client.write(pair.client_fd, b"after")
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"after"


# ---------------------------------------------------------------- a partial frame


def raw_client(pair: Pair, rundir: str) -> tuple[socket.socket, int]:
    """A plain socket connected to the pair's service, and the server's fd of it."""
    sock = raw_connect(rundir, pair.name)
    return sock, wait_for(pair.server, EventType.CONNECTION)[-1].fd


@pytest.mark.parametrize("size", [100, DIRECT], ids=["small", "direct"])
@pytest.mark.parametrize("split", ["in_header", "in_payload"])
@pytest.mark.parametrize("call", list(READS))
def test_a_partial_frame_stays_for_the_next_read(pair: Pair, rundir, call, split, size):
    """Half a frame came: the read times out; the rest comes: the next read
    returns the whole message (read_into's direct path included)."""
    message = bytes(range(256)) * (size // 256) + b"m" * (size % 256)
    data = frame(message)
    cut = 2 if split == "in_header" else 4 + size // 2
    sock, fd = raw_client(pair, rundir)
    with sock:
        sock.sendall(data[:cut])
        times_out(lambda: READS[call](pair.server, fd, SHORT), SHORT, read_text(fd))
        sock.sendall(data[cut:] + frame(b"next"))
        assert READS[call](pair.server, fd, None) == message
        assert pair.server.read(fd) == b"next"


# ---------------------------------------------------------------- timeout=0


@pytest.mark.parametrize("call", list(READS))
def test_timeout_zero_returns_a_message_already_received(pair: Pair, call):
    server, fd = pair.server, pair.server_fd
    pair.client.write(pair.client_fd, b"there")      # in the server's socket now
    assert READS[call](server, fd, 0) == b"there"
    # One the event loop received and still holds as a MESSAGE_RX event.
    pair.client.write_many(pair.client_fd, [b"first", b"held"])
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"first"
    assert READS[call](server, fd, 0) == b"held"


@pytest.mark.parametrize("call", list(READS))
def test_timeout_zero_with_nothing_there_times_out_at_once(pair: Pair, call):
    server, fd = pair.server, pair.server_fd
    times_out(lambda: READS[call](server, fd, 0), 0, read_text(fd))
    pair.client.write(pair.client_fd, b"later")
    assert server.read(fd) == b"later"


def test_wait_event_timeout_zero(pair: Pair):
    """timeout=0: one round that does not wait; what it finds is returned."""
    server = pair.server
    times_out(lambda: server.wait_event(timeout=0), 0, "wait timed out")
    pair.client.write(pair.client_fd, b"ready")      # in the server's socket now
    ev = server.wait_event(timeout=0)
    assert (ev.type, ev.message) == (EventType.MESSAGE_RX, b"ready")
    pair.client.write_many(pair.client_fd, [b"first", b"held"])
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"first"
    assert server.wait_events(timeout=0)[0].message == b"held"


def test_write_timeout_zero_with_room_writes(pair: Pair):
    pair.client.write(pair.client_fd, b"room", timeout=0)
    pair.client.write_many(pair.client_fd, [b"for", b"these"], timeout=0)
    assert pair.server.read_many(pair.server_fd) == [b"room", b"for", b"these"]


#: A positive timeout under a microsecond (native truncated it to 0 us: the
#: core's zero-timeout mode, unlike pure, where only 0 is that).
TINY = 1e-7


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_tiny_timeout_is_not_timeout_zero(ctx_factory, call):
    """With nothing to wait for, timeout=0 finds nothing (a loop driven by
    fileno() cannot hang) but any positive timeout is an error, as None is."""
    ctx = ctx_factory()
    if call == "wait_events":
        assert ctx.wait_events(timeout=0) == []
    else:
        times_out(lambda: ctx.wait_event(timeout=0), 0, "wait timed out")
    with pytest.raises(pyipc.IPCError, match="^nothing to wait for: no fd and no timer$"):
        getattr(ctx, call)(timeout=TINY)


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_tiny_timeout_counts_the_timer_from_the_call(pair: Pair, call):
    """timeout=0 counts the timer from when it last started (TIMER once it
    has passed); a positive timeout, however small, from the call: shorter
    than the timer, it times out."""
    server = pair.server
    server.timer = 20

    def idle_past_the_timer() -> None:
        assert server.wait_event(timeout=5.0).type == EventType.TIMER   # it starts again
        time.sleep(0.1)     # the time itself is under test, not an event

    idle_past_the_timer()
    result = getattr(server, call)(timeout=0)
    assert (result if call == "wait_event" else result[0]).type == EventType.TIMER
    idle_past_the_timer()
    times_out(lambda: getattr(server, call)(timeout=TINY), 0, "wait timed out")


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_timeout_shorter_than_a_one_ms_timer_times_out(pair: Pair, call):
    """timer=1 ms, timeout=TINY: the timeout comes first, so the wait times
    out, every time (native's poll waits whole milliseconds: it woke with
    both due and said TIMER about half the time, where pure times out)."""
    server = pair.server
    server.timer = 1
    for _ in range(20):
        times_out(lambda: getattr(server, call)(timeout=TINY), 0, "wait timed out")


# ---------------------------------------------------------------- the timer and the timeout


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_timer_shorter_than_the_timeout_gives_timer(pair: Pair, call):
    server = pair.server
    server.timer = 50
    start = time.monotonic()
    result = getattr(server, call)(timeout=5.0)
    ev = result if call == "wait_event" else result[0]
    assert ev.type == EventType.TIMER
    assert 0.05 <= time.monotonic() - start < 5.0


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_timeout_shorter_than_the_timer_raises(pair: Pair, call):
    server = pair.server
    server.timer = 5000
    elapsed = times_out(lambda: getattr(server, call)(timeout=SHORT), SHORT, "wait timed out")
    assert elapsed < 5.0                       # before the timer, not at it
    assert server.timer == 5000


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
@pytest.mark.parametrize("timer_ms, timeout", [(10, 0.0095), (1, 0.0005)])
def test_a_timeout_just_before_the_timer_raises_though_both_are_due(pair: Pair, call,
                                                                    timer_ms, timeout):
    """The timeout is due half a millisecond before the timer; the wait
    ends with both due (the poll waits whole milliseconds) or with the
    timeout alone: either way the one due first, the timeout, is what it
    says, as the core decides (pure said TIMER every time)."""
    server = pair.server
    server.timer = timer_ms
    for _ in range(20):
        times_out(lambda: getattr(server, call)(timeout=timeout), timeout, "wait timed out")


@pytest.mark.parametrize("call", ["wait_event", "wait_events"])
def test_a_timeout_due_with_the_timer_gives_timer(pair: Pair, call):
    """timeout == timer: the timer is due no later than the call (counted
    from the same start), so the wait says TIMER, on both backends."""
    server = pair.server
    server.timer = 10
    for _ in range(20):
        result = getattr(server, call)(timeout=0.010)
        assert (result if call == "wait_event" else result[0]).type == EventType.TIMER


# ---------------------------------------------------------------- writes


def reader(ctx: pyipc.Context, fd: int, until: Callable[[list[bytes]], bool]
           ) -> tuple[threading.Thread, list[bytes]]:
    """A thread (started) that reads fd's messages until ``until(received)``."""
    received: list[bytes] = []

    def run() -> None:
        while not until(received):
            received.extend(ctx.read_many(fd))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


def test_a_write_that_times_out_sends_the_rest_of_its_frame_first(pair: Pair):
    """A 4 MiB write to a peer that does not read times out; the peer then
    reads: it gets the 4 MiB message whole, then the two written after."""
    client, fd = pair.client, pair.client_fd
    big = bytes(range(256)) * (4 * MIB // 256)    # not uniform: a shifted frame shows
    times_out(lambda: client.write(fd, big, timeout=0.2), 0.2, f"write on fd {fd} timed out")
    thread, received = reader(pair.server, pair.server_fd, lambda r: len(r) >= 3)
    client.write(fd, b"one")
    client.write(fd, b"two")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert [len(m) for m in received] == [len(big), 3, 3]
    assert received == [big, b"one", b"two"]
    # The rest of the stopped frame went out as no MESSAGE_TX of its own.
    assert settle(client) == []


def test_a_write_not_begun_when_it_times_out_is_not_sent(pair: Pair):
    """The socket is full (the rest of a stopped frame is queued): a small
    write times out before its frame begins, and is never sent."""
    client, fd = pair.client, pair.client_fd
    big = b"b" * (4 * MIB)
    times_out(lambda: client.write(fd, big, timeout=SHORT), SHORT, f"write on fd {fd} timed out")
    times_out(lambda: client.write(fd, b"dropped", timeout=SHORT), SHORT,
              f"write on fd {fd} timed out")
    thread, received = reader(pair.server, pair.server_fd, lambda r: r[-1:] == [b"end"])
    client.write(fd, b"end")
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert received == [big, b"end"]


@pytest.mark.parametrize("count,size", [(8, MIB), (40_000, 200)], ids=["large", "small"])
def test_write_many_that_times_out_sends_a_prefix_of_whole_frames(pair: Pair, count, size):
    client, fd = pair.client, pair.client_fd
    batch = [struct.pack(">I", k) * (size // 4) for k in range(count)]
    times_out(lambda: client.write_many(fd, batch, timeout=0.2), 0.2,
              f"write on fd {fd} timed out")
    thread, received = reader(pair.server, pair.server_fd, lambda r: r[-1:] == [b"end"])
    client.write_many(fd, [b"after", b"end"])
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert received[-2:] == [b"after", b"end"]
    sent = received[:-2]
    assert 1 <= len(sent) < count
    assert sent == batch[:len(sent)]


# ---------------------------------------------------------------- connect through ipcd


class SilentIpcd:
    """A fake ipcd at RUNDIR/ipc: accepts one connection, reads the request
    and never answers; records whether the client then hung up."""

    def __init__(self, rundir: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(os.path.join(rundir, "ipc"))
        self.listener.listen(1)
        self.listener.settimeout(30)            # a client that never comes fails the test
        self.request: Optional[bytes] = None
        self.hung_up = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:         # close() before any client came
            return
        with conn:
            conn.settimeout(30)
            size = struct.unpack(">I", _recv_exactly(conn, 4))[0]
            self.request = _recv_exactly(conn, size)
            self.hung_up = conn.recv(1) == b""   # held open until the client goes

    def close(self) -> None:
        """Wait for the thread (an accept() still waiting is woken up)."""
        if self.request is None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:     # accept() had returned: nothing to wake
                pass
        self.thread.join(timeout=30)
        self.listener.close()


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_connect_through_a_silent_ipcd_times_out(ctx_factory, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    ipcd = SilentIpcd(rundir)
    ctx = ctx_factory()
    try:
        times_out(lambda: ctx.connect("pong", timeout=0.2), 0.2,
                  "connect to service pong timed out")
    finally:
        ipcd.close()
    assert ipcd.request == b"pong;pong unix://pong"
    assert ipcd.hung_up                       # the connection to ipcd is not leaked


def test_connect_through_an_ipcd_with_a_full_backlog_times_out(ctx_factory, rundir,
                                                                monkeypatch):
    """An ipcd that accepts no one (its listen backlog full) held connect()
    in the kernel's connect() past any timeout."""
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as filler:
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(0)
        filler.connect(os.path.join(rundir, "ipc"))     # the backlog is now full
        outcome: list[object] = []
        ctx = ctx_factory()

        def connect() -> None:
            try:
                outcome.append(times_out(lambda: ctx.connect("pong", timeout=0.2), 0.2,
                                         "connect to service pong timed out"))
            except BaseException as e:      # reported below, not lost in the thread
                outcome.append(e)
        thread = threading.Thread(target=connect)
        thread.start()
        thread.join(10)
        if thread.is_alive():
            listener.close()        # wakes the connect(): the thread ends
            thread.join(10)
            pytest.fail("connect(timeout=0.2) still waited for ipcd after 10 s")
    assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
    assert ctx.wait_events(timeout=0) == []     # nothing left behind


def test_connect_through_an_ipcd_that_does_not_read_a_long_request_times_out(
        ctx_factory, rundir, monkeypatch):
    """The timeout bounds the whole exchange: a request too long for the
    socket to an ipcd that never reads it timed out after the write's own
    timeout, then the close lingered a second more (1.5 s for 0.5)."""
    monkeypatch.setenv("IPC_NETWORK", "x unix://y;" * 200_000 + "pong unix://pong")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(1)                  # connected in the backlog, never read
        ctx = ctx_factory()
        times_out(lambda: ctx.connect("pong", timeout=0.3), 0.3,
                  "connect to service pong timed out")


def test_signals_while_ipcd_backlog_is_full_do_not_end_the_wait(ctx_factory, rundir,
                                                                 monkeypatch):
    """A signal interrupts the kernel's connect(); connect() goes on waiting
    (PEP 475) until its timeout, not failing nor returning unconnected."""
    monkeypatch.setenv("IPC_NETWORK", "pong unix://pong")
    caught: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: caught.append(1))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as filler:
        listener.bind(os.path.join(rundir, "ipc"))
        listener.listen(0)
        filler.connect(os.path.join(rundir, "ipc"))
        ctx = ctx_factory()
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        try:
            times_out(lambda: ctx.connect("pong", timeout=0.4), 0.4,
                      "connect to service pong timed out")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    assert len(caught) >= 3


# ---------------------------------------------------------------- bad timeouts


BAD_TIMEOUTS = [
    (-1, ValueError, "timeout must be None or a finite number of seconds >= 0"),
    (-0.001, ValueError, "timeout must be None or a finite number of seconds >= 0"),
    (float("nan"), ValueError, "timeout must be None or a finite number of seconds >= 0"),
    (float("inf"), ValueError, "timeout must be None or a finite number of seconds >= 0"),
    (threading.TIMEOUT_MAX * 2, ValueError,
     f"timeout must be at most threading.TIMEOUT_MAX ({threading.TIMEOUT_MAX} s)"),
    (10 ** 400, ValueError,
     f"timeout must be at most threading.TIMEOUT_MAX ({threading.TIMEOUT_MAX} s)"),
    ("1", TypeError, "timeout must be None or a number of seconds, not str"),
    (True, TypeError, "timeout must be None or a number of seconds, not bool"),
]

BAD_CALLS: dict[str, Callable[[Pair, object], object]] = {
    "read": lambda p, t: p.server.read(p.server_fd, timeout=t),
    "read_many": lambda p, t: p.server.read_many(p.server_fd, timeout=t),
    "read_into": lambda p, t: p.server.read_into(p.server_fd, bytearray(10), timeout=t),
    "wait_event": lambda p, t: p.server.wait_event(timeout=t),
    "wait_events": lambda p, t: p.server.wait_events(timeout=t),
    "write": lambda p, t: p.server.write(p.server_fd, b"not sent", timeout=t),
    "write_many": lambda p, t: p.server.write_many(p.server_fd, [b"not", b"sent"], timeout=t),
    "connect": lambda p, t: p.server.connect(p.name, timeout=t),
}


@pytest.mark.parametrize("held", [False, True], ids=["in_socket", "held_as_event"])
@pytest.mark.parametrize("call", list(BAD_CALLS))
def test_a_bad_timeout_is_refused_and_changes_nothing(pair: Pair, call, held):
    """Refused before anything else, even when a message or an event is
    already there to return (as queue.Queue.get(timeout=-1) does)."""
    server, fd = pair.server, pair.server_fd
    pair.client.write_many(pair.client_fd, [b"first", b"kept"])
    if held:        # both came in one read: "first" is returned, "kept" held as an event
        assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"first"
    for timeout, error, text in BAD_TIMEOUTS:
        with pytest.raises(error) as caught:
            BAD_CALLS[call](pair, timeout)
        assert str(caught.value) == text, timeout
    if not held:
        assert server.read(fd) == b"first"
    assert server.read(fd) == b"kept"
    # Nothing was written, and the connection works both ways.
    server.write(fd, b"back")
    assert pair.client.read(pair.client_fd) == b"back"
    assert settle(server) == [] and settle(pair.client) == []


def test_the_largest_timeout_is_accepted(pair: Pair):
    """threading.TIMEOUT_MAX, Python's own bound for blocking calls, waits
    (it neither fails nor overflows in the backend)."""
    server, fd = pair.server, pair.server_fd
    with write_when_blocked(pair, b"came") as writer:
        assert server.read(fd, timeout=threading.TIMEOUT_MAX) == b"came"
    assert writer.still_blocked
    with write_when_blocked(pair, b"again") as writer:
        ev = server.wait_event(timeout=threading.TIMEOUT_MAX)
    assert writer.still_blocked
    assert (ev.type, ev.message) == (EventType.MESSAGE_RX, b"again")


# ---------------------------------------------------------------- no leak into the next call


def blocked_in_kernel(tid: int) -> bool:
    """Whether thread ``tid`` of this process sleeps in a system call other
    than a futex wait (a thread waiting for the GIL sleeps in a futex)."""
    base = f"/proc/self/task/{tid}"
    with open(f"{base}/stat") as f:
        state = f.read().rpartition(")")[2].split()[0]
    with open(f"{base}/wchan") as f:
        wchan = f.read()
    return state == "S" and wchan not in ("", "0") and "futex" not in wchan


class write_when_blocked:
    """With it: a thread writes ``payload`` to the server once the thread
    that entered it has blocked in the kernel, and stayed blocked ``after``
    s more (the time the call under test must wait). ``still_blocked``
    says whether it had; the block's end waits for the thread."""

    def __init__(self, pair: Pair, payload: bytes, after: float = 0.0) -> None:
        self.pair, self.payload, self.after = pair, payload, after
        self.still_blocked: Optional[bool] = None
        self.tid = threading.get_native_id()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            spin_until(lambda: blocked_in_kernel(self.tid))
            if self.after:
                # Not synchronisation: the call must still be waiting after this
                # long (a timeout left over from an earlier call would end it).
                time.sleep(self.after)
            self.still_blocked = blocked_in_kernel(self.tid)
        finally:        # even when the spin fails: the call under test must end
            self.pair.client.write(self.pair.client_fd, self.payload)

    def __enter__(self) -> "write_when_blocked":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


NEXT_CALLS: dict[str, Callable[[Pair], bytes]] = {
    "read": lambda p: p.server.read(p.server_fd),
    "read_many": lambda p: p.server.read_many(p.server_fd)[0],
    "read_into": lambda p: _read_into(p.server, p.server_fd, None),
    "wait_event": lambda p: p.server.wait_event().message,
}


@pytest.mark.parametrize("first", ["read", "wait_event"])
@pytest.mark.parametrize("then", list(NEXT_CALLS))
def test_a_timeout_does_not_leak_into_the_next_call(pair: Pair, first, then):
    server, fd = pair.server, pair.server_fd
    if first == "read":
        times_out(lambda: server.read(fd, timeout=0.05), 0.05, read_text(fd))
    else:
        times_out(lambda: server.wait_event(timeout=0.05), 0.05, "wait timed out")
    start = time.monotonic()
    with write_when_blocked(pair, b"late", after=0.3) as writer:
        assert NEXT_CALLS[then](pair) == b"late"
    assert time.monotonic() - start >= 0.3
    assert writer.still_blocked


# ---------------------------------------------------------------- a kept exception


#: A child that keeps the errors of a call given a bytearray in reference
#: cycles, then runs the garbage collector: the frames of their tracebacks
#: hold the call's memoryview of the bytearray.
KEEP_ERRORS = r"""
import gc, sys
import pyipc
backend, rundir, call = sys.argv[1:]
server = pyipc.Context(rundir=rundir, backend=backend)
client = pyipc.Context(rundir=rundir, backend=backend)
server.service_init("svc")
cfd = client.connect_service("svc")
sfd = server.wait_event().fd
calls = {
    "read_into": lambda: server.read_into(sfd, bytearray(200_000), timeout=0.01),
    "write": lambda: client.write(cfd, bytearray(8 << 20), timeout=0.01),
    "write_many": lambda: client.write_many(cfd, [bytearray(1 << 20)] * 8, timeout=0.01),
    "schedule": lambda: client.schedule(cfd + 1000, bytearray(10)),
}
for _ in range(3):
    try:
        calls[call]()
    except pyipc.IPCError as e:
        e.cycle = e         # only the collector frees it
gc.collect()
print("collected")
"""


@pytest.mark.parametrize("call", ["read_into", "write", "write_many", "schedule"])
def test_an_error_kept_in_a_cycle_is_collected(backend, rundir, processes, call):
    """Native: the C view of a caller's buffer is released before the error
    leaves the call; a memoryview still exported when the collector frees
    the frame made gc.collect() raise BufferError, or crash."""
    proc = processes(KEEP_ERRORS, backend, rundir, call,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "collected\n", "")


WRONG_EVERYWHERE: dict[str, Callable[[pyipc.Context], object]] = {
    "read": lambda ctx: ctx.read(99999, timeout=-1),
    "read_many": lambda ctx: ctx.read_many(99999, timeout=-1),
    "read_into": lambda ctx: ctx.read_into(99999, bytearray(10), timeout=-1),
    "write": lambda ctx: ctx.write(99999, object(), timeout=-1),
    "write_many": lambda ctx: ctx.write_many(99999, [b"x"], timeout=-1),
    "connect": lambda ctx: ctx.connect("a/b", timeout=-1),
}


@pytest.mark.parametrize("call", list(WRONG_EVERYWHERE))
def test_a_bad_timeout_is_reported_before_the_other_arguments(ctx_factory, call):
    """Two backends, one error: the timeout is checked first (then an
    unknown fd, a bad payload or a bad name)."""
    with pytest.raises(ValueError) as caught:
        WRONG_EVERYWHERE[call](ctx_factory())
    assert str(caught.value) == "timeout must be None or a finite number of seconds >= 0"
