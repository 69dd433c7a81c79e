"""Peers that die, vanish mid-message or go away with data queued; I/O errors;
close() discarding scheduled messages."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, frame, quiet, raw_connect, settle, spin_until, unread_bytes, wait_for

# A child that connects with a raw socket, sends what the parent says, then
# stops itself (SIGSTOP) so the parent can SIGKILL it at a known point.
_RAW_CHILD = r"""
import os, signal, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2]))
os.kill(os.getpid(), signal.SIGSTOP)
"""


def _kill_after_sending(processes, path: str, data: bytes) -> subprocess.Popen:
    proc = processes(_RAW_CHILD, path, data.hex())
    # Wait until it stopped itself (everything is sent), then kill it.
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def test_peer_killed_in_the_middle_of_a_message(ctx_factory, rundir, processes):
    server = ctx_factory()
    server.service_init("mid")
    data = frame(b"complete") + struct.pack(">I", 1000) + b"only part"
    _kill_after_sending(processes, os.path.join(rundir, "mid"), data)
    events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    conn = events[0].fd
    assert [(e.type, e.fd, e.message, e.error) for e in events] == [
        (EventType.CONNECTION, conn, None, None),
        (EventType.MESSAGE_RX, conn, b"complete", None),
        (EventType.ERROR, conn, None, "peer closed the connection in the middle of a message"),
        (EventType.DISCONNECTION, conn, None, None)]


def test_peer_killed_in_the_middle_of_a_header(ctx_factory, rundir, processes):
    server = ctx_factory()
    server.service_init("hdr")
    _kill_after_sending(processes, os.path.join(rundir, "hdr"), frame(b"") + b"\0\0")
    events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [(e.type, e.message, e.error) for e in events] == [
        (EventType.CONNECTION, None, None),
        (EventType.MESSAGE_RX, b"", None),
        (EventType.ERROR, None, "peer closed the connection in the middle of a message"),
        (EventType.DISCONNECTION, None, None)]


def test_peer_killed_between_messages_is_a_plain_disconnection(ctx_factory, rundir, processes):
    server = ctx_factory()
    server.service_init("clean")
    _kill_after_sending(processes, os.path.join(rundir, "clean"), frame(b"a") + frame(b"b"))
    events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [(e.type, e.message) for e in events] == [
        (EventType.CONNECTION, None), (EventType.MESSAGE_RX, b"a"),
        (EventType.MESSAGE_RX, b"b"), (EventType.DISCONNECTION, None)]


_PYIPC_CHILD = r"""
import os, signal, sys, pyipc
ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])
fd = ctx.connect_service("both")
for i in range(int(sys.argv[3])):
    ctx.write(fd, b"child %d" % i)
print("sent", flush=True)
sys.stdin.readline()
"""


def test_peer_killed_with_data_queued_both_ways(ctx_factory, rundir, processes, backend):
    """The peer's messages are all delivered; the messages queued for it are
    reported as unsent; nothing raises in the service."""
    server = ctx_factory(max_message_size=1 << 20)
    server.service_init("both")
    proc = processes(_PYIPC_CHILD, rundir, backend, "50",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "sent\n"
    conn = wait_for(server, EventType.CONNECTION)[-1].fd
    # Queue more than the socket can take while the child does not read.
    big = b"q" * (1 << 20)
    for _ in range(8):
        server.schedule(conn, big)
    server.timer = 0
    events = server.wait_events()        # part of it goes out, the rest stays queued
    proc.kill()
    proc.wait()
    events += collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    rx = [e.message for e in events if e.type == EventType.MESSAGE_RX]
    assert rx == [b"child %d" % i for i in range(50)]
    errors = [e.error for e in events if e.type == EventType.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("peer closed the connection with ")
    assert errors[0].endswith(" scheduled message(s) unsent")
    unsent = int(errors[0].split()[5])
    sent = sum(e.type == EventType.MESSAGE_TX for e in events)
    assert 1 <= unsent <= 8 and sent + unsent == 8
    assert events[-1] == pyipc.Event(EventType.DISCONNECTION, conn, events[-1].index)


@pytest.mark.parametrize("how", ["write", "schedule"])
def test_write_to_a_gone_peer_raises_instead_of_sigpipe(ctx_factory, rundir, processes,
                                                         backend, how):
    """A child writes to a peer that is gone: ConnectionClosedError (write) or
    ERROR + DISCONNECTION (schedule), and the process lives (SIGPIPE has its
    default action in the child)."""
    server = ctx_factory()
    server.service_init("pipe")
    code = r"""
