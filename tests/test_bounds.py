"""The bounds table of the README: each bound at its edge and one past it."""

from __future__ import annotations

import os
import resource
import socket
import struct
import subprocess

import pytest

import pyipc
from pyipc import EventType

from conftest import Pair, collect, deadline, frame, quiet, raw_connect, wait_for


# -- max_message_size ------------------------------------------------------------

@pytest.mark.parametrize("limit", [1, 1000, 70_000])
def test_message_of_exactly_max_message_size(ctx_factory, limit):
    server, client = ctx_factory(max_message_size=limit), ctx_factory(max_message_size=limit)
    server.service_init("edge")
    fd = client.connect_service("edge")
    conn = wait_for(server, EventType.CONNECTION)[-1]
    edge = os.urandom(limit)
    client.write(fd, edge)
    client.schedule(fd, edge)
    wait_for(client, EventType.MESSAGE_TX)
    assert server.read(conn.fd) == edge
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == edge
    server.write(conn.fd, edge)
    assert client.read(fd) == edge
    over = b"x" * (limit + 1)
    for call in (client.write, client.schedule, server.write, server.schedule):
        with pytest.raises(pyipc.MessageTooLargeError) as info:
            call(fd if call.__self__ is client else conn.fd, over)
        assert str(info.value) == \
            f"message of {limit + 1} bytes exceeds max_message_size ({limit})"
    # Nothing of the refused messages was sent.
    client.write(fd, b"")
    assert server.read(conn.fd) == b""


def test_default_max_message_size_edge(ctx_factory):
    server, client = ctx_factory(), ctx_factory()
    server.service_init("big")
    fd = client.connect_service("big")
    conn = wait_for(server, EventType.CONNECTION)[-1]
    edge = bytes(range(256)) * ((16 << 20) // 256)
    assert len(edge) == 16 << 20
    client.schedule(fd, edge)
    got = None
    tick = deadline()
    while got is None:      # both sides' event loops move the 16 MiB along
        tick()
        client.timer = 0
        client.wait_events()
        server.timer = 10
        for ev in server.wait_events():
            if ev.type == EventType.MESSAGE_RX:
                got = ev.message
    assert got == edge
    with pytest.raises(pyipc.MessageTooLargeError) as info:
        client.schedule(fd, memoryview(edge + b"!"))
    assert str(info.value) == f"message of {(16 << 20) + 1} bytes exceeds max_message_size (16777216)"


@pytest.mark.parametrize("limit", [1, 1000])
def test_announcement_past_the_limit_drops_the_connection(ctx_factory, rundir, limit):
    server = ctx_factory(max_message_size=limit)
    server.service_init("rx")
    raw = raw_connect(rundir, "rx")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        raw.sendall(frame(b"y" * limit) + struct.pack(">I", limit + 1) + b"z" * (limit + 1))
        events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
        assert [(e.type, e.fd, e.message, e.error) for e in events] == [
            (EventType.MESSAGE_RX, conn.fd, b"y" * limit, None),
            (EventType.ERROR, conn.fd, None,
             f"message of {limit + 1} bytes exceeds max_message_size ({limit})"),
            (EventType.DISCONNECTION, conn.fd, None, None)]
        raw.settimeout(10)
        assert raw.recv(1) == b""
        assert quiet(server, 30) == []
    finally:
        raw.close()


def test_announcement_of_4gib_on_the_default_limit(ctx_factory, rundir):
    server = ctx_factory()
    server.service_init("huge")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    raw = raw_connect(rundir, "huge")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        raw.sendall(b"\xff\xff\xff\xff" + b"a" * 1000)
        events = collect(server, lambda e: e and e[-1].type == EventType.DISCONNECTION)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, conn.fd,
             "message of 4294967295 bytes exceeds max_message_size (16777216)"),
            (EventType.DISCONNECTION, conn.fd, None)]
    finally:
        raw.close()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 100 * 1024


_HUGE_LIMIT_SERVICE = r"""
import os, resource, sys, pyipc
from pyipc import EventType
rundir, backend = sys.argv[1], sys.argv[2]
# 1.5 GiB of address space: a 4 GiB buffer for the announced size cannot exist.
resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))
limits = {} if sys.argv[3] == "default" else dict(
    max_message_size=int(sys.argv[3]), max_queue_size=int(sys.argv[3]) + 4)
ctx = pyipc.Context(rundir=rundir, backend=backend, **limits)
ctx.service_init("huge")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("ready", flush=True)
while True:
    ev = ctx.wait_event()
    if ev.type in (EventType.ERROR, EventType.DISCONNECTION):
        print(ev.type.name, ev.error, flush=True)
    if ev.type == EventType.DISCONNECTION:
        break
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print("grown_kib", grown, flush=True)
"""


