"""Every error class with the exact message of the README's table, the same on
both backends."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys

import pytest

import pyipc
from pyipc import EventType

from conftest import CHILD_ENV, collect, raises, raw_connect, settle, wait_for



# -- InvalidNameError ----------------------------------------------------------

@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("a/b", "contains '/'"),
    ("/abs", "contains '/'"),
    ("..", "'.' and '..' are not names"),
    ("nul\0x", "contains NUL"),
])
def test_invalid_names(ctx_factory, tmp_path, name, reason):
    missing = str(tmp_path / "never")
    ctx = ctx_factory(rundir=missing)
    for call in (ctx.service_init, ctx.connect_service, ctx.connect):
        raises(pyipc.InvalidNameError, f"invalid service name: {reason}", call, name)
    assert not os.path.exists(missing)      # checked before anything is touched


def test_name_too_long_for_sun_path(ctx_factory, tmp_path):
    missing = str(tmp_path / "never")
    ctx = ctx_factory(rundir=missing)
    name = "n" * (108 - len(missing) - 1)     # path of 108 bytes
    for call in (ctx.service_init, ctx.connect_service):
        raises(pyipc.InvalidNameError,
               "invalid service name: socket path is longer than 107 bytes", call, name)
    raises(pyipc.InvalidNameError,
           "invalid service name: socket path is longer than 107 bytes",
           ctx.service_init, "x" * 70000)
    assert not os.path.exists(missing)


def test_name_length_counts_utf8_bytes(ctx_factory, rundir):
    ctx = ctx_factory()
    room = 107 - len(rundir) - 1
    name = "\u00e9" * (room // 2) + "x" * (room % 2)      # exactly 107 bytes
    ctx.service_init(name)
    raises(pyipc.InvalidNameError,
           "invalid service name: socket path is longer than 107 bytes",
           ctx.service_init, name + "x")


# -- RunDirError ------------------------------------------------------------------

def test_rundir_symlink(ctx_factory, rundir):
    target = os.path.join(rundir, "real")
    os.mkdir(target, 0o700)
    link = os.path.join(rundir, "link")
    os.symlink(target, link)
    ctx = ctx_factory(rundir=link)
    raises(pyipc.RunDirError, f"run directory {link} is a symlink", ctx.service_init, "s")
    raises(pyipc.RunDirError, f"run directory {link} is a symlink", ctx.connect_service, "s")
    assert os.listdir(target) == []


def test_rundir_not_a_directory(ctx_factory, rundir):
    path = os.path.join(rundir, "file")
    open(path, "w").close()
    ctx = ctx_factory(rundir=path)
    raises(pyipc.RunDirError, f"run directory {path} is not a directory", ctx.service_init, "s")
    raises(pyipc.RunDirError, f"run directory {path} is not a directory",
           ctx.connect_service, "s")


def test_rundir_writable_by_others(ctx_factory, rundir):
    path = os.path.join(rundir, "open")
    os.mkdir(path)
    os.chmod(path, 0o777)
    ctx = ctx_factory(rundir=path)
    raises(pyipc.RunDirError, f"run directory {path} is writable by others",
           ctx.service_init, "s")
    raises(pyipc.RunDirError, f"run directory {path} is writable by others",
           ctx.connect_service, "s")
    os.chmod(path, 0o1777)      # sticky does not make it safe either
    raises(pyipc.RunDirError, f"run directory {path} is writable by others",
           ctx.service_init, "s")
    assert os.listdir(path) == []


def test_rundir_cannot_be_created(ctx_factory, rundir):
    blocker = os.path.join(rundir, "file")
    open(blocker, "w").close()
    path = os.path.join(blocker, "run")
    ctx = ctx_factory(rundir=path)
    raises(pyipc.RunDirError, f"cannot create run directory {path}: Not a directory",
           ctx.service_init, "s")


def test_connect_without_rundir_is_service_not_found(ctx_factory, rundir):
    path = os.path.join(rundir, "absent")
    ctx = ctx_factory(rundir=path)
    raises(pyipc.ServiceNotFoundError, f"no service s in {path}", ctx.connect_service, "s")
    assert not os.path.exists(path)      # connect never creates the run dir


# -- ServiceBusyError ---------------------------------------------------------------

def test_service_busy_in_the_same_process(ctx_factory, rundir):
    first, second = ctx_factory(), ctx_factory()
    first.service_init("busy")
    text = f"service busy is already running in {rundir}"
    raises(pyipc.ServiceBusyError, text, second.service_init, "busy")
    raises(pyipc.ServiceBusyError, text, first.service_init, "busy")
    # The running service is untouched: clients still reach it.
    client = ctx_factory()
    cfd = client.connect_service("busy")
    client.write(cfd, b"still here")
    assert wait_for(first, EventType.MESSAGE_RX)[-1].message == b"still here"


def test_service_busy_in_another_process(ctx_factory, rundir, processes, backend):
    code = ("import sys, pyipc\n"
            "ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])\n"
            "ctx.service_init('other')\n"
            "print('ready', flush=True)\n"
            "for ev in ctx:\n"
            "    if ev.type == pyipc.EventType.MESSAGE_RX:\n"
            "        ctx.write(ev.fd, ev.message)\n")
    import subprocess
    proc = processes(code, rundir, backend, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    ctx = ctx_factory()
    raises(pyipc.ServiceBusyError, f"service other is already running in {rundir}",
           ctx.service_init, "other")
    fd = ctx.connect_service("other")
    ctx.write(fd, b"echo")
    assert ctx.read(fd) == b"echo"


# -- ServiceNotFoundError ---------------------------------------------------------------

def test_service_not_found(ctx_factory, rundir):
    ctx = ctx_factory()
    raises(pyipc.ServiceNotFoundError, f"no service nobody in {rundir}",
           ctx.connect_service, "nobody")


def test_stale_socket_is_service_not_found(ctx_factory, rundir):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(os.path.join(rundir, "stale"))
    sock.close()                # the file stays, nobody listens
    ctx = ctx_factory()
    raises(pyipc.ServiceNotFoundError, f"no service stale in {rundir}",
           ctx.connect_service, "stale")


def test_ipc_network_without_ipcd(ctx_factory, rundir, monkeypatch):
    monkeypatch.setenv("IPC_NETWORK", "pong tcp://example:1234")
    ctx = ctx_factory()
    raises(pyipc.ServiceNotFoundError,
           f"IPC_NETWORK is set but ipcd is not running (no service ipc in {rundir})",
           ctx.connect, "pong")
    monkeypatch.setenv("IPC_NETWORK", "")
    raises(pyipc.ServiceNotFoundError, f"no service pong in {rundir}", ctx.connect, "pong")


def test_ipcd_that_refuses(ctx_factory, rundir, monkeypatch):
    """An ipcd that answers something other than "ok" with a fd: IPCError."""
    import threading
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "ipc"))
    listener.listen(1)
    seen = []

    def ipcd():
        conn, _ = listener.accept()
        with conn:
            header = conn.recv(4, socket.MSG_WAITALL)
            (n,) = struct.unpack(">I", header)
            seen.append(conn.recv(n, socket.MSG_WAITALL))
            conn.sendall(b"no")

    t = threading.Thread(target=ipcd)
    t.start()
    try:
        monkeypatch.setenv("IPC_NETWORK", "pong local:pong")
        ctx = ctx_factory()
        raises(pyipc.IPCError, "ipcd could not connect to service pong", ctx.connect, "pong")
    finally:
        t.join(10)
        listener.close()
    assert seen == [b"pong;pong local:pong"]


def test_ipcd_that_passes_a_fd(ctx_factory, rundir, monkeypatch):
    """connect() through ipcd: the fd received with "ok" is the connection."""
    import threading
    server = ctx_factory()
    server.service_init("pong")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(rundir, "ipc"))
    listener.listen(1)

    def ipcd():
        conn, _ = listener.accept()
        with conn:
            (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            name = conn.recv(n, socket.MSG_WAITALL).split(b";")[0].decode()
            target = raw_connect(rundir, name)
            socket.send_fds(conn, [b"ok"], [target.fileno()])
            target.close()

    t = threading.Thread(target=ipcd)
    t.start()
    try:
        monkeypatch.setenv("IPC_NETWORK", "pong local:pong")
        client = ctx_factory()
        fd = client.connect("pong")
    finally:
        t.join(10)
        listener.close()
    client.write(fd, b"through ipcd")
    events = wait_for(server, EventType.MESSAGE_RX)
    assert events[-1].message == b"through ipcd"
    server.write(events[-1].fd, b"back")
    assert client.read(fd) == b"back"


# -- MessageTooLargeError ----------------------------------------------------------

def test_message_too_large_on_send(ctx_factory):
    server, client = ctx_factory(), ctx_factory(max_message_size=100)
    server.service_init("big")
    fd = client.connect_service("big")
    text = "message of 101 bytes exceeds max_message_size (100)"
    raises(pyipc.MessageTooLargeError, text, client.write, fd, b"x" * 101)
    raises(pyipc.MessageTooLargeError, text, client.schedule, fd, b"x" * 101)
    raises(pyipc.MessageTooLargeError, text, client.write, fd, "x" * 101)
    client.write(fd, b"x" * 100)
    conn = wait_for(server, EventType.CONNECTION)[-1]
    assert server.read(conn.fd) == b"x" * 100


def test_message_too_large_on_read(ctx_factory, rundir):
    server = ctx_factory(max_message_size=100)
    server.service_init("big")
    raw = raw_connect(rundir, "big")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        raw.sendall(struct.pack(">I", 101))
        raises(pyipc.MessageTooLargeError,
               "message of 101 bytes exceeds max_message_size (100)", server.read, conn.fd)
        ev = wait_for(server, EventType.DISCONNECTION)
        assert [(e.type, e.fd) for e in ev] == [(EventType.DISCONNECTION, conn.fd)]
        assert raw.recv(1) == b""
    finally:
        raw.close()


# -- QueueFullError -----------------------------------------------------------------

def test_queue_full(ctx_factory):
    server = ctx_factory()
    client = ctx_factory(max_message_size=10, max_queue_size=30)
    server.service_init("q")
    fd = client.connect_service("q")
    client.schedule(fd, b"x" * 10)       # 14 bytes queued
    client.schedule(fd, b"y" * 10)       # 28
    text = f"send queue of fd {fd} is full (28 bytes queued, max_queue_size 30)"
    raises(pyipc.QueueFullError, text, client.schedule, fd, b"z")     # 33 > 30
    raises(pyipc.QueueFullError, text, client.schedule, fd, b"")      # 32 > 30
    conn = wait_for(server, EventType.CONNECTION)[-1]
    tx = collect(client, lambda e: len(e) >= 2)
    assert [e.type for e in tx] == [EventType.MESSAGE_TX] * 2
    assert server.read(conn.fd) == b"x" * 10
    assert server.read(conn.fd) == b"y" * 10


# -- ConnectionClosedError ------------------------------------------------------------

def test_connection_closed_on_read(pair):
    pair.client.close(pair.client_fd)
    raises(pyipc.ConnectionClosedError,
           f"connection on fd {pair.server_fd} is closed by the peer",
           pair.server.read, pair.server_fd)
    ev = wait_for(pair.server, EventType.DISCONNECTION)
    assert [(e.type, e.fd, e.error) for e in ev] == \
        [(EventType.DISCONNECTION, pair.server_fd, None)]
    assert settle(pair.server) == []
    raises(pyipc.UnknownFdError, f"fd {pair.server_fd} is not managed by this context",
           pair.server.read, pair.server_fd)


def test_connection_closed_on_write(pair):
    pair.server.close(pair.server_fd)
    text = f"connection on fd {pair.client_fd} is closed by the peer"
    payload = b"x" * 300_000       # more than a socket buffer: the write must fail
    raises(pyipc.ConnectionClosedError, text, pair.client.write, pair.client_fd, payload)
    # The connection stays until the event loop reports it; then it is gone.
    raises(pyipc.ConnectionClosedError, text, pair.client.write, pair.client_fd, b"x")
    raises(pyipc.ConnectionClosedError, text, pair.client.schedule, pair.client_fd, b"x")
    ev = wait_for(pair.client, EventType.DISCONNECTION)[-1]
    assert ev.fd == pair.client_fd
    assert settle(pair.client) == []
    raises(pyipc.UnknownFdError, f"fd {pair.client_fd} is not managed by this context",
           pair.client.write, pair.client_fd, b"x")


def test_read_after_pending_disconnection(pair):
    pair.client.write(pair.client_fd, b"last")
    pair.client.close(pair.client_fd)
    events = wait_for(pair.server, EventType.DISCONNECTION)
    assert [e.type for e in events] == [EventType.MESSAGE_RX, EventType.DISCONNECTION]
    assert settle(pair.server) == []
    raises(pyipc.UnknownFdError, f"fd {pair.server_fd} is not managed by this context",
           pair.server.read, pair.server_fd)


def test_read_with_disconnection_still_pending(pair):
    """A DISCONNECTION waiting in the queue: read() gives the message before it,
    then ConnectionClosedError."""
    pair.client.write(pair.client_fd, b"last")
    pair.client.close(pair.client_fd)
    first = wait_for(pair.server, EventType.MESSAGE_RX)
    assert first[-1].message == b"last"
    pair.client_fd = None
    # The DISCONNECTION came in the same round and is pending now.
    raises(pyipc.ConnectionClosedError,
           f"connection on fd {pair.server_fd} is closed by the peer",
           pair.server.read, pair.server_fd)
    assert pair.server.wait_event().type == EventType.DISCONNECTION


# -- UnknownFdError ---------------------------------------------------------------------

def test_unknown_fd(pair):
    ctx = pair.client
    text = "fd 9999 is not managed by this context"
    for call, args in ((ctx.write, (9999, b"x")), (ctx.schedule, (9999, b"x")),
                       (ctx.read, (9999,)), (ctx.close, (9999,)),
                       (ctx.peer_credentials, (9999,)), (ctx.add_switch, (9999, pair.client_fd)),
                       (ctx.set_switch_callbacks, (9999, None, None))):
        raises(pyipc.UnknownFdError, text, call, *args)


def test_fd_of_the_wrong_kind(pair):
    ctx, sfd = pair.server, pair.service_fd
    text = f"fd {sfd} is not a connection"
    for call, args in ((ctx.write, (sfd, b"x")), (ctx.schedule, (sfd, b"x")),
                       (ctx.read, (sfd,)), (ctx.peer_credentials, (sfd,)),
                       (ctx.add_switch, (sfd, pair.server_fd)),
                       (ctx.set_switch_callbacks, (sfd, None, None))):
        raises(pyipc.UnknownFdError, text, call, *args)
    r, w = os.pipe()
    try:
        ctx.add_external(r)
        text = f"fd {r} is not a connection"
        for call, args in ((ctx.write, (r, b"x")), (ctx.schedule, (r, b"x")),
                           (ctx.read, (r,)), (ctx.peer_credentials, (r,))):
            raises(pyipc.UnknownFdError, text, call, *args)
    finally:
        os.close(w)


def test_add_external_of_a_closed_fd(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    raises(pyipc.UnknownFdError, f"fd {r} is not an open file descriptor", ctx.add_external, r)
    raises(pyipc.UnknownFdError, "fd -1 is not an open file descriptor", ctx.add_external, -1)


# -- ConnectionLimitError -----------------------------------------------------------

def test_connection_limit(ctx_factory, rundir):
    server = ctx_factory()
    server.service_init("lim")
    ctx = ctx_factory(max_connections=2)
    text = "too many connections (max_connections 2)"
    ctx.connect_service("lim")
    ctx.service_init("mine")
    raises(pyipc.ConnectionLimitError, text, ctx.connect_service, "lim")
    raises(pyipc.ConnectionLimitError, text, ctx.service_init, "mine2")
    assert not os.path.exists(os.path.join(rundir, "mine2"))
    r, w = os.pipe()
    try:
        raises(pyipc.ConnectionLimitError, text, ctx.add_external, r)
    finally:
        os.close(r)
        os.close(w)


# -- IPCError misuse ---------------------------------------------------------------------

#: Run in a fresh process, so that no other test's fds come and go meanwhile:
#: the fds a context opens are the ones that appear around its making.
OWN_FDS_SCRIPT = r"""
import os, sys
import pyipc
from pyipc import EventType

