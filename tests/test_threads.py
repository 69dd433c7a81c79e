"""Threads: a context belongs to one thread at a time (its owner while it is
inside a call); any thread may call schedule(), write(), write_many() and
close() (and the typed variants), which the owner's wait or blocking read
wakes for and makes; any other call from a second thread while the owner is
inside raises IPCError instead of corrupting the context."""

from __future__ import annotations

import faulthandler
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, raises, spin_until, wait_for

BUSY = ("context is in use by another thread (a context belongs to one thread "
        "at a time; other threads may only call schedule(), write(), write_many() "
        "and close())")


class Owner:
    """A thread that makes one call on a context (its owner while it runs)
    and keeps the outcome: the value returned, or the exception raised."""

    def __init__(self, ctx: pyipc.Context, call: Callable[[], Any]) -> None:
        self.ctx = ctx
        self.outcome: list[Any] = []

        def run() -> None:
            try:
                self.outcome.append(call())
            except BaseException as exc:       # noqa: B036 - checked by the test
                self.outcome.append(exc)
        self.thread = threading.Thread(target=run)
        self.thread.start()
        # Inside (the guard records the owner before the call waits), or done.
        spin_until(lambda: ctx._guard._owner == self.thread.ident or bool(self.outcome))

    def result(self) -> Any:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the owner's call did not return"
        return self.outcome[0]