def test_announcement_of_4gib_within_a_huge_limit_allocates_nothing_huge(
        backend, rundir, processes):
    """max_message_size 2^32-1: the 4 GiB-1 announcement is legal; a peer that
    then sends 3 MB and vanishes must not have made the service reserve 4 GiB."""
    proc = processes(_HUGE_LIMIT_SERVICE, rundir, backend, str(0xFFFFFFFF),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    raw = raw_connect(rundir, "huge")
    try:
        raw.sendall(b"\xff\xff\xff\xff")
        raw.sendall(b"b" * (3 << 20))
    finally:
        raw.close()
    out, err = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert proc.returncode == 0, err
    assert lines[:2] == ["ERROR peer closed the connection in the middle of a message",
                         "DISCONNECTION None"], (out, err)
    assert int(lines[2].split()[1]) < 100 * 1024, out


# -- max_queue_size ---------------------------------------------------------------------

def test_queue_of_exactly_max_queue_size(ctx_factory):
    server = ctx_factory()
    client = ctx_factory(max_message_size=10, max_queue_size=30)
    server.service_init("q")
    fd = client.connect_service("q")
    conn = wait_for(server, EventType.CONNECTION)[-1]
    client.schedule(fd, b"a" * 10)       # 14
    client.schedule(fd, b"b" * 8)        # 26
    client.schedule(fd, b"")             # 30: exactly the bound
    with pytest.raises(pyipc.QueueFullError) as info:
        client.schedule(fd, b"")         # 34
    assert str(info.value) == f"send queue of fd {fd} is full (30 bytes queued, max_queue_size 30)"
    with pytest.raises(pyipc.QueueFullError):
        client.schedule(fd, b"c")
    tx = collect(client, lambda e: len(e) >= 3)
    assert [e.type for e in tx] == [EventType.MESSAGE_TX] * 3
    got = [server.read(conn.fd) for _ in range(3)]
    assert got == [b"a" * 10, b"b" * 8, b""]
    assert quiet(server, 30) == []       # nothing of the refused ones came
    # The queue is empty again: the whole bound is available.
    client.schedule(fd, b"d" * 10)
    client.schedule(fd, b"e" * 8)
    client.schedule(fd, b"")
    collect(client, lambda e: len(e) >= 3)
    assert [server.read(conn.fd) for _ in range(3)] == [b"d" * 10, b"e" * 8, b""]


def test_queue_bound_with_a_stalled_reader(ctx_factory, rundir):
    """A reader that does not read: the queue fills to its bound, is refused past
    it, and everything queued arrives, in order, once the reader reads."""
    server = ctx_factory(max_message_size=1000, max_queue_size=1_000_000)
    server.service_init("stall")
    raw = raw_connect(rundir, "stall")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        sent = 0
        while True:
            try:
                server.schedule(conn.fd, struct.pack(">I", sent) + b"p" * 996)
            except pyipc.QueueFullError:
                break
            sent += 1
            if sent % 50 == 0:
                server.timer = 0
                server.wait_events()        # part of it goes to the socket buffer
        assert sent >= 1000                 # the queue held its 1 MB
        received = b""
        raw.settimeout(10)
        expected = sent * 1004
        server.timer = 0
        tick = deadline()
        while len(received) < expected:
            tick()
            server.wait_events()
            try:
                received += raw.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        offsets = range(0, expected, 1004)
        assert [struct.unpack_from(">II", received, o) for o in offsets] == \
            [(1000, i) for i in range(sent)]
    finally:
        raw.close()


# -- max_connections -------------------------------------------------------------------

def test_max_connections_edge_and_refusal(ctx_factory, rundir):
    server = ctx_factory(max_connections=3)
    sfd = server.service_init("full")                    # 1 fd
    clients = [ctx_factory(), ctx_factory()]
    cfds = [c.connect_service("full") for c in clients]
    conns = collect(server, lambda e: len(e) >= 2)       # 3 fds: at the edge
    assert [e.type for e in conns] == [EventType.CONNECTION] * 2
    late = ctx_factory()
    lfd = late.connect_service("full")
    refused = wait_for(server, EventType.ERROR)
    assert [(e.type, e.fd, e.index, e.error) for e in refused] == [
        (EventType.ERROR, sfd, 0, "connection refused: max_connections (3) reached")]
    assert quiet(server, 30) == []                       # no DISCONNECTION for it
    # The refused client sees its connection closed.
    ev = wait_for(late, EventType.DISCONNECTION)[-1]
    assert ev.fd == lfd
    # The accepted ones work.
    clients[1].write(cfds[1], b"ok")
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"ok"
    # A freed place is taken by the next client.
    clients[0].close_all()
    wait_for(server, EventType.DISCONNECTION)
    again = ctx_factory()
    again.connect_service("full")
    ev = wait_for(server, lambda e: e.type in (EventType.CONNECTION, EventType.ERROR))[-1]
    assert ev.type == EventType.CONNECTION and ev.index == conns[0].index
    with pytest.raises(pyipc.ConnectionLimitError) as info:
        server.connect_service("full")
    assert str(info.value) == "too many connections (max_connections 3)"


def test_max_connections_of_one(ctx_factory, rundir):
    ctx = ctx_factory(max_connections=1)
    ctx.service_init("one")
    raw = raw_connect(rundir, "one")
    try:
        ev = wait_for(ctx, EventType.ERROR)[-1]
        assert ev.error == "connection refused: max_connections (1) reached"
        raw.settimeout(10)
        assert raw.recv(1) == b""
    finally:
        raw.close()


def test_many_connections(ctx_factory, rundir):
    """200 clients on one service (each client context holds one fd)."""
    server = ctx_factory(max_connections=201)
    server.service_init("crowd")
    socks = [raw_connect(rundir, "crowd") for _ in range(200)]
    try:
        events = collect(server, lambda e: len(e) >= 200)
        assert sorted(e.index for e in events) == list(range(1, 201))
        extra = raw_connect(rundir, "crowd")
        socks.append(extra)
        ev = wait_for(server, EventType.ERROR)[-1]
        assert ev.error == "connection refused: max_connections (201) reached"
        for i, s in enumerate(socks[:200]):
            s.sendall(frame(b"%d" % i))
        got = collect(server, lambda e: len(e) >= 200)
        assert sorted(e.message for e in got) == sorted(b"%d" % i for i in range(200))
    finally:
        for s in socks:
            s.close()


# -- names -------------------------------------------------------------------------------

def test_socket_path_of_107_bytes(ctx_factory, rundir):
    server, client = ctx_factory(), ctx_factory()
    name = "n" * (107 - len(rundir) - 1)
    assert len(os.path.join(rundir, name)) == 107
    server.service_init(name)
    fd = client.connect_service(name)
    client.write(fd, b"long name")
    assert wait_for(server, EventType.MESSAGE_RX)[-1].message == b"long name"
    for call in (server.service_init, client.connect_service):
        with pytest.raises(pyipc.InvalidNameError) as info:
            call(name + "n")
        assert str(info.value) == "invalid service name: socket path is longer than 107 bytes"


def test_announcement_of_4gib_on_the_default_limit_in_a_fresh_process(
        backend, rundir, processes):
    """The same announcement, measured in a process of its own (ru_maxrss of
    the test process is a high-water mark of everything before)."""
    proc = processes(_HUGE_LIMIT_SERVICE, rundir, backend, "default",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    raw = raw_connect(rundir, "huge")
    try:
        raw.sendall(b"\xff\xff\xff\xff" + b"c" * 100_000)
    except BrokenPipeError:
        pass                    # the service may close it before all is sent
    finally:
        raw.close()
    out, err = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert proc.returncode == 0, err
    assert lines[:2] == ["ERROR message of 4294967295 bytes exceeds max_message_size (16777216)",
                         "DISCONNECTION None"], (out, err)
    assert int(lines[2].split()[1]) < 100 * 1024, out


def test_read_of_a_message_of_exactly_the_default_limit(ctx_factory):
    """read() (not the event loop) of a 16 MiB message written by another thread."""
    import threading
    server, client = ctx_factory(), ctx_factory()
    server.service_init("bigread")
    fd = client.connect_service("bigread")
    conn = wait_for(server, EventType.CONNECTION)[-1].fd
    edge = os.urandom(1 << 20) * 16
    writer = threading.Thread(target=lambda: (client.write(fd, edge), client.write(fd, b"")))
    writer.start()
    try:
        assert server.read(conn) == edge
        assert server.read(conn) == b""
    finally:
        writer.join(60)


@pytest.fixture
def over_4_gib():
    """A payload of 4 GiB + 1 bytes: private read-only anonymous memory that is
    never touched, so it costs address space, not RAM (nor commit charge)."""
    import mmap
    try:
        m = mmap.mmap(-1, (1 << 32) + 1, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except (OSError, OverflowError, ValueError) as e:   # 32-bit Python, ulimit -v
        pytest.skip(f"cannot map 4 GiB of address space here: {e}")
    view = memoryview(m)
    yield view
    try:
        view.release()
        m.close()
    except BufferError:     # a failed test's traceback still holds a pointer into it
        pass


def test_a_payload_over_4_gib_is_checked_in_write_order(pair: Pair, over_4_gib):
    """Over 4 GiB (more than a C uint32_t size can say): an unknown fd or a
    service fd is reported first, as for any payload, then the size; nothing is
    sent, and the connection still works."""
    for name in ("write", "schedule", "write_many"):
        def send(ctx: pyipc.Context, fd: int) -> None:
            if name == "write_many":
                ctx.write_many(fd, [b"x", over_4_gib])
            else:
                getattr(ctx, name)(fd, over_4_gib)
        with pytest.raises(pyipc.UnknownFdError, match="is not managed"):
            send(pair.client, 99999)
        with pytest.raises(pyipc.UnknownFdError, match="is not a connection"):
            send(pair.server, pair.service_fd)
        with pytest.raises(pyipc.MessageTooLargeError,
                           match=f"message of {(1 << 32) + 1} bytes exceeds max_message_size"):
            send(pair.client, pair.client_fd)
    pair.client.write(pair.client_fd, b"after")
    assert pair.server.read(pair.server_fd) == b"after"
