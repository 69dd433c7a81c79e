"""schedule() one message at a time, as libIPC programs do (issue 21).

The native backend keeps small scheduled payloads in the context and hands
them to the core in one call when it next enters it; the pure backend queues
them as before. Either way the contract holds on both backends: every error is
raised by the schedule() call itself, messages of one fd arrive in the order
they were scheduled or written whatever their sizes and types, one MESSAGE_TX
per scheduled message, and another event loop watching fileno() wakes for them.
"""

from __future__ import annotations

import faulthandler
import os
import select
import threading
import time
from typing import Callable

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, raises

TX, RX = EventType.MESSAGE_TX, EventType.MESSAGE_RX


def _received(ctx: pyipc.Context, n: int) -> list[tuple[int, bytes]]:
    """(fd, payload) of the next ``n`` MESSAGE_RX of ctx."""
    events = collect(ctx, lambda seen: sum(e.type is RX for e in seen) >= n)
    return [(e.fd, e.message) for e in events if e.type is RX]


def _tx_count(ctx: pyipc.Context, n: int) -> int:
    events = collect(ctx, lambda seen: sum(e.type is TX for e in seen) >= n)
    return sum(e.type is TX for e in events)


def test_mixed_sizes_types_and_writes_keep_their_order(pair):
    big = bytes(range(256)) * 400                       # 102,400 B: not buffered
    sent = [b"", b"a", bytearray(b"ba"), b"x" * 4096, b"y" * 4097, memoryview(b"mv"),
            big, "text", b"after"]
    for p in sent:
        pair.client.schedule(pair.client_fd, p)
    pair.client.write(pair.client_fd, b"written")       # after every scheduled one
    pair.client.schedule(pair.client_fd, b"last")
    expected = [bytes(p) if not isinstance(p, str) else p.encode() for p in sent]
    expected += [b"written", b"last"]
    assert _tx_count(pair.client, len(sent) + 1) == len(sent) + 1
    got = _received(pair.server, len(expected))
    assert got == [(pair.server_fd, p) for p in expected]


def test_two_connections_each_in_order(ctx_factory):
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    a, b = client.connect_service("svc"), client.connect_service("svc")
    for i in range(2000):
        client.schedule(a, b"a%d" % i)
        client.schedule(b, b"b%d" % i)
    assert _tx_count(client, 4000) == 4000
    events = collect(server, lambda seen: sum(e.type is RX for e in seen) >= 4000)
    by_fd: dict[int, list[bytes]] = {}
    for e in events:
        if e.type is RX:
            by_fd.setdefault(e.fd, []).append(e.message)
    assert sorted(by_fd.values()) == [[b"a%d" % i for i in range(2000)],
                                      [b"b%d" % i for i in range(2000)]]


def test_errors_come_from_the_schedule_call(pair):
    pair.client.schedule(pair.client_fd, b"kept")       # buffered on native
    raises(pyipc.UnknownFdError, "fd 9999 is not managed by this context",
           pair.client.schedule, 9999, b"x")
    with pytest.raises(pyipc.MessageTooLargeError):
        pair.client.schedule(pair.client_fd, b"x" * (pair.client.max_message_size + 1))
    with pytest.raises(TypeError):
        pair.client.schedule(pair.client_fd, 42)
    # Nothing of the failed calls went out; the good one did.
    assert _tx_count(pair.client, 1) == 1
    assert _received(pair.server, 1) == [(pair.server_fd, b"kept")]


def test_queue_bound_is_checked_per_call(ctx_factory):
    """max_queue_size 1000 holds ten frames of 96 B (+4): the eleventh call
    raises QueueFullError and queues nothing; the ten arrive."""
    server = ctx_factory()
    client = ctx_factory(max_message_size=100, max_queue_size=1000)
    server.service_init("svc")
    fd = client.connect_service("svc")
    for i in range(10):
        client.schedule(fd, bytes([i]) * 96)
    raises(pyipc.QueueFullError,
           f"send queue of fd {fd} is full (1000 bytes queued, max_queue_size 1000)",
           client.schedule, fd, b"z")
    with pytest.raises(pyipc.QueueFullError):       # 4 bytes do not fit either
        client.schedule(fd, b"")
    assert _tx_count(client, 10) == 10
    assert [m for _, m in _received(server, 10)] == [bytes([i]) * 96 for i in range(10)]


def test_queue_bound_then_room_again(ctx_factory):
    server = ctx_factory()
    client = ctx_factory(max_message_size=100, max_queue_size=1000)
    server.service_init("svc")
    fd = client.connect_service("svc")
    for i in range(10):
        client.schedule(fd, bytes([i]) * 96)
    with pytest.raises(pyipc.QueueFullError):
        client.schedule(fd, b"")
    assert _tx_count(client, 10) == 10              # sent: the queue is empty again
    client.schedule(fd, b"again")
    assert _tx_count(client, 1) == 1
    got = _received(server, 11)
    assert [m for _, m in got] == [bytes([i]) * 96 for i in range(10)] + [b"again"]