def in_thread(call: Callable[[], Any]) -> Any:
    """Run ``call`` in another thread; return its value or its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as exc:           # noqa: B036
            out.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "the call from another thread did not return"
    return out[0]


class Poke:
    """A socket pair whose one end a context watches (EXTERNAL): poke() ends
    the owner's wait without touching the connections; done() reads the
    byte back, so that the fd is no longer ready. The context closes the
    watched end (close_all)."""

    def __init__(self, ctx: pyipc.Context) -> None:
        watched, self.other = socket.socketpair()
        self.fd = watched.detach()
        ctx.add_external(self.fd)

    def poke(self) -> None:
        self.other.send(b"x")

    def done(self) -> None:
        assert os.read(self.fd, 1) == b"x"


def two_clients(ctx_factory) -> tuple:
    """A service context and two clients: (server, (client, its fd, the
    server's fd of it) for each)."""
    server, clients = ctx_factory(), [ctx_factory(), ctx_factory()]
    server.service_init("svc")
    out = []
    for client in clients:      # one at a time: each CONNECTION is that client's
        fd = client.connect_service("svc")
        out.append((client, fd, wait_for(server, EventType.CONNECTION)[-1].fd))
    return server, out[0], out[1]


def _reader(client: pyipc.Context, fd: int, count: int, out: list) -> threading.Thread:
    """A thread that owns the client context and reads ``count`` messages."""
    def run() -> None:
        out.extend(client.read(fd) for _ in range(count))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_schedule_from_other_threads_wakes_the_waiting_loop(pair):
    per_thread, threads = 150, 2
    received: list[bytes] = []
    reader = _reader(pair.client, pair.client_fd, per_thread * threads, received)

    def produce(tag: bytes) -> None:
        for i in range(per_thread):
            pair.server.schedule(pair.server_fd, tag + b"%d" % i)

    producers = [threading.Thread(target=produce, args=(bytes([65 + t]),))
                 for t in range(threads)]
    # No timer would be needed: without the wake-up this wait would never end.
    pair.server.timer = 20_000
    for p in producers:
        p.start()
    written = 0
    while written < per_thread * threads:
        ev = pair.server.wait_event()
        assert ev.type == EventType.MESSAGE_TX, f"{ev} after {written} written"
        written += 1
    for p in producers:
        p.join()
    reader.join(10)
    assert not reader.is_alive()
    for t in range(threads):
        tag = bytes([65 + t])
        assert [m for m in received if m[:1] == tag] == [tag + b"%d" % i for i in range(per_thread)]


def test_schedule_from_another_thread_reports_its_error_there(pair):
    errors: list[BaseException] = []

    def bad() -> None:
        try:
            pair.server.schedule(9999, b"x")
        except pyipc.IPCError as exc:
            errors.append(exc)
        pair.client.write(pair.client_fd, b"done")       # ends the owner's wait

    pair.server.timer = 20_000
    thread = threading.Thread(target=bad)
    thread.start()
    assert wait_for(pair.server, EventType.MESSAGE_RX)[-1].message == b"done"
    thread.join()
    assert len(errors) == 1 and type(errors[0]) is pyipc.UnknownFdError
    assert str(errors[0]) == "fd 9999 is not managed by this context"


def test_other_calls_from_a_second_thread_are_refused(pair):
    """What cannot be handed over (a second read or wait, the calls that
    make or inspect fds) raises IPCError while the owner is inside."""
    pair.server.timer = 20_000
    owner = Owner(pair.server, pair.server.wait_event)
    buf = bytearray(16)
    for call in (lambda: pair.server.read(pair.server_fd),
                 lambda: pair.server.read_many(pair.server_fd),
                 lambda: pair.server.read_into(pair.server_fd, buf),
                 lambda: pair.server.wait_event(),
                 lambda: pair.server.wait_events(timeout=0),
                 lambda: pair.server.peer_credentials(pair.server_fd),
                 lambda: pair.server.service_init("other"),
                 lambda: pair.server.connect_service("svc"),
                 lambda: pair.server.add_switch(pair.server_fd, pair.service_fd),
                 lambda: pair.server.fileno(),
                 lambda: pair.server.close_all()):
        raises(pyipc.IPCError, BUSY, call)
    pair.client.write(pair.client_fd, b"wake")
    event = owner.result()
    assert event.type == EventType.MESSAGE_RX and event.message == b"wake"
    # Nothing was corrupted: the context goes on working from this thread.
    pair.server.write(pair.server_fd, b"still fine")
    assert pair.client.read(pair.client_fd) == b"still fine"


def test_a_second_read_while_the_owner_reads_is_refused(pair):
    owner = Owner(pair.server, lambda: pair.server.read(pair.server_fd))
    assert type(in_thread(lambda: pair.server.read(pair.server_fd))) is pyipc.IPCError
    raises(pyipc.IPCError, BUSY, lambda: pair.server.read(pair.server_fd))
    pair.client.write(pair.client_fd, b"one")
    assert owner.result() == b"one"


def test_schedule_from_another_thread_when_idle_is_sent_by_the_next_wait(pair):
    thread = threading.Thread(target=lambda: pair.server.schedule(pair.server_fd, b"idle"))
    thread.start()
    thread.join()
    assert wait_for(pair.server, EventType.MESSAGE_TX)[-1].fd == pair.server_fd
    assert pair.client.read(pair.client_fd) == b"idle"


def test_write_from_another_thread_while_the_owner_waits(pair):
    """write() is made by the waiting owner and returns once written; the
    owner's wait goes on (a write makes no event)."""
    poke = Poke(pair.server)
    owner = Owner(pair.server, pair.server.wait_event)
    assert in_thread(lambda: pair.server.write(pair.server_fd, b"from a thread")) is None
    assert pair.client.read(pair.client_fd) == b"from a thread"
    assert in_thread(lambda: pair.server.write_many(pair.server_fd, iter([b"a", b"b"]),
                                                   timeout=0.05)) is None
    assert pair.client.read_many(pair.client_fd) == [b"a", b"b"]
    # Still waiting, past the write's timeout: that was the write's, not the wait's.
    owner.thread.join(0.3)
    assert owner.thread.is_alive()
    poke.poke()
    assert owner.result().type == EventType.EXTERNAL
    poke.done()


def test_write_from_another_thread_while_the_owner_reads_another_fd(ctx_factory):
    """The owner blocks in read() on one connection; a write to another one
    from another thread wakes the read, is made, and the read goes on."""
    server, (a, a_fd, server_a), (b, b_fd, server_b) = two_clients(ctx_factory)
    for n in range(3):
        owner = Owner(server, lambda: server.read(server_a))
        assert in_thread(lambda: server.write(server_b, b"to b %d" % n, timeout=0.05)) is None
        assert b.read(b_fd) == b"to b %d" % n
        if n == 0:      # the read has no timeout: the write's is not kept
            owner.thread.join(0.3)
            assert owner.thread.is_alive()
        # schedule() is queued while the owner reads; its next wait sends it.
        assert in_thread(lambda: server.schedule(server_b, b"later %d" % n)) is None
        assert owner.thread.is_alive()
        a.write(a_fd, b"to server %d" % n)
        assert owner.result() == b"to server %d" % n
        assert wait_for(server, EventType.MESSAGE_TX)[-1].fd == server_b
        assert b.read(b_fd) == b"later %d" % n


@pytest.mark.parametrize("call", ["read_many", "read_into"])
def test_the_other_blocking_reads_wake_for_a_write(pair, call):
    buf = bytearray(64)
    read = {"read_many": lambda: pair.server.read_many(pair.server_fd),
            "read_into": lambda: pair.server.read_into(pair.server_fd, buf)}[call]
    owner = Owner(pair.server, read)
    assert in_thread(lambda: pair.server.write(pair.server_fd, b"while reading")) is None
    assert pair.client.read(pair.client_fd) == b"while reading"
    pair.client.write(pair.client_fd, b"now")
    result = owner.result()
    assert (result == [b"now"]) if call == "read_many" else (result == 3 and buf[:3] == b"now")


def test_write_from_another_thread_raises_what_write_raises(ctx_factory):
    server, client = ctx_factory(max_message_size=1024), ctx_factory()
    server.service_init("svc")
    client_fd = client.connect_service("svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    poke = Poke(server)
    owner = Owner(server, server.wait_event)
    error = in_thread(lambda: server.write(fd, b"x" * 2000))
    assert type(error) is pyipc.MessageTooLargeError
    assert str(error) == "message of 2000 bytes exceeds max_message_size (1024)"
    error = in_thread(lambda: server.write(9999, b"x"))
    assert type(error) is pyipc.UnknownFdError
    assert str(error) == "fd 9999 is not managed by this context"
    error = in_thread(lambda: server.write(fd, 12))
    assert type(error) is TypeError and str(error) == "payload must be bytes-like or str, not int"
    error = in_thread(lambda: server.write(fd, b"x", timeout=-1))
    assert type(error) is ValueError
    # The client reads nothing: a small write fits (its timeout only bounds
    # the hand-over to the owner), a large one times out, made by the owner.
    assert in_thread(lambda: server.write_typed(fd, Note("x" * 900), REGISTRY, timeout=5)) \
        is None
    big = [b"y" * 1000] * 20_000
    error = in_thread(lambda: server.write_many(fd, big, timeout=0.2))
    assert type(error) is pyipc.TimeoutError and str(error) == f"write on fd {fd} timed out"
    poke.poke()
    assert owner.result().type == EventType.EXTERNAL
    poke.done()
    assert client.read_typed(client_fd, REGISTRY) == Note("x" * 900)
    assert client.read(client_fd) == b"y" * 1000          # the stream stays framed
    # The peer gone: the write from a thread says what write says.
    client.close_all()
    owner = Owner(server, server.wait_event)            # its DISCONNECTION ends it
    assert owner.result().type in (EventType.DISCONNECTION, EventType.ERROR)
    error = in_thread(lambda: server.write(fd, b"late"))
    assert isinstance(error, pyipc.IPCError)


@dataclass
class Note:
    text: str


REGISTRY = pyipc.Registry()
REGISTRY.register(1, Note)


def test_typed_variants_from_another_thread(pair):
    poke = Poke(pair.server)
    owner = Owner(pair.server, pair.server.wait_event)
    assert in_thread(lambda: pair.server.write_typed(pair.server_fd, Note("w"), REGISTRY)) is None
    assert in_thread(lambda: pair.server.schedule_typed(pair.server_fd, Note("s"), REGISTRY)) is None
    assert pair.client.read_typed(pair.client_fd, REGISTRY) == Note("w")
    # The waiting owner sends what was scheduled (its MESSAGE_TX ends the wait).
    assert owner.result().type == EventType.MESSAGE_TX
    assert pair.client.read_typed(pair.client_fd, REGISTRY) == Note("s")


def test_close_from_another_thread_while_the_owner_waits(pair):
    """A thread schedules, then closes: both made by the waiting owner, in
    order; close() sends what is scheduled first (linger) and returns."""
    poke = Poke(pair.server)
    owner = Owner(pair.server, pair.server.wait_event)

    def last_words() -> None:
        pair.server.schedule(pair.server_fd, b"last words")
        pair.server.close(pair.server_fd)
    assert in_thread(last_words) is None
    assert pair.client.read(pair.client_fd) == b"last words"
    with pytest.raises(pyipc.ConnectionClosedError):
        pair.client.read(pair.client_fd)
    # The owner's wait may have sent "last words" itself (its MESSAGE_TX
    # ends the wait) before the close came; a close makes no event.
    if owner.thread.is_alive():
        poke.poke()
        assert owner.result().type == EventType.EXTERNAL
    else:
        assert owner.result().type == EventType.MESSAGE_TX
    raises(pyipc.UnknownFdError, f"fd {pair.server_fd} is not managed by this context",
           pair.server.write, pair.server_fd, b"x")


def test_close_of_the_fd_the_owner_reads_ends_the_read(pair):
    owner = Owner(pair.server, lambda: pair.server.read(pair.server_fd))
    assert in_thread(lambda: pair.server.close(pair.server_fd)) is None
    error = owner.result()
    assert type(error) is pyipc.UnknownFdError
    assert str(error) == f"fd {pair.server_fd} is not managed by this context"


def test_a_write_that_times_out_before_the_owner_takes_it_is_withdrawn(ctx_factory):
    """The owner is busy in a write that blocks (not a wait): another
    thread's write(timeout=) ends with TimeoutError and is never made."""
    server, (_, _, slow_fd), (other, other_fd, server_other) = two_clients(ctx_factory)
    server.linger = 0       # closing drops what the slow client never reads
    owner = Owner(server, lambda: server.write(slow_fd, b"z" * (8 << 20), timeout=0.5))
    error = in_thread(lambda: server.write(server_other, b"withdrawn", timeout=0.1))
    assert type(error) is pyipc.TimeoutError
    assert str(error) == f"write on fd {server_other} timed out"
    assert type(owner.result()) is pyipc.TimeoutError
    server.write(server_other, b"next")
    assert other.read(other_fd) == b"next"


def test_a_handed_over_write_whose_signal_handler_raises_is_withdrawn(ctx_factory):
    """The main thread's write is handed over to the owner (busy in a write
    that blocks); a signal's handler raises in the main thread meanwhile:
    that exception comes out and the write is never made (it was sent
    later all the same)."""
    import signal
    server, (_, _, slow_fd), (other, other_fd, server_other) = two_clients(ctx_factory)
    server.linger = 0       # closing drops what the slow client never reads

    class Boom(Exception):
        pass

    def boom(signum: int, frame: Any) -> None:
        raise Boom()

    old = signal.signal(signal.SIGALRM, boom)
    try:
        owner = Owner(server, lambda: server.write(slow_fd, b"z" * (8 << 20), timeout=1.0))
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Boom):
            server.write(server_other, b"withdrawn")       # handed over, then Boom
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert type(owner.result()) is pyipc.TimeoutError
    server.write(server_other, b"next")
    assert other.read(other_fd, timeout=10) == b"next"      # the withdrawn one never came


def test_an_exception_not_the_calls_own_while_the_owner_makes_it_is_the_owners(
        pair, monkeypatch):
    """The owner (this thread, waiting) makes a call another thread handed
    over, and an exception that is not the call's own comes meanwhile (a
    signal handler's, in the owner's thread: simulated here). It comes out
    of the owner's wait, and of the other thread's call (it went to the other
    thread only: the owner's loop never saw its handler's exception)."""
    class Stop(Exception):
        pass

    def interrupted(self: Any, ctx: Any) -> None:
        raise Stop("a signal handler's")
    monkeypatch.setattr(pyipc._threads._Handoff, "run", interrupted)
    server, me = pair.server, threading.get_ident()
    outcome: list[Any] = []

    def other() -> None:
        spin_until(lambda: server._guard._owner == me)      # the owner is inside: handed over
        try:
            server.schedule(pair.server_fd, b"x")
        except Stop as exc:
            outcome.append(exc)
    thread = threading.Thread(target=other)
    thread.start()
    try:
        with pytest.raises(Stop):
            server.wait_events(timeout=10)
    finally:
        thread.join(10)
    assert len(outcome) == 1 and type(outcome[0]) is Stop


def test_a_signal_as_a_handing_thread_takes_over_leaves_the_context_free(pair):
    """The owner leaves just as another thread hands a write over, so that
    thread makes it itself; a signal handler's KeyboardInterrupt comes as it
    enters the guard's exit path (simulated with a trace function, where
    CPython runs handlers: at a function's entry). The exception comes out
    and the context is free again (its lock was held for good: every later
    call hung or was 'in use by another thread')."""
    import sys
    import pyipc._threads as threads_mod
    ctx, fd = pair.client, pair.client_fd
    source = open(threads_mod.__file__).read().splitlines()
    release_line = source.index(next(line for line in source
                                     if line.strip() == "guard._lock.release()")) + 1
    at_release, queued = threading.Event(), threading.Event()
    fired: list[str] = []

    def owner_tracer(frame: Any, event: str, arg: Any) -> Any:
        # The owner's wait_event, about to release: held until the write is queued.
        if event == "line" and frame.f_code.co_filename == threads_mod.__file__ \
                and frame.f_lineno == release_line and frame.f_code.co_name == "wait_event":
            at_release.set()
            queued.wait(10)
        return owner_tracer

    def owner() -> None:
        sys.settrace(owner_tracer)
        try:
            with pytest.raises(pyipc.TimeoutError):
                ctx.wait_event(timeout=0.2)
        finally:
            sys.settrace(None)

    def handing_tracer(frame: Any, event: str, arg: Any) -> Any:
        if event != "call":
            return None
        caller = frame.f_back
        if frame.f_code.co_name == "_wakeup":
            queued.set()
        elif not fired and frame.f_code.co_name in ("leave", "apply") \
                and caller is not None and caller.f_code.co_name == "hand_over":
            fired.append(frame.f_code.co_name)           # the exit path's first function
            raise KeyboardInterrupt("a signal as the guard is left")
        return None

    thread = threading.Thread(target=owner)
    thread.start()
    assert at_release.wait(10)
    sys.settrace(handing_tracer)
    try:
        with pytest.raises(KeyboardInterrupt):
            ctx.write(fd, b"x", timeout=5)
    finally:
        sys.settrace(None)
        queued.set()
        thread.join(10)
    assert fired and not ctx._guard._lock.locked()
    assert in_thread(lambda: ctx.wait_events(timeout=0)) == []   # free, from any thread


def test_a_signal_as_the_owner_settles_a_handed_call_leaves_no_thread_waiting(pair):
    """The owner (this thread) makes a write another thread handed over; a
    signal handler's KeyboardInterrupt comes as it settles it (simulated
    with a trace function: at the entry of any function apply() calls after
    the call, where CPython runs handlers). The write's thread returns (it
    waited for good when settling entered threading.Event.set)."""
    import sys
    ctx, fd, me = pair.client, pair.client_fd, threading.get_ident()
    outcome: list[Any] = []

    def hand_over() -> None:
        spin_until(lambda: ctx._guard._owner == me)
        try:
            ctx.write(fd, b"x", timeout=1)
            outcome.append("written")
        except BaseException as exc:                # noqa: B036 - checked below
            outcome.append(exc)

    made: list[bool] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        caller = frame.f_back
        if event == "call" and caller is not None and caller.f_code.co_name == "apply":
            if frame.f_code.co_name == "run":
                made.append(True)
            elif made:                               # after the call: settling it
                sys.settrace(None)
                raise KeyboardInterrupt("a signal as the call is settled")
        return None
    thread = threading.Thread(target=hand_over)
    thread.start()
    sys.settrace(tracer)
    try:
        ctx.wait_events(timeout=2)      # the write made inside it: no event of its own
    except (KeyboardInterrupt, pyipc.TimeoutError):
        pass
    finally:
        sys.settrace(None)
    thread.join(10)
    assert not thread.is_alive(), "the handed-over write's thread waits for good"
    assert made and outcome in (["written"], [KeyboardInterrupt])
    assert pair.server.read(pair.server_fd, timeout=10) == b"x"


@pytest.mark.parametrize("name, value", [("timer", 5), ("busy_poll", 10),
                                         ("switch_events", True)])
def test_settings_from_another_thread_while_the_owner_waits_are_refused(pair, name, value):
    """timer, busy_poll and switch_events are read by the owner's wait (the
    native core's, with the GIL released): set from another thread meanwhile,
    they raise IPCError and change nothing (they were changed under the
    wait)."""
    server = pair.server
    poke = Poke(server)
    before = getattr(server, name)
    owner = Owner(server, lambda: server.wait_events(timeout=10))
    try:
        raises(pyipc.IPCError, BUSY, setattr, server, name, value)
        assert getattr(server, name) == before
    finally:
        poke.poke()
    assert [e.type for e in owner.result()] == [EventType.EXTERNAL]
    poke.done()
    setattr(server, name, value)                # nobody inside: taken
    assert getattr(server, name) == value


def test_a_call_queued_just_before_a_handler_raised_is_withdrawn(ctx_factory, monkeypatch):
    """A signal handler raises in the handing thread right after its call
    was queued (simulated: the owner's wake-up raises): the exception comes
    out and the call is withdrawn, never made (it was made later all the
    same)."""
    server, (_, _, _), (other, other_fd, server_other) = two_clients(ctx_factory)
    poke = Poke(server)
    owner = Owner(server, lambda: server.wait_events(timeout=10))

    class Boom(Exception):
        pass

    def wakeup_then_boom(self: Any) -> None:
        raise Boom()
    with monkeypatch.context() as m:
        m.setattr(type(server), "_wakeup", wakeup_then_boom)
        with pytest.raises(Boom):
            server.schedule(server_other, b"withdrawn")
    poke.poke()
    assert [e.type for e in owner.result()] == [EventType.EXTERNAL]
    poke.done()
    server.write(server_other, b"next")
    assert other.read(other_fd, timeout=10) == b"next"      # the withdrawn one never came


def test_a_thread_a_signal_handler_starts_during_a_read_can_hand_over(ctx_factory):
    """The only thread blocks in read() (the native core then waits in the
    kernel, not on the wake-up pipe); a signal's handler starts a thread
    whose write is handed over: it is made at once, not when the read ends
    (it waited for the read's end: forever without a timeout)."""
    import signal
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    fd, fd2 = client.connect_service("svc"), client.connect_service("svc")
    server_fds = [e.fd for e in collect(server, lambda seen: sum(
        e.type is EventType.CONNECTION for e in seen) >= 2) if e.type is EventType.CONNECTION]
    assert threading.active_count() == 1, threading.enumerate()
    written: list[float] = []
    late: list[threading.Thread] = []

    def write_from_a_new_thread() -> None:
        client.write(fd2, b"from the late thread")
        written.append(time.monotonic())
        client.close(fd)                # ends the owner's read (UnknownFdError)

    def start_thread(signum: int, frame: Any) -> None:
        late.append(threading.Thread(target=write_from_a_new_thread))
        late[0].start()

    old = signal.signal(signal.SIGALRM, start_thread)
    # Without a timeout (its wait watches the pipe): a hand-over that is
    # never seen hangs, and the run ends with every thread's traceback.
    faulthandler.dump_traceback_later(60, exit=True)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(pyipc.UnknownFdError):
            client.read(fd)
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    late[0].join(10)
    assert written and written[0] - start < 10
    assert server.read(server_fds[1], timeout=10) == b"from the late thread"


def test_guarded_methods_keep_their_signatures(pair):
    """The guard wraps each public method in a function with the method's own
    parameters: keywords and defaults work, a wrong call names the method."""
    pair.client.write(fd=pair.client_fd, payload=b"kw")
    assert pair.server.read_many(pair.server_fd, max_messages=1) == [b"kw"]
    pair.client.write_many(payloads=[b"a", b"b"], fd=pair.client_fd)
    assert pair.server.read(fd=pair.server_fd) == b"a"
    assert pair.server.read_many(pair.server_fd) == [b"b"]
    with pytest.raises(TypeError, match=r"write\(\) missing 1 required positional argument"):
        pair.client.write(pair.client_fd)          # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'size'"):
        pair.client.read(pair.client_fd, size=3)   # type: ignore[call-arg]


def test_a_call_with_a_timeout_waits_for_another_threads_write_at_most_that_long(ctx_factory):
    """Another thread's write() holds the context (its peer does not read):
    a wait or read with timeout= waits for it at most that long, then ends
    as it ends when nothing is ready (timeout=0 does not wait at all)."""
    server, (slow, slow_fd, server_slow), (_, _, server_other) = two_clients(ctx_factory)
    owner = Owner(server, lambda: server.write(server_slow, b"z" * (8 << 20), timeout=5.0))

    def took(call: Callable[[], Any]) -> tuple[Any, float]:
        start = time.monotonic()
        try:
            outcome = call()
        except pyipc.IPCError as exc:
            outcome = exc
        return outcome, time.monotonic() - start

    assert took(lambda: server.wait_events(timeout=0)) == ([], pytest.approx(0, abs=0.5))
    for call, text in ((lambda: server.wait_event(timeout=0.1), "wait timed out"),
                       (lambda: server.wait_events(timeout=0.1), "wait timed out"),
                       (lambda: server.read(server_other, timeout=0.1),
                        f"read on fd {server_other} timed out")):
        error, seconds = took(call)
        assert (type(error), str(error)) == (pyipc.TimeoutError, text)
        assert 0.1 <= seconds < 1.0
    assert owner.thread.is_alive()      # its write still waits: nothing waited for it
    assert len(slow.read(slow_fd)) == 8 << 20
    assert owner.result() is None
