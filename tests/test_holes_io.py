"""Holes found by attack (issue 16, point 5), on both backends: fds that ipcd
hands over, IPC_NETWORK that is not UTF-8, a bad header after good frames in
one read, and a Context dropped without close_all()."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import socket
import struct
import threading
import warnings
from typing import Callable, Iterator, List

import pytest

import pyipc
from pyipc import EventType

from conftest import frame, raw_connect, wait_for

NOT_A_STREAM = "ipcd sent a file descriptor that is not a connected Unix or TCP stream socket"


def open_fds() -> List[str]:
    """This process's open fds (what a leak shows up in), after collecting
    what earlier tests left (their sockets close when collected)."""
    gc.collect()
    return sorted(os.listdir("/proc/self/fd"), key=int)


@contextlib.contextmanager
def fake_ipcd(rundir: str, fds: List[int]) -> Iterator[List[bytes]]:
    """A stand-in for ipcd, listening as RUNDIR/ipc in a thread: it answers
    one request with a raw ``ok`` carrying ``fds`` (SCM_RIGHTS). Yields the
    list the request is put in; on exit the thread is joined and its socket
    closed and removed."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = os.path.join(rundir, "ipc")
    listener.bind(path)
    listener.listen(1)
    requests: List[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            (size,) = struct.unpack(">I", _recv_exactly(conn, 4))
            requests.append(_recv_exactly(conn, size))
            socket.send_fds(conn, [b"ok"], fds)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield requests
    finally:
        thread.join(10)
        listener.close()
        os.unlink(path)
    assert not thread.is_alive()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the client hung up"
        data += chunk
    return data


# -- an ipcd reply carrying several fds, or a fd that is not a connection -------

def test_ipcd_reply_with_several_fds_keeps_the_first_and_closes_the_others(
        ctx_factory, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "svc unix://svc")
    ctx = ctx_factory()
    before = open_fds()
    ours, theirs = socket.socketpair()
    extra, extra_peer = socket.socketpair()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        with fake_ipcd(rundir, [theirs.fileno(), extra.fileno(), null]) as requests:
            fd = ctx.connect("svc")
        assert requests == [b"svc;svc unix://svc"]
        theirs.close()
        ctx.write(fd, b"through ipcd")          # the first fd is the connection
        assert _recv_exactly(ours, 16) == frame(b"through ipcd")
        ours.sendall(frame(b"back"))
        assert ctx.read(fd) == b"back"
        ctx.close(fd)
    finally:
        for s in (ours, theirs, extra, extra_peer):
            s.close()
        os.close(null)
    assert open_fds() == before


@pytest.mark.parametrize("kind", ["pipe", "devnull", "unconnected", "datagram"])
def test_ipcd_reply_with_a_fd_that_is_not_a_connection_is_refused(
        ctx_factory, rundir, monkeypatch, kind):
    monkeypatch.setenv("IPC_NETWORK", "svc unix://svc")
    ctx = ctx_factory()
    before = open_fds()
    with contextlib.ExitStack() as stack:
        fd = _not_a_connection(kind, stack.callback)
        with fake_ipcd(rundir, [fd]):
            with pytest.raises(pyipc.IPCError) as caught:
                ctx.connect("svc")
    assert type(caught.value) is pyipc.IPCError
    assert str(caught.value) == NOT_A_STREAM
    assert open_fds() == before                 # the received fd was closed
    with pytest.raises(pyipc.UnknownFdError):   # and nothing was added to the context
        ctx.write(fd, b"x")


def _not_a_connection(kind: str, on_exit: Callable) -> int:
    """A fd of ``kind`` (closed by ``on_exit``) that must not pass for a connection."""
    if kind == "pipe":
        r, w = os.pipe()
        on_exit(os.close, r)
        on_exit(os.close, w)
        return r
    if kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR)
        on_exit(os.close, fd)
        return fd
    if kind == "unconnected":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        on_exit(sock.close)
        return sock.fileno()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    on_exit(a.close)
    on_exit(b.close)
    return a.fileno()


# -- IPC_NETWORK that is not UTF-8 ----------------------------------------------

def test_ipc_network_that_is_not_utf8_is_a_clear_error(ctx_factory, rundir, monkeypatch):
    monkeypatch.setitem(os.environb, b"IPC_NETWORK", b"svc unix://\xff\xfe")
    ctx = ctx_factory()
    with pytest.raises(pyipc.IPCError) as caught:
        ctx.connect("svc")
    assert type(caught.value) is pyipc.IPCError
    assert str(caught.value) == "IPC_NETWORK is not valid UTF-8"


# -- good frames, then a header over max_message_size, in one read ---------------

LIMIT = 64
TOO_LARGE = f"message of {LIMIT + 1} bytes exceeds max_message_size ({LIMIT})"


