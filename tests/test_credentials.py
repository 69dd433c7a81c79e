"""peer_credentials: (pid, uid, gid) of the process at the other end."""

from __future__ import annotations

import os
import subprocess

import pytest

import pyipc
from pyipc import EventType

from conftest import wait_for


def test_credentials_in_one_process(pair):
    me = (os.getpid(), os.getuid(), os.getgid())
    assert pair.server.peer_credentials(pair.server_fd) == me
    assert pair.client.peer_credentials(pair.client_fd) == me
    creds = pair.server.peer_credentials(pair.server_fd)
    assert all(type(x) is int for x in creds)


def test_credentials_of_a_client_process(ctx_factory, rundir, processes, backend):
    server = ctx_factory()
    server.service_init("cred")
    code = ("import os, sys, pyipc\n"
            "with pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2]) as c:\n"
            "    fd = c.connect_service('cred')\n"
            "    c.write(fd, b'%d' % os.getpid())\n"
            "    pid, uid, gid = c.peer_credentials(fd)\n"
            "    print(pid, uid, gid, flush=True)\n"
            "    c.read(fd)\n")
    proc = processes(code, rundir, backend, stdout=subprocess.PIPE, text=True)
    ev = wait_for(server, EventType.MESSAGE_RX)[-1]
    assert server.peer_credentials(ev.fd) == (proc.pid, os.getuid(), os.getgid())
    assert int(ev.message) == proc.pid
    server.write(ev.fd, b"done")
    out, _ = proc.communicate(timeout=30)
    assert out.split() == [str(os.getpid()), str(os.getuid()), str(os.getgid())]
    assert proc.returncode == 0


def test_credentials_of_a_switched_external_socket(ctx_factory):
    import socket
    ctx = ctx_factory()
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        fd = a.detach()
        ctx.add_external(fd)
        ctx.add_external(r)
        with pytest.raises(pyipc.UnknownFdError):
            ctx.peer_credentials(fd)        # not a connection until switched
        ctx.add_switch(fd, r)
        assert ctx.peer_credentials(fd) == (os.getpid(), os.getuid(), os.getgid())
        with pytest.raises(pyipc.IPCError) as info:
            ctx.peer_credentials(r)         # a pipe has no peer credentials
        assert str(info.value).startswith(f"cannot read peer credentials of fd {r}: ")
    finally:
        b.close()
        os.close(w)


def test_a_tcp_connection_has_no_credentials(ctx_factory):
    """A TCP socket has no peer credentials (Linux answers with "nobody",
    (0, 2**32-1, 2**32-1), which is no answer): IPCError on both backends."""
    import socket
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
    ctx = ctx_factory()
    fd = client.detach()
    ctx.add_connection(fd)
    try:
        with pytest.raises(pyipc.IPCError) as info:
            ctx.peer_credentials(fd)
    finally:
        accepted.close()
    assert type(info.value) is pyipc.IPCError
    assert str(info.value) == f"cannot read peer credentials of fd {fd}: not a Unix socket"