def open_fds():
    listed = os.listdir("/proc/self/fd")      # (listdir's own fd is closed after)
    return {int(fd) for fd in listed if os.path.exists(f"/proc/self/fd/{fd}")}

backend, rundir = sys.argv[1], sys.argv[2]
before = open_fds()
with pyipc.Context(rundir=rundir, backend=backend) as ctx:
    service = ctx.service_init("own")              # opens the spare fd (and a lock)
    ctx.fileno()                                   # the outer poller, a pipe, a timer
    own = {fd for fd in open_fds() - before - {service}
           if not os.readlink(f"/proc/self/fd/{fd}").endswith("own.lock")}
    assert len(own) == 8, own
    for fd in own:
        text = f"fd {fd} is the context's own (its poller, wake-up pipe or spare fd)"
        for call in (ctx.add_external, ctx.add_connection):
            try:
                call(fd)
                sys.exit(f"{call.__name__}({fd}) was accepted")
            except pyipc.IPCError as e:
                assert str(e) == text, (str(e), text)
    pyipc.Context(rundir=rundir, backend=backend).connect("own")
    assert ctx.wait_event(timeout=10).type == EventType.CONNECTION   # still serving
print("ok")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
def test_the_contexts_own_fds_are_refused_as_connections(backend, tmp_path):
    """The poller, the wake-up pipe, the spare fd and fileno()'s fds: taken
    as an external fd, one was closed twice (a close of it, then the
    context's) and the write end of the wake-up pipe was accepted."""
    out = subprocess.run([sys.executable, "-c", OWN_FDS_SCRIPT, backend, str(tmp_path)],
                         env=CHILD_ENV, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "ok\n"), out.stderr


