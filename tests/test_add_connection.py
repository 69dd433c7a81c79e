"""add_connection(fd): a connected Unix or TCP stream socket made elsewhere (one
end of a socketpair, a fd received by SCM_RIGHTS, a dialled TCP socket) becomes a connection of
the context, on both backends: framed messages both ways, events, close."""

from __future__ import annotations

import errno
import os
import socket

import pytest

import pyipc
from pyipc import EventType

from conftest import frame, raises, unavailable, wait_for


def test_one_end_of_a_socketpair_becomes_a_connection(ctx_factory):
    ctx = ctx_factory()
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    ctx.add_connection(fd)                      # the context owns it from now on
    with theirs:
        ctx.write(fd, b"to the peer")
        assert theirs.recv(100) == frame(b"to the peer")
        theirs.sendall(frame(b"one") + frame(b"two"))
        assert ctx.read(fd, timeout=5) == b"one"
        ev = wait_for(ctx, EventType.MESSAGE_RX)[-1]
        assert (ev.fd, ev.message) == (fd, b"two")
        ctx.schedule(fd, b"scheduled")
        wait_for(ctx, EventType.MESSAGE_TX)
        assert theirs.recv(100) == frame(b"scheduled")
        ctx.close(fd)
        assert theirs.recv(100) == b""          # closed: the peer sees the end
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")], ids=["ipv4", "ipv6"])
def test_a_connected_tcp_socket_becomes_a_connection(ctx_factory, family, host):
    """tcpd's dialled TCP socket reaches the client through ipcd as is."""
    ctx = ctx_factory()
    try:
        listener = socket.create_server((host, 0), family=family)
    except OSError as e:            # no IPv6 on this host (IPv4 is always there)
        unavailable(f"no {host}: {e}", "PYIPC_REQUIRE_NETWORK")
    with listener, socket.create_connection(listener.getsockname()[:2]) as ours:
        theirs, _ = listener.accept()
        fd = ours.detach()
        ctx.add_connection(fd)
        with theirs:
            ctx.write(fd, b"over tcp")
            assert theirs.recv(100) == frame(b"over tcp")
            theirs.sendall(frame(b"back"))
            assert ctx.read(fd, timeout=5) == b"back"
            theirs.close()
            assert wait_for(ctx, EventType.DISCONNECTION)[-1].fd == fd


def test_the_peer_leaving_is_a_disconnection(ctx_factory):
    ctx = ctx_factory()
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    ctx.add_connection(fd)
    theirs.close()
    assert wait_for(ctx, EventType.DISCONNECTION)[-1].fd == fd


def _not_connected() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)


@pytest.mark.parametrize("make", [
    lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
    _not_connected,
    lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
], ids=["datagram", "not-connected", "tcp"])
def test_a_socket_that_is_not_a_connected_stream_is_refused(ctx_factory, make):
    ctx = ctx_factory()
    with make() as sock:
        raises(pyipc.IPCError, f"fd {sock.fileno()} is not a connected Unix or TCP stream socket",
               ctx.add_connection, sock.fileno())
        sock.getsockname()                      # still open: refused, not taken


def test_a_pipe_is_refused(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    try:
        raises(pyipc.IPCError, f"fd {r} is not a connected Unix or TCP stream socket",
               ctx.add_connection, r)
    finally:
        os.close(r)
        os.close(w)


def test_a_closed_or_managed_fd_is_refused(ctx_factory):
    ctx = ctx_factory()
    ours, theirs = socket.socketpair()
    fd = ours.detach()
    ctx.add_connection(fd)
    raises(pyipc.IPCError, f"fd {fd} is already managed by this context",
           ctx.add_connection, fd)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    raises(pyipc.UnknownFdError, f"fd {r} is not an open file descriptor",
           ctx.add_connection, r)
    theirs.close()


def test_max_connections_counts_what_is_added(ctx_factory):
    ctx = ctx_factory(max_connections=1)
    pairs = [socket.socketpair(), socket.socketpair()]
    first = pairs[0][0].detach()
    ctx.add_connection(first)                  # at the edge: accepted
    second = pairs[1][0]
    with pytest.raises(pyipc.IPCError) as info:
        ctx.add_connection(second.fileno())     # past it: refused, left open
    assert str(info.value) == "too many connections (max_connections 1)"
    second.getsockname()
    for _, theirs in pairs:
        theirs.close()
    second.close()


def test_an_fd_the_poller_refuses_is_not_kept(ctx_factory, tmp_path):
    """epoll refuses a regular file: add_external() says why (errno set), and
    the fd is not managed (pure kept it: a later close_all() closed the
    caller's file)."""
    ctx = ctx_factory()
    with open(tmp_path / "plain", "wb") as f:
        with pytest.raises(pyipc.IPCError) as info:
            ctx.add_external(f.fileno())
        assert type(info.value) is pyipc.IPCError
        assert str(info.value) == (f"cannot watch fd {f.fileno()}: "
                                   f"{os.strerror(errno.EPERM)}")
        assert info.value.errno == errno.EPERM
        with pytest.raises(pyipc.UnknownFdError):
            ctx.close(f.fileno())
        ctx.close_all()
        os.fstat(f.fileno())                    # still the caller's, still open


@pytest.mark.parametrize("how", ["close", "close_all"])
def test_an_fd_its_owner_closed_behind_the_context_is_closed_quietly(ctx_factory, rundir,
                                                                     how):
    """An external fd closed by its owner (a misuse, EBADF underneath):
    close() returns, and close_all() goes on to close what comes after it
    (pure raised OSError half way, leaving a later service listening)."""
    ctx = ctx_factory()
    r, w = os.pipe()
    ctx.add_external(r)
    ctx.service_init("later")
    os.close(r)
    if how == "close":
        assert ctx.close(r) is None
    ctx.close_all()
    os.close(w)
    assert not os.path.exists(os.path.join(rundir, "later"))
    again = ctx_factory()
    again.service_init("later")                 # not busy: the first one let go


def test_a_client_the_poller_refuses_is_an_error_of_the_service(rundir, monkeypatch):
    """epoll refuses to watch a new client (fs.epoll.max_user_watches, which
    a test cannot lower for one process: the pure backend's poller is made to
    refuse instead): that client is closed and the service gets ERROR, the
    wait goes on (pure raised out of the wait, native failed it as out of
    memory). White-box: pure only."""
    ctx = pyipc.Context(rundir=rundir, backend="pure")
    try:
        svc = ctx.service_init("svc")
        poller_class = type(ctx._poller)
        real = poller_class.register

        def refuse_once(self, fd, mask, data):
            monkeypatch.setattr(poller_class, "register", real)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(poller_class, "register", refuse_once)
        refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        refused.connect(os.path.join(rundir, "svc"))
        events = ctx.wait_events(timeout=10)
        assert [(e.type, e.fd) for e in events] == [(EventType.ERROR, svc)]
        assert events[0].error.startswith("cannot watch fd ")
        assert events[0].error.endswith(": " + os.strerror(errno.ENOSPC))
        assert refused.recv(1) == b""                  # closed
        later = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        later.connect(os.path.join(rundir, "svc"))
        assert wait_for(ctx, EventType.CONNECTION)      # the service goes on
        refused.close()
        later.close()
    finally:
        ctx.close_all()