def test_closed_peer_is_reported_by_schedule(pair):
    pair.server.close(pair.server_fd)
    collect(pair.client, lambda seen: any(e.type is EventType.DISCONNECTION for e in seen))
    raises(pyipc.ConnectionClosedError,
           f"connection on fd {pair.client_fd} is closed by the peer",
           pair.client.schedule, pair.client_fd, b"late")


def test_fileno_turns_readable_for_a_scheduled_message(pair):
    pair.client.schedule(pair.client_fd, b"before")     # buffered before fileno()
    fd = pair.client.fileno()
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert [e.type for e in pair.client.wait_events(timeout=0)] == [TX]
    assert select.select([fd], [], [], 0)[0] == []
    pair.client.schedule(pair.client_fd, b"after")
    assert select.select([fd], [], [], 5)[0] == [fd]
    assert [e.type for e in pair.client.wait_events(timeout=0)] == [TX]
    assert _received(pair.server, 2) == [(pair.server_fd, b"before"),
                                         (pair.server_fd, b"after")]


def test_another_thread_schedules_while_the_owner_waits(pair):
    """The owner waits with no timer; a thread's schedule() wakes it and the
    message goes out in that wait (MESSAGE_TX), in the thread's order."""
    pair.client.timer = None
    started = threading.Event()
    results: list[list[EventType]] = []

    def owner() -> None:
        started.set()
        seen: list[EventType] = []
        while len(seen) < 100:
            seen += [e.type for e in pair.client.wait_events(timeout=10)]
        results.append(seen)

    t = threading.Thread(target=owner)
    t.start()
    started.wait()
    for i in range(100):
        pair.client.schedule(pair.client_fd, b"t%d" % i)
    t.join(15)
    assert not t.is_alive()
    assert results == [[TX] * 100]
    assert [m for _, m in _received(pair.server, 100)] == [b"t%d" % i for i in range(100)]