def test_misuse_texts(pair):
    ctx = pair.server
    r, w = os.pipe()
    try:
        ctx.add_external(r)
        raises(pyipc.IPCError, f"fd {r} is already managed by this context", ctx.add_external, r)
        raises(pyipc.IPCError, f"fd {pair.server_fd} is already managed by this context",
               ctx.add_external, pair.server_fd)
        raises(pyipc.IPCError, f"cannot switch fd {r} with itself", ctx.add_switch, r, r)
        ctx.add_switch(r, pair.server_fd)
        raises(pyipc.IPCError, f"fd {r} is already switched", ctx.add_switch, r, pair.server_fd)
        r2, w2 = os.pipe()
        os.close(w2)
        ctx.add_external(r2)
        raises(pyipc.IPCError, f"fd {pair.server_fd} is already switched",
               ctx.add_switch, r2, pair.server_fd)
    finally:
        os.close(w)


def test_nothing_to_wait_for(ctx_factory):
    ctx = ctx_factory()
    raises(pyipc.IPCError, "nothing to wait for: no fd and no timer", ctx.wait_event)
    ctx.timer = 0
    assert ctx.wait_event().type == EventType.TIMER


def test_errors_carry_no_partial_effect(pair):
    """A failed schedule leaves the queue as it was: later messages still go in order."""
    pair.client.schedule(pair.client_fd, b"1")
    with pytest.raises(TypeError):
        pair.client.schedule(pair.client_fd, 5)
    pair.client.schedule(pair.client_fd, b"2")
    pair.client.write(pair.client_fd, b"3")
    assert [pair.server.read(pair.server_fd) for _ in range(3)] == [b"1", b"2", b"3"]


def test_rundir_under_a_file_on_connect(ctx_factory, rundir):
    blocker = os.path.join(rundir, "file")
    open(blocker, "w").close()
    path = os.path.join(blocker, "run")
    ctx = ctx_factory(rundir=path)
    raises(pyipc.RunDirError, f"cannot create run directory {path}: Not a directory",
           ctx.connect_service, "s")


def test_read_meets_a_bad_header_after_good_messages(ctx_factory, rundir):
    """read() returns the messages before the bad header, then raises
    MessageTooLargeError; the event loop reports ERROR and DISCONNECTION."""
    server = ctx_factory(max_message_size=100)
    server.service_init("bad")
    raw = raw_connect(rundir, "bad")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        raw.sendall(b"\0\0\0\x01a" + b"\0\0\0\x01b" + struct.pack(">I", 500))
        assert server.read(conn.fd) == b"a"
        assert server.read(conn.fd) == b"b"
        raises(pyipc.MessageTooLargeError,
               "message of 500 bytes exceeds max_message_size (100)", server.read, conn.fd)
        events = settle(server)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, conn.fd, "message of 500 bytes exceeds max_message_size (100)"),
            (EventType.DISCONNECTION, conn.fd, None)]
    finally:
        raw.close()