def _flood(ctx_factory, rundir):
    """A service (max_message_size LIMIT) and a raw client that sent two
    frames and a header of LIMIT + 1 bytes in one sendall; (ctx, fd)."""
    ctx = ctx_factory(max_message_size=LIMIT)
    ctx.service_init("svc")
    client = raw_connect(rundir, "svc")
    fd = wait_for(ctx, EventType.CONNECTION)[-1].fd
    client.sendall(frame(b"one") + frame(b"two") + struct.pack(">I", LIMIT + 1))
    client.close()
    return ctx, fd


def _ending(ctx) -> list:
    return [(ev.type, ev.error) for ev in ctx.wait_events()]


ERROR_THEN_DISCONNECTION = [(EventType.ERROR, TOO_LARGE), (EventType.DISCONNECTION, None)]


@pytest.mark.parametrize("how", ["read", "read_into"])
def test_read_returns_frames_before_a_bad_header_then_message_too_large(
        ctx_factory, rundir, how):
    ctx, fd = _flood(ctx_factory, rundir)
    buf = bytearray(16)

    def read() -> bytes:
        if how == "read":
            return ctx.read(fd)
        return bytes(buf[:ctx.read_into(fd, buf)])

    assert read() == b"one"
    assert read() == b"two"
    for _ in range(2):      # the reason stays until the event loop takes it
        with pytest.raises(pyipc.MessageTooLargeError, match=re.escape(TOO_LARGE)):
            read()
    assert _ending(ctx) == ERROR_THEN_DISCONNECTION
    with pytest.raises(pyipc.ConnectionClosedError):
        read()


def test_read_many_returns_frames_before_a_bad_header_then_message_too_large(
        ctx_factory, rundir):
    ctx, fd = _flood(ctx_factory, rundir)
    assert ctx.read_many(fd) == [b"one", b"two"]
    with pytest.raises(pyipc.MessageTooLargeError, match=re.escape(TOO_LARGE)):
        ctx.read_many(fd)
    assert _ending(ctx) == ERROR_THEN_DISCONNECTION


def test_read_then_event_loop_messages_then_error_then_disconnection(ctx_factory, rundir):
    ctx, fd = _flood(ctx_factory, rundir)
    assert ctx.read(fd) == b"one"
    assert [(ev.type, ev.message, ev.error) for ev in ctx.wait_events()] == [
        (EventType.MESSAGE_RX, b"two", None),
        (EventType.ERROR, None, TOO_LARGE),
        (EventType.DISCONNECTION, None, None)]


def test_read_after_the_event_loop_met_the_bad_header(ctx_factory, rundir):
    ctx, fd = _flood(ctx_factory, rundir)
    first = wait_for(ctx, EventType.MESSAGE_RX)[-1]   # the loop read all of it
    assert first.message == b"one"
    assert ctx.read(fd) == b"two"
    with pytest.raises(pyipc.MessageTooLargeError, match=re.escape(TOO_LARGE)):
        ctx.read(fd)
    assert _ending(ctx) == ERROR_THEN_DISCONNECTION


# -- a Context dropped without close_all() ---------------------------------------

def test_dropped_context_warns_removes_its_socket_and_releases_its_lock(backend, rundir):
    ctx = pyipc.Context(rundir=rundir, backend=backend)
    ctx.service_init("svc")
    client = ctx.connect_service("svc")
    ctx.write(client, b"unread")
    path = os.path.join(rundir, "svc")
    with pytest.warns(ResourceWarning, match=r"unclosed <pyipc\.Context backend="):
        del ctx
        gc.collect()
    assert not os.path.exists(path)
    with pyipc.Context(rundir=rundir, backend=backend) as again:
        again.service_init("svc")               # the lock was released


@pytest.mark.parametrize("how", ["close_all", "with"])
def test_closed_context_does_not_warn(backend, rundir, how):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how == "with":
            with pyipc.Context(rundir=rundir, backend=backend) as ctx:
                ctx.service_init("svc")
        else:
            ctx = pyipc.Context(rundir=rundir, backend=backend)
            ctx.service_init("svc")
            ctx.close_all()
        del ctx
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_pure_context_dropped_in_a_forked_child_leaves_the_parents_service(rundir):
    ctx = pyipc.Context(rundir=rundir, backend="pure")
    try:
        ctx.service_init("svc")
        pid = os.fork()
        if pid == 0:                            # the child drops its copy
            code = 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ResourceWarning)
                    del ctx
                    gc.collect()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert os.path.exists(os.path.join(rundir, "svc"))
        with pyipc.Context(rundir=rundir, backend="pure") as other:
            with pytest.raises(pyipc.ServiceBusyError):
                other.service_init("svc")       # the parent still holds the lock
            other.connect_service("svc")        # and still serves
        assert wait_for(ctx, EventType.CONNECTION)
    finally:
        ctx.close_all()