import signal, sys, pyipc
signal.signal(signal.SIGPIPE, signal.SIG_DFL)       # a write without MSG_NOSIGNAL would kill us
ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])
fd = ctx.connect_service("pipe")
print("connected", flush=True)
sys.stdin.readline()
if sys.argv[3] == "schedule":
    for _ in range(10):
        ctx.schedule(fd, b"x" * 100000)
    ctx.timer = 5000
    events = []
    while not events or events[-1].type != pyipc.EventType.DISCONNECTION:
        events += ctx.wait_events()
    print("closed:", [e.type.name for e in events if e.type.name != "MESSAGE_TX"])
    sys.exit(0)
try:
    for _ in range(100):
        ctx.write(fd, b"x" * 100000)
    print("no error")
except pyipc.ConnectionClosedError as e:
    print("closed:", e)
"""
    proc = processes(code, rundir, backend, how, stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "connected\n"
    conn = wait_for(server, EventType.CONNECTION)[-1].fd
    server.close(conn)
    out, _ = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0, f"child died with {proc.returncode}"
    if how == "write":
        assert out.startswith("closed: connection on fd ")
        assert out.endswith(" is closed by the peer\n")
    else:
        assert out == "closed: ['ERROR', 'DISCONNECTION']\n"


def test_schedule_to_a_gone_peer_in_this_process(pair):
    pair.server.close(pair.server_fd)
    pair.client.schedule(pair.client_fd, b"x" * 1000)
    events = collect(pair.client, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [(e.type, e.error) for e in events] == [
        (EventType.ERROR, "peer closed the connection with 1 scheduled message(s) unsent"),
        (EventType.DISCONNECTION, None)]


def test_a_write_to_a_gone_peer_first_delivers_all_it_sent(ctx_factory, rundir):
    """A peer sends more than one round reads (READ_BUDGET, 256 KiB), then
    closes; the service's next scheduled write fails (EPIPE). Every whole
    message the peer sent is delivered before the end (one budget's worth
    was, the rest dropped with no word)."""
    server = ctx_factory()
    server.service_init("svc")
    peer = raw_connect(rundir, "svc")
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    one = frame(b"m" * 1000)
    whole, sent = 0, 0
    peer.setblocking(False)
    while True:                     # as much as the socket holds, unread
        try:
            n = peer.send(one)
        except BlockingIOError:
            break
        sent += n
        if n < len(one):
            break                   # a cut frame: the service says so at the end
        whole += 1
    assert sent > 256 * 1024, sent  # more than one round's budget
    peer.close()
    server.schedule(fd, b"x")
    events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    got = [e for e in events if e.type == EventType.MESSAGE_RX]
    assert len(got) == whole and all(e.message == b"m" * 1000 for e in got)
    assert [e.type for e in events[len(got):]] == [EventType.ERROR, EventType.DISCONNECTION]


def test_last_messages_before_close_are_delivered(ctx_factory, rundir, processes, backend):
    """A peer writes, then exits at once: every message it wrote arrives."""
    server = ctx_factory()
    server.service_init("last")
    code = ("import sys, pyipc\n"
            "c = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])\n"
            "fd = c.connect_service('last')\n"
            "for i in range(200):\n    c.write(fd, b'%d' % i * 50)\n"
            "c.close_all()\n")
    proc = processes(code, rundir, backend)
    assert proc.wait(timeout=30) == 0
    events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [e.message for e in events if e.type == EventType.MESSAGE_RX] == \
        [b"%d" % i * 50 for i in range(200)]
    assert not any(e.type == EventType.ERROR for e in events)


def test_epipe_while_flushing_reads_the_peers_last_words(pair):
    """Our scheduled messages hit a closed peer: what it sent first is still read."""
    os.write(pair.client_fd, frame(b"goodbye"))
    pair.client.close(pair.client_fd)
    pair.server.schedule(pair.server_fd, b"too late" * 50_000)
    events = collect(pair.server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [(e.type, e.message) for e in events if e.type != EventType.ERROR] == [
        (EventType.MESSAGE_RX, b"goodbye"), (EventType.DISCONNECTION, None)]


class SwitchedPipe:
    """A socket (``fd``) switched with one end of a pipe (``end``); ``other`` is the
    pipe's other end, which the test may close (close_other) to make a fault."""

    def __init__(self, ctx: pyipc.Context, end: str) -> None:
        self._peer, sock = socket.socketpair()
        r, w = os.pipe()
        self.end, self.other = (r, w) if end == "read" else (w, r)
        self.fd = sock.detach()
        ctx.add_external(self.fd)
        ctx.add_external(self.end)
        ctx.add_switch(self.fd, self.end)

    def close_other(self) -> None:
        os.close(self.other)
        self.other = -1


