"""ctx.fileno(): one fd, readable (level-triggered) while
wait_events(timeout=0) would return something, so that another event loop
drives a context (issue 18, item 1).

Readiness is checked for each kind of event, for events already queued in
user space, for scheduled data, for a due timer and for another thread's
schedule(); an idle context's fd is not readable. Two echo services driven
only by the fd (selectors, and asyncio's add_reader) answer a client in
another process with schedule(). close_all() closes the fd; a forked child
cannot use it. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import selectors
import subprocess
import sys
import threading
import time
from typing import Callable

import pytest

import pyipc
from pyipc import Event, EventType
from conftest import CHILD_ENV, Pair

WAIT_S = 10.0
MESSAGES = 1000


def readable(fd: int, timeout: float = 0.0) -> bool:
    """Whether fd is readable now (or within ``timeout`` seconds)."""
    return bool(select.select([fd], [], [], timeout)[0])


def drain(ctx: pyipc.Context) -> list[Event]:
    """The loop's rule: wait_events(timeout=0) until it returns nothing."""
    got: list[Event] = []
    while True:
        events = ctx.wait_events(timeout=0)
        if not events:
            return got
        got += events


def drain_until(ctx: pyipc.Context, what: Callable[[list[Event]], bool]) -> list[Event]:
    """Drain each time fileno() is readable until ``what`` holds of the events."""
    fd, got = ctx.fileno(), []
    end = time.monotonic() + WAIT_S
    while not what(got):
        assert readable(fd, max(0.0, end - time.monotonic())), f"fd never readable; got {got}"
        got += drain(ctx)
    return got


def types(events: list[Event]) -> list[EventType]:
    return [ev.type for ev in events]


# ---------------------------------------------------------------- the fd