def test_close_sends_what_was_scheduled(pair):
    for i in range(50):
        pair.client.schedule(pair.client_fd, b"m%d" % i)
    pair.client.close(pair.client_fd)
    assert [m for _, m in _received(pair.server, 50)] == [b"m%d" % i for i in range(50)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_does_not_send_the_parents_buffered_messages(pair):
    pair.client.schedule(pair.client_fd, b"parent's")
    pid = os.fork()
    if pid == 0:                                        # pragma: no cover - child
        try:
            pair.client.close_all()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert _tx_count(pair.client, 1) == 1
    assert _received(pair.server, 1) == [(pair.server_fd, b"parent's")]


def test_native_buffers_small_payloads_only(native_pair):
    """White box: what the native backend keeps, and when it hands it over."""
    client, fd = native_pair.client, native_pair.client_fd
    client.schedule(fd, b"x" * 4096)
    assert client._pending == [fd, b"x" * 4096]
    client.schedule(fd, b"y")                  # the room is known: the fast path
    assert client._pending == [fd, b"x" * 4096, fd, b"y"]
    client.schedule(fd, b"x" * 4097)           # flushes, then the core queues it
    assert client._pending == [] and client._room == {}
    client.schedule(fd, b"small")
    client.fileno()
    assert client._pending == []
    client.schedule(fd, b"small")
    assert client._pending == []               # not buffered after fileno()


def test_native_reads_wait_in_the_kernel_only_when_alone(native_pair):
    """White box (issue 21): with one thread a blocking read waits in the
    kernel; once another thread exists it watches the wake-up pipe, so that
    the thread's hand-over ends the wait (tests/test_threads.py)."""
    assert threading.active_count() == 1, threading.enumerate()
    server, client = native_pair.server, native_pair.client
    conn, fd = native_pair.server_fd, native_pair.client_fd
    server.write(conn, b"one")
    assert client.read(fd) == b"one"
    assert client._alone is True
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        server.write(conn, b"two")
        assert client.read(fd) == b"two"
        assert client._alone is False
    finally:
        stop.set()
        t.join()
    server.write(conn, b"three")
    assert client.read(fd) == b"three"
    assert client._alone is True


@pytest.mark.parametrize("large", [False, True], ids=["small", "large-then-small"])
def test_a_signal_handler_that_schedules_interleaves_whole_messages(pair, large):
    """A signal handler that calls schedule() while the loop schedules (the
    native backend buffers without the lock in a one-thread process, so the
    handler lands anywhere in the loop's schedule()): every message of both
    arrives once, whole, and each source's messages in its own order. A
    large payload (not buffered) makes the handler hand the buffer to the
    core, maybe while the loop's own hand-over is under way (which sent
    messages twice and lost others)."""
    import signal
    from_handler: list[bytes] = []

    running: list[int] = []

    def handler(signum, frame):
        if running:         # a signal inside the handler: its order would be unknowable
            return
        running.append(1)
        messages = [b"h%d" % len(from_handler)]
        if large:
            messages.insert(0, b"h%d-large:" % len(from_handler) + b"x" * 5000)
        for message in messages:
            pair.client.schedule(pair.client_fd, message)
            from_handler.append(message)
        running.clear()

    # A handler that waits for itself (the bug this test found) hangs: the
    # run then ends with every thread's traceback instead of never.
    faulthandler.dump_traceback_later(120, exit=True)
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        loop = [b"m%d" % i for i in range(20000)]
        for i, message in enumerate(loop):
            pair.client.schedule(pair.client_fd, message)
            if i % 2000 == 1999:            # a round: the buffer goes to the core
                pair.client.wait_events(timeout=0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        faulthandler.cancel_dump_traceback_later()
    assert from_handler, "the timer never fired"
    total, got = len(loop) + len(from_handler), []
    deadline = time.monotonic() + 20
    while len(got) < total and time.monotonic() < deadline:
        pair.client.wait_events(timeout=0)          # sends what is queued
        try:
            got += [e.message for e in pair.server.wait_events(timeout=0.05) if e.type is RX]
        except pyipc.TimeoutError:
            pass
    assert [m for m in got if m.startswith(b"m")] == loop
    assert [m for m in got if m.startswith(b"h")] == from_handler
    assert len(got) == len(loop) + len(from_handler)


# ------------------------------------------------------------ a handler inside a hand-over

def _schedule_six_with_a_handler_in(monkeypatch, pair, name: str, after: bool) -> list:
    """Buffer m0..m5, then run a stand-in for a signal handler (a large and
    a small schedule()) inside the hand-over to the core, where a real one
    can run: after the call of the native module's function `name` returns
    (`after`), or before it is called. Returns what the server receives."""
    from pyipc import _native
    real, fired = getattr(_native, name), []

    def with_handler(*args):
        if not after and not fired:
            fired.append(1)
            pair.client.schedule(pair.client_fd, b"BIG" + b"x" * 5000)
            pair.client.schedule(pair.client_fd, b"after-big")
        result = real(*args)
        if after and not fired:
            fired.append(1)
            pair.client.schedule(pair.client_fd, b"BIG" + b"x" * 5000)
            pair.client.schedule(pair.client_fd, b"after-big")
        return result

    monkeypatch.setattr(_native, name, with_handler)
    for i in range(6):
        pair.client.schedule(pair.client_fd, b"m%d" % i)
    assert _tx_count(pair.client, 8) == 8
    monkeypatch.undo()
    assert fired
    return [m[:9] for _, m in _received(pair.server, 8)]


@pytest.mark.parametrize("name, after", [("_ipc_schedule_many", True), ("_join", True),
                                         ("_from_buffer", False)])
def test_a_handler_inside_the_hand_over_sends_each_message_once_in_order(
        native_pair, monkeypatch, name, after):
    """White box (native): a handler that hands the buffer over while the
    loop's hand-over makes its arguments, or right after the core took them:
    each message goes to the core once, in order (m0..m5 were buffered
    first), nothing is lost."""
    got = _schedule_six_with_a_handler_in(monkeypatch, native_pair, name, after)
    assert got == [b"m0", b"m1", b"m2", b"m3", b"m4", b"m5", b"BIGxxxxxx", b"after-big"]


def test_a_handler_between_learning_the_room_and_using_it_is_counted(native_pair,
                                                                       monkeypatch):
    """White box (native): a handler that schedules right after the room of
    an fd was learnt from the core: its bytes count against the bound, so
    schedule() raises QueueFullError at the bound, and every message it
    accepted is sent (a stale room let Python buffer past the bound; the
    core then refused one at the hand-over and it was lost)."""
    from pyipc import _native
    client, fd = native_pair.client, native_pair.client_fd
    bound = 12 * 1004 - 1                   # room for 11 messages of 1,000 bytes
    server = pyipc.Context(rundir=client.rundir, backend="native")
    small = pyipc.Context(rundir=client.rundir, backend="native", max_message_size=2000,
                          max_queue_size=bound)
    try:
        server.service_init("bounded")
        sfd = small.connect_service("bounded")
        real, fired = _native._ipc_schedule_room, []

        def room_then_handler(*args):
            rc = real(*args)
            if not fired:
                fired.append(1)
                small.schedule(sfd, b"H" * 1000)
            return rc

        monkeypatch.setattr(_native, "_ipc_schedule_room", room_then_handler)
        accepted = []
        with pytest.raises(pyipc.QueueFullError):
            for i in range(20):
                small.schedule(sfd, b"%04d" % i + b"m" * 996)
                accepted.append(b"%04d" % i)
        monkeypatch.undo()
        assert len(accepted) == 10              # and the handler's: 11 in all
        assert _tx_count(small, 11) == 11       # no QueueFullError at the hand-over
        got = [m[:4] for _, m in _received(server, 11)]
        assert got == [b"HHHH"] + accepted
    finally:
        small.close_all()
        server.close_all()


def test_pure_schedule_counts_a_handlers_bytes(rundir, monkeypatch):
    """White box (pure, whatever the test's backend): a handler that
    schedules while schedule() makes its frame: the queue's byte count is
    the bytes queued (it lost the handler's, so the bound loosened and the
    count drifted below zero)."""
    from pyipc._pure import send_queue
    server = pyipc.Context(rundir=rundir, backend="pure")
    client = pyipc.Context(rundir=rundir, backend="pure")
    try:
        server.service_init("svc")
        fd = client.connect_service("svc")
        real, fired = send_queue._pack, []

        def pack_with_handler(n):
            if not fired:
                fired.append(1)
                client.schedule(fd, b"h" * 96)
            return real(n)

        monkeypatch.setattr(send_queue, "_pack", pack_with_handler)
        client.schedule(fd, b"m" * 96)
        monkeypatch.undo()
        conn = client._by_fd[fd]
        assert conn.queued_bytes == sum(len(frame) for frame, _ in conn.queue) == 200
    finally:
        client.close_all()
        server.close_all()


def raising_in_flush(why: str) -> Callable[..., object]:
    """A trace function raising KeyboardInterrupt(why) at the first function
    native's _flush enters: a signal handler's exception before its C call."""
    import sys

    def tracer(frame: object, event: str, arg: object) -> object:
        caller = getattr(frame, "f_back", None)
        if event == "call" and caller is not None and caller.f_code.co_name == "_flush":
            sys.settrace(None)
            raise KeyboardInterrupt(why)
        return None
    return tracer


@pytest.mark.parametrize("closing", ["close", "close_all"])
def test_a_flush_a_handler_cut_short_in_close_is_dropped_with_its_warning(native_pair, caplog,
                                                                           closing):
    """close(fd) hands schedule()'s buffer to the core first; a signal
    handler's exception comes before that C call (simulated with a trace
    function at the first function _flush enters). The exception comes out,
    the buffered messages of fd are dropped with the WARNING, and later calls
    are unaffected (they were left buffered for a closed fd: no WARNING,
    and each later wait raised UnknownFdError for them)."""
    import sys
    client, fd = native_pair.client, native_pair.client_fd
    other = client.connect_service(native_pair.name)
    for _ in range(3):
        client.schedule(fd, b"a")
    assert len(client._pending) == 6                    # buffered, not in the core yet

    sys.settrace(raising_in_flush("a signal as close() flushes"))
    try:
        with pytest.raises(KeyboardInterrupt):
            client.close(fd) if closing == "close" else client.close_all()
    finally:
        sys.settrace(None)
    assert client._pending == []
    assert f"closing fd {fd} discards 3 scheduled message(s)" in caplog.text
    if closing == "close":
        client.schedule(other, b"still fine")
        assert [(e.type, e.fd) for e in client.wait_events(timeout=10)] == \
            [(EventType.MESSAGE_TX, other)]


def test_close_all_warns_each_fd_with_its_whole_count_past_64_fds(native_pair, caplog):
    """70 fds, each with a message the core holds and one schedule() buffered
    that a handler's exception kept from the core: one WARNING per fd, each
    counting both, as pure (past 64 fds native counted the buffered one
    apart and summed the rest up in one line)."""
    import sys
    client = native_pair.client
    client.linger = 0
    fds = [client.connect_service(native_pair.name) for _ in range(70)]
    for fd in fds:
        client.schedule(fd, b"x" * 70_000)          # not buffered: in the core
    for fd in fds:
        client.schedule(fd, b"s")                   # buffered

    sys.settrace(raising_in_flush("a signal as close_all() flushes"))
    try:
        with pytest.raises(KeyboardInterrupt):
            client.close_all()
    finally:
        sys.settrace(None)
    warned = sorted(r.getMessage() for r in caplog.records if r.name == "pyipc")
    assert warned == sorted(f"closing fd {fd} discards 2 scheduled message(s)" for fd in fds)