@contextlib.contextmanager
def switched_pipe(ctx: pyipc.Context, end: str):
    """A SwitchedPipe whose peer socket and other pipe end are closed afterwards
    (ctx owns and closes fd and end)."""
    sp = SwitchedPipe(ctx, end)
    try:
        yield sp
    finally:
        sp._peer.close()
        if sp.other >= 0:
            os.close(sp.other)


def test_read_error_ends_the_connection(ctx_factory):
    """read() on a switched fd that cannot be read (a pipe's write end): the
    same IPCError text, ERROR and DISCONNECTION on both backends."""
    ctx = ctx_factory()
    with switched_pipe(ctx, "write") as sp:
        with pytest.raises(pyipc.IPCError) as info:
            ctx.read(sp.end)
        assert type(info.value) is pyipc.IPCError
        assert str(info.value) == "read failed: Bad file descriptor"
        events = settle(ctx)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, sp.end, "read failed: Bad file descriptor"),
            (EventType.DISCONNECTION, sp.end, None),
            (EventType.DISCONNECTION, sp.fd, None)]
        with pytest.raises(pyipc.UnknownFdError):
            ctx.read(sp.end)


def test_read_error_in_the_event_loop(ctx_factory):
    ctx = ctx_factory()
    with switched_pipe(ctx, "write") as sp:
        sp.close_other()             # the write end becomes "readable" (POLLERR)
        events = collect(ctx, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, sp.end, "read failed: Bad file descriptor"),
            (EventType.DISCONNECTION, sp.end, None),
            (EventType.DISCONNECTION, sp.fd, None)]


def test_close_with_scheduled_messages_logs_a_warning(pair, caplog):
    pair.client.linger = 0          # no time to send them (see test_linger.py)
    pair.client.schedule(pair.client_fd, b"1")
    pair.client.schedule(pair.client_fd, b"2")
    with caplog.at_level(logging.WARNING, logger="pyipc"):
        pair.client.close(pair.client_fd)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", f"closing fd {pair.client_fd} discards 2 scheduled message(s)")]
    # They are dropped: the service sees only the end.
    events = collect(pair.server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
    assert [e.type for e in events] == [EventType.DISCONNECTION]


def test_close_without_scheduled_messages_is_silent(pair, caplog):
    pair.client.schedule(pair.client_fd, b"1")
    wait_for(pair.client, EventType.MESSAGE_TX)
    with caplog.at_level(logging.WARNING, logger="pyipc"):
        pair.client.close(pair.client_fd)
    assert caplog.records == []


def test_close_of_a_switch_warns_for_both_sides(ctx_factory, caplog):
    server = ctx_factory()
    server.service_init("sw")
    a, b = ctx_factory(), ctx_factory()
    a.connect_service("sw")
    sa = wait_for(server, EventType.CONNECTION)[-1].fd
    b.connect_service("sw")
    sb = wait_for(server, EventType.CONNECTION)[-1].fd
    server.add_switch(sa, sb)
    server.linger = 0               # no time to send them (see test_linger.py)
    server.schedule(sb, b"x")
    server.schedule(sb, b"y")
    server.schedule(sa, b"z")
    with caplog.at_level(logging.WARNING, logger="pyipc"):
        server.close(sa)
    assert [r.getMessage() for r in caplog.records] == [
        f"closing fd {sa} discards 1 scheduled message(s)",
        f"closing fd {sb} discards 2 scheduled message(s)"]


def test_close_of_a_switch_drops_the_peers_pending_events(ctx_factory):
    """Events of both sides already fetched but not returned are dropped."""
    server = ctx_factory()
    server.service_init("sw")
    a, b = ctx_factory(), ctx_factory()
    afd = a.connect_service("sw")
    sa = wait_for(server, EventType.CONNECTION)[-1].fd
    bfd = b.connect_service("sw")
    sb = wait_for(server, EventType.CONNECTION)[-1].fd
    server.add_switch(sa, sb)
    os.write(afd, frame(b"1") + frame(b"2"))
    os.write(bfd, frame(b"3") + frame(b"4"))
    spin_until(lambda: not (unread_bytes(sa) < 10 or unread_bytes(sb) < 10))
    first = server.wait_event()           # the rest of the round stays pending
    assert first.type == EventType.SWITCH_RX
    server.close(sa)
    assert settle(server) == []


def test_service_survives_garbage_from_many_peers(ctx_factory, rundir):
    server = ctx_factory(max_message_size=10_000)
    server.service_init("tough")
    socks = []
    try:
        for i in range(20):
            s = raw_connect(rundir, "tough")
            socks.append(s)
            s.sendall([b"\xff\xff\xff\xff", frame(b"ok") + b"\0", b"\0\0\x10\0abc", b""][i % 4])
            s.close()
        events = collect(server, lambda e: sum(x.type == EventType.DISCONNECTION
                                               for x in e) >= 20, timeout=20)
        assert sum(e.type == EventType.CONNECTION for e in events) == 20
        assert sum(e.type == EventType.MESSAGE_RX for e in events) == 5
        errors = sorted(e.error for e in events if e.type == EventType.ERROR)
        assert errors == sorted(
            ["message of 4294967295 bytes exceeds max_message_size (10000)"] * 5
            + ["peer closed the connection in the middle of a message"] * 10)
        # And it still serves.
        client = ctx_factory()
        cfd = client.connect_service("tough")
        client.write(cfd, b"still alive")
        assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"still alive"
    finally:
        for s in socks:
            s.close()


def test_nothing_more_after_a_disconnection(pair):
    pair.client.close(pair.client_fd)
    wait_for(pair.server, EventType.DISCONNECTION)
    assert quiet(pair.server, 50) == []


def test_write_error_other_than_epipe(ctx_factory):
    """write() to a switched pipe's read end: IPCError 'write failed: STRERROR';
    the event loop's flush of the same: ERROR, then both sides close."""
    ctx = ctx_factory()
    with switched_pipe(ctx, "read") as sp:
        with pytest.raises(pyipc.IPCError) as info:
            ctx.write(sp.end, b"x")
        assert type(info.value) is pyipc.IPCError
        assert str(info.value) == "write failed: Bad file descriptor"
        ctx.schedule(sp.end, b"y")
        events = collect(ctx, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, sp.end, "write failed: Bad file descriptor"),
            (EventType.DISCONNECTION, sp.end, None),
            (EventType.DISCONNECTION, sp.fd, None)]