def test_fileno_is_one_stable_fd_not_readable_when_idle(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("svc")
    fd = ctx.fileno()
    assert isinstance(fd, int) and fd >= 0
    assert ctx.fileno() == fd
    assert not readable(fd)
    assert ctx.wait_events(timeout=0) == []     # nothing ready: [] and no TimeoutError
    assert not readable(fd)


def test_wait_event_timeout_zero_still_times_out(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("svc")
    ctx.fileno()
    with pytest.raises(pyipc.TimeoutError, match="wait timed out"):
        ctx.wait_event(timeout=0)


def test_a_zero_timeout_wait_with_nothing_to_wait_for_is_nothing_ready(ctx_factory):
    """After the last fd is closed, a loop driven by fileno() may still call
    once more: a zero-timeout wait cannot hang, so it is "nothing ready" (as
    with fds of which none is ready); a wait that could block still says why
    it would hang."""
    ctx = ctx_factory()
    fd = ctx.service_init("svc")
    ctx.fileno()
    ctx.close(fd)
    assert ctx.wait_events(timeout=0) == []
    with pytest.raises(pyipc.TimeoutError, match="wait timed out"):
        ctx.wait_event(timeout=0)
    with pytest.raises(pyipc.IPCError, match="nothing to wait for: no fd and no timer"):
        ctx.wait_events(timeout=0.01)
    with pytest.raises(pyipc.IPCError, match="nothing to wait for: no fd and no timer"):
        ctx.wait_event()


def test_a_bad_timeout_is_refused_on_the_polling_path(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("svc")
    with pytest.raises(TypeError, match="not bool"):
        ctx.wait_events(timeout=False)


# ---------------------------------------------------------------- each kind of readiness


def test_readable_for_a_connection_a_message_and_a_disconnection(ctx_factory):
    server, client = ctx_factory(), ctx_factory()
    server.service_init("svc")
    fd = server.fileno()
    cfd = client.connect_service("svc")
    assert types(drain_until(server, bool)) == [EventType.CONNECTION]
    assert not readable(fd)
    client.write(cfd, b"hello")
    got = drain_until(server, bool)
    assert [(ev.type, ev.message) for ev in got] == [(EventType.MESSAGE_RX, b"hello")]
    assert not readable(fd)
    client.close(cfd)
    assert types(drain_until(server, bool)) == [EventType.DISCONNECTION]
    assert not readable(fd)


def test_events_queued_in_user_space_keep_it_readable(pair: Pair):
    server, fd = pair.server, pair.server.fileno()
    # Both arrive in one read: wait_event returns the first, the second waits
    # in the context's queue, with nothing left in the socket.
    pair.client.write_many(pair.client_fd, [b"first", b"second"])
    assert readable(fd, WAIT_S)
    assert server.wait_event(timeout=0).message == b"first"
    assert readable(fd)
    assert server.wait_event(timeout=0).message == b"second"
    assert not readable(fd)


def test_a_read_that_leaves_messages_queued_keeps_it_readable(pair: Pair):
    server, fd = pair.server, pair.server.fileno()
    pair.client.write_many(pair.client_fd, [b"first", b"second"])
    assert server.read(pair.server_fd, timeout=WAIT_S) == b"first"
    assert readable(fd)
    assert [ev.message for ev in drain(server)] == [b"second"]
    assert not readable(fd)


def test_scheduled_data_that_can_be_written_makes_it_readable(pair: Pair):
    server, fd = pair.server, pair.server.fileno()
    server.schedule(pair.server_fd, b"reply")
    assert readable(fd)
    assert [(ev.type, ev.fd) for ev in drain(server)] == [(EventType.MESSAGE_TX, pair.server_fd)]
    assert not readable(fd)
    assert pair.client.read(pair.client_fd, timeout=WAIT_S) == b"reply"


def test_another_threads_schedule_wakes_the_loop(pair: Pair):
    server, fd = pair.server, pair.server.fileno()
    sender = threading.Thread(target=server.schedule, args=(pair.server_fd, b"from a thread"))
    sender.start()
    got = drain_until(server, lambda evs: EventType.MESSAGE_TX in types(evs))
    sender.join(WAIT_S)
    assert types(got) == [EventType.MESSAGE_TX]
    assert pair.client.read(pair.client_fd, timeout=WAIT_S) == b"from a thread"
    assert not readable(fd)


def test_an_external_fd_makes_it_readable(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    try:
        ctx.add_external(r)
        fd = ctx.fileno()
        assert not readable(fd)
        os.write(w, b"x")
        assert readable(fd, WAIT_S)
        assert types(ctx.wait_events(timeout=0)) == [EventType.EXTERNAL]
        os.read(r, 1)
        assert drain(ctx) == []
        assert not readable(fd)
    finally:
        ctx.close(r)
        os.close(w)


def test_a_due_timer_makes_it_readable(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("svc")
    fd = ctx.fileno()
    start = time.monotonic()
    ctx.timer = 200
    assert not readable(fd)
    assert ctx.wait_events(timeout=0) == []         # not due yet
    assert readable(fd, WAIT_S)
    assert time.monotonic() - start >= 0.19
    assert types(drain(ctx)) == [EventType.TIMER]
    assert not readable(fd)                         # counts again from the TIMER
    assert readable(fd, WAIT_S)
    assert types(drain(ctx)) == [EventType.TIMER]
    ctx.timer = None
    assert not readable(fd, 0.1)


def test_events_restart_the_timer(pair: Pair):
    server, fd = pair.server, pair.server.fileno()
    server.timer = 300
    pair.client.write(pair.client_fd, b"activity")
    start = time.monotonic()
    assert types(drain_until(server, bool)) == [EventType.MESSAGE_RX]
    got = drain_until(server, bool)
    assert types(got) == [EventType.TIMER]
    assert time.monotonic() - start >= 0.25       # counted from the message, not before


# ---------------------------------------------------------------- closing and fork


def test_close_all_closes_the_fd_and_a_later_call_makes_a_new_one(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("svc")
    fd = ctx.fileno()
    ctx.close_all()
    with pytest.raises(OSError):
        os.fstat(fd)
    ctx.service_init("svc")
    fd = ctx.fileno()
    assert not readable(fd)
    ctx.close_all()


FORK_SCRIPT = r'''
import json, os, select, sys
import pyipc

rundir, backend = sys.argv[1], sys.argv[2]
out = {}
with pyipc.Context(rundir=rundir, backend=backend) as ctx:
    ctx.service_init("forked")
    fd = ctx.fileno()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            ctx.fileno()
        except pyipc.IPCError as e:
            code = 0 if "inherited through fork()" in str(e) else 2
        ctx.close_all()         # the child's copies only
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out["child"] = os.waitstatus_to_exitcode(status)
    with pyipc.Context(rundir=rundir, backend=backend) as client:
        client.connect_service("forked")
        out["readable"] = bool(select.select([fd], [], [], 10)[0])
        out["events"] = [ev.type.name for ev in ctx.wait_events(timeout=0)]
        out["same_fd"] = ctx.fileno() == fd
print(json.dumps(out))
'''


def test_a_forked_child_cannot_use_it_and_its_close_leaves_the_parents(backend, rundir):
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT, rundir, backend],
                          env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "child": 0, "readable": True, "events": ["CONNECTION"], "same_fd": True}


# ---------------------------------------------------------------- echo services driven by the fd

CLIENT = r'''
import sys
import pyipc

rundir, backend, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with pyipc.Context(rundir=rundir, backend=backend) as ctx:
    fd = ctx.connect_service("echo")
    sent = 0
    while sent < count:
        # Round trips and bursts: a burst makes the service queue many replies.
        burst = [b"%d" % i for i in range(sent, min(count, sent + 1 + sent % 50))]
        ctx.write_many(fd, burst, timeout=30)
        for want in burst:
            got = ctx.read(fd, timeout=30)
            if got != want:
                sys.exit(f"expected {want!r}, got {got!r}")
        sent += len(burst)
    ctx.close(fd)
print("ok", sent)
'''


def start_client(rundir: str, backend: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLIENT, rundir, backend, str(MESSAGES)],
                            env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def echo(ctx: pyipc.Context, seen: list[bytes]) -> bool:
    """Drain the context, echoing each message with schedule(); True once
    the client disconnected."""
    ended = False
    for ev in drain(ctx):
        if ev.type == EventType.MESSAGE_RX:
            seen.append(ev.message)
            ctx.schedule(ev.fd, ev.message)
        elif ev.type == EventType.DISCONNECTION:
            ended = True
    return ended


def check_client(client: subprocess.Popen, seen: list[bytes]) -> None:
    out, err = client.communicate(timeout=WAIT_S)
    assert client.returncode == 0, err
    assert out.split() == ["ok", str(MESSAGES)]
    assert seen == [b"%d" % i for i in range(MESSAGES)]


def test_a_selectors_loop_serves_an_echo_with_schedule(ctx_factory, backend, rundir):
    ctx = ctx_factory()
    ctx.service_init("echo")
    client = start_client(rundir, backend)
    seen: list[bytes] = []
    end = time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        sel.register(ctx.fileno(), selectors.EVENT_READ)
        try:
            while True:
                assert time.monotonic() < end, f"echoed {len(seen)} of {MESSAGES}"
                if sel.select(timeout=1.0) and echo(ctx, seen):
                    break
        except BaseException:
            client.kill()
            raise
    check_client(client, seen)
    assert not readable(ctx.fileno())


def test_an_asyncio_loop_serves_an_echo_with_schedule(ctx_factory, backend, rundir):
    ctx = ctx_factory()
    ctx.service_init("echo")
    seen: list[bytes] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def on_ready() -> None:
            if echo(ctx, seen) and not ended.done():
                ended.set_result(None)

        loop.add_reader(ctx.fileno(), on_ready)
        try:
            await asyncio.wait_for(ended, 60)
        finally:
            loop.remove_reader(ctx.fileno())

    client = start_client(rundir, backend)
    try:
        asyncio.run(serve())
    except BaseException:
        client.kill()
        raise
    check_client(client, seen)


def test_events_parked_after_a_signal_keep_it_readable_across_a_blocking_read(rundir):
    """Native: events a signal's exception interrupted on their way out wait
    in Python (_handed) and keep fileno() readable with a wake-up. A blocking
    read of another fd that starts meanwhile ends its first wait on that
    wake-up (the core consumes it); once the read returns, fileno() must be
    readable again, or a loop driven by it would never see those events."""
    from conftest import require_backend
    require_backend("native")
    with pyipc.Context(rundir=rundir, backend="native") as server, \
            pyipc.Context(rundir=rundir, backend="native") as client:
        a = Pair(server, client, "parked-a")
        b = Pair(server, client, "parked-b")
        client.write(a.client_fd, b"parked")
        (parked,) = [ev for ev in server.wait_events(timeout=5)
                     if ev.type == EventType.MESSAGE_RX]
        server._keep_handed([parked])            # as a signal's exception leaves them
        fd = server.fileno()
        assert readable(fd)
        sender = threading.Timer(0.2, client.write, (b.client_fd, b"later"))
        sender.start()
        try:
            assert server.read(b.server_fd, timeout=10) == b"later"
        finally:
            sender.join()
        assert readable(fd)
        assert server.wait_events(timeout=0) == [parked]