_EMFILE_SERVICE = r"""
import os, resource, socket, sys, pyipc
ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])
sfd = ctx.service_init("acc")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
os.close(hog.pop())                       # room for the client's socket only
client = socket.socket(socket.AF_UNIX)
client.connect(os.path.join(sys.argv[1], "acc"))
ctx.timer = 1000
ev = ctx.wait_events()
print([(e.type.name, e.fd == sfd, e.index, e.error) for e in ev], flush=True)
client.settimeout(10)
print("refused client reads", client.recv(1), flush=True)   # EOF: it was refused
client.close()
ctx.timer = 300
print([e.type.name for e in ctx.wait_events()], flush=True)  # no busy loop of ERRORs
for _ in range(3):
    os.close(hog.pop())                   # fds are free again: the service recovers
again = socket.socket(socket.AF_UNIX)
again.connect(os.path.join(sys.argv[1], "acc"))
print([(e.type.name, e.fd == sfd) for e in ctx.wait_events()], flush=True)
"""


def test_accept_failure_is_an_error_on_the_service(backend, rundir, processes):
    """accept() failing (EMFILE): ERROR 'accept failed: STRERROR' on the service
    fd, no DISCONNECTION; that client is refused (the spare fd takes and closes
    it), so the next round does not spin; the next client is accepted once fds
    are free again."""
    proc = processes(_EMFILE_SERVICE, rundir, backend, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        "[('ERROR', True, 0, 'accept failed: Too many open files')]",
        "refused client reads b''",
        "['TIMER']",
        "[('CONNECTION', False)]"]


_PIPE_WRITER = r"""
import os, signal, socket, sys, pyipc
signal.signal(signal.SIGPIPE, signal.SIG_DFL)        # a raised SIGPIPE kills us
ctx = pyipc.Context(rundir=sys.argv[1], backend=sys.argv[2])
a, peer = socket.socketpair()
r, w = os.pipe()
fd = a.detach()
ctx.add_external(fd)
ctx.add_external(w)
ctx.add_switch(fd, w)
os.close(r)                                           # nobody reads the pipe
try:
    ctx.write(w, b"x")
except pyipc.ConnectionClosedError as e:
    print("write:", e)
r2, w2 = os.pipe()
ctx.add_external(w2)
fd2 = socket.socketpair()[0].detach()
ctx.add_external(fd2)
ctx.add_switch(fd2, w2)
os.close(r2)
ctx.schedule(w2, b"y")                                # the event loop's flush
ctx.timer = 50
for _ in range(5):
    ctx.wait_events()
print("alive", signal.SIGPIPE in signal.sigpending())
"""


def test_no_sigpipe_from_a_switched_pipe(backend, rundir, processes):
    """Writes to a pipe (no MSG_NOSIGNAL there) must not raise SIGPIPE either."""
    proc = processes(_PIPE_WRITER, rundir, backend, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"child ended with {proc.returncode}: {err}"
    lines = out.splitlines()
    assert lines[0].startswith("write: connection on fd ")
    assert lines[1] == "alive False"
