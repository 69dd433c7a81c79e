"""Switching: pyipc framing both ways, foreign protocols through callbacks,
callback results, and how a switched pair ends."""

from __future__ import annotations

import os
import socket
import struct

import pytest

import pyipc
from pyipc import CBEvent, EventType, MAX_MORE_PER_ROUND

from conftest import collect, deadline, frame, quiet, raw_connect, settle, wait_for
from daemon_harness import read_exactly


class Switchboard:
    """A service with two connected clients (pyipc contexts) switched together."""

    def __init__(self, make) -> None:
        self.server = make()
        self.server.service_init("board")
        self.a, self.b = make(), make()
        self.afd = self.a.connect_service("board")
        self.sa = wait_for(self.server, EventType.CONNECTION)[-1]
        self.bfd = self.b.connect_service("board")
        self.sb = wait_for(self.server, EventType.CONNECTION)[-1]
        self.server.add_switch(self.sa.fd, self.sb.fd)


@pytest.fixture
def board(ctx_factory):
    return Switchboard(ctx_factory)


def pump(server, until, timeout=10):
    return collect(server, until, timeout)


def test_switch_forwards_both_ways(board):
    board.a.write(board.afd, b"a to b")
    board.b.write(board.bfd, b"b to a")
    board.a.write(board.afd, b"")
    events = pump(board.server,
                  lambda e: sum(x.type == EventType.SWITCH_TX for x in e) >= 3)
    rx = [(e.fd, e.message) for e in events if e.type == EventType.SWITCH_RX]
    tx = [e.fd for e in events if e.type == EventType.SWITCH_TX]
    assert sorted(rx) == sorted([(board.sa.fd, b"a to b"), (board.sb.fd, b"b to a"),
                                 (board.sa.fd, b"")])
    assert sorted(tx) == sorted([board.sb.fd, board.sa.fd, board.sb.fd])
    assert not any(e.type == EventType.MESSAGE_RX for e in events)
    assert board.b.read(board.bfd) == b"a to b"
    assert board.b.read(board.bfd) == b""
    assert board.a.read(board.afd) == b"b to a"


def test_switch_keeps_order_and_sizes(board):
    messages = [os.urandom(n) for n in (0, 1, 70_000, 5, 200_000, 0, 3)]
    for m in messages:
        board.a.schedule(board.afd, m)
    got = []
    tick = deadline()
    while len(got) < len(messages):
        tick()
        board.a.timer = 0
        board.a.wait_events()
        board.server.timer = 0
        board.server.wait_events()
        board.b.timer = 0
        got += [e.message for e in board.b.wait_events() if e.type == EventType.MESSAGE_RX]
    assert got == messages


def test_write_and_schedule_on_a_switched_fd_use_pyipc_framing(board):
    board.server.write(board.sb.fd, b"from the switch itself")
    board.server.schedule(board.sb.fd, b"scheduled")
    wait_for(board.server, EventType.MESSAGE_TX)
    assert board.b.read(board.bfd) == b"from the switch itself"
    assert board.b.read(board.bfd) == b"scheduled"


def test_one_side_ends_then_the_other_is_closed(board):
    """a's last message still reaches b; then b is closed (no ERROR: nothing lost)."""
    board.a.write(board.afd, b"last words")
    board.a.close(board.afd)
    events = pump(board.server, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    # The read that brought "last words" was short (nothing more was there), so
    # the EOF is seen by the next round, after that round's flush wrote them to b.
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.SWITCH_RX, board.sa.fd, None),
        (EventType.SWITCH_TX, board.sb.fd, None),
        (EventType.DISCONNECTION, board.sa.fd, None),
        (EventType.DISCONNECTION, board.sb.fd, None)]
    assert board.b.read(board.bfd) == b"last words"
    ev = wait_for(board.b, EventType.DISCONNECTION)[-1]
    assert ev.fd == board.bfd
    assert settle(board.server) == []
    with pytest.raises(pyipc.UnknownFdError):
        board.server.write(board.sb.fd, b"x")


def test_the_other_side_is_not_writable_while_closing(board, ctx_factory):
    """Between the end of a and the close of b, b only drains what a sent."""
    big = os.urandom(3 << 20)             # more than b's socket takes at once
    board.a.schedule(board.afd, big)
    tick = deadline()
    while True:                           # until the server has all of it queued for b
        tick()
        board.a.timer = 0
        if any(e.type == EventType.MESSAGE_TX for e in board.a.wait_events()):
            break
        board.server.timer = 0
        board.server.wait_events()
    board.a.close(board.afd)
    seen = pump(board.server, lambda e: any(x.type == EventType.DISCONNECTION for x in e))
    assert [e.type for e in seen if e.type != EventType.SWITCH_RX] == [EventType.DISCONNECTION]
    with pytest.raises(pyipc.ConnectionClosedError) as info:
        board.server.write(board.sb.fd, b"x")
    assert str(info.value) == f"connection on fd {board.sb.fd} is closed by the peer"
    with pytest.raises(pyipc.ConnectionClosedError):
        board.server.schedule(board.sb.fd, b"x")
    got = None
    rest = []
    tick = deadline()
    while got is None:                    # b reads; the server drains, then closes b
        tick()
        board.server.timer = 0
        rest += board.server.wait_events()
        board.b.timer = 0
        for e in board.b.wait_events():
            if e.type == EventType.MESSAGE_RX:
                got = e.message
    assert got == big
    rest += pump(board.server, lambda e: any(x.type == EventType.DISCONNECTION for x in e)) \
        if not any(e.type == EventType.DISCONNECTION for e in rest) else []
    rest = [e for e in rest if e.type != EventType.TIMER]
    assert [(e.type, e.fd) for e in rest] == [
        (EventType.SWITCH_TX, board.sb.fd), (EventType.DISCONNECTION, board.sb.fd)]


def test_the_other_side_gone_too_reports_what_was_lost(board):
    """b's own peer is gone as well: what was forwarded to it is reported unsent."""
    board.b.close(board.bfd)
    board.a.write(board.afd, b"to nobody")
    board.a.close(board.afd)
    events = pump(board.server, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    kinds = [(e.type, e.fd) for e in events]
    assert (EventType.DISCONNECTION, board.sa.fd) in kinds
    assert (EventType.DISCONNECTION, board.sb.fd) in kinds
    assert (EventType.SWITCH_TX, board.sb.fd) not in kinds


def test_close_of_one_side_closes_both_without_events(board):
    board.server.close(board.sa.fd)
    for fd in (board.sa.fd, board.sb.fd):
        with pytest.raises(pyipc.UnknownFdError):
            board.server.write(fd, b"x")
    assert quiet(board.server, 30) == []
    assert wait_for(board.a, EventType.DISCONNECTION)[-1].fd == board.afd
    assert wait_for(board.b, EventType.DISCONNECTION)[-1].fd == board.bfd


def test_a_bad_frame_on_one_side_ends_both(ctx_factory, rundir):
    server = ctx_factory(max_message_size=100)
    server.service_init("bad")
    raw = raw_connect(rundir, "bad")
    s1 = wait_for(server, EventType.CONNECTION)[-1].fd
    other = ctx_factory()
    ofd = other.connect_service("bad")
    s2 = wait_for(server, EventType.CONNECTION)[-1].fd
    try:
        server.add_switch(s1, s2)
        raw.sendall(frame(b"fine") + struct.pack(">I", 101))
        events = pump(server, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.SWITCH_RX, s1, None),
            (EventType.ERROR, s1, "message of 101 bytes exceeds max_message_size (100)"),
            (EventType.DISCONNECTION, s1, None),
            (EventType.SWITCH_TX, s2, None),
            (EventType.DISCONNECTION, s2, None)]
    finally:
        raw.close()
    got = collect(other, lambda e: any(x.type == EventType.DISCONNECTION for x in e))
    assert [(e.type, e.message) for e in got] == [
        (EventType.MESSAGE_RX, b"fine"), (EventType.DISCONNECTION, None)]
    assert got[-1].fd == ofd


class LineProtocol:
    """A newline-delimited foreign protocol over a stream fd."""

    def __init__(self, ignore_prefix: bytes = b"#") -> None:
        self.ignore_prefix = ignore_prefix
        self.calls_in = 0
        self.calls_out = []

    def on_in(self, fd: int):
        self.calls_in += 1
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(fd, 1)
            if not byte:
                return CBEvent.FD_CLOSING, None
            line += byte
        if line.startswith(self.ignore_prefix):
            return CBEvent.IGNORE, None
        if line == b"fail\n":
            return CBEvent.ERROR, None
        if line == b"raise\n":
            raise RuntimeError("callback bug")
        return CBEvent.NO_ERROR, line[:-1]

    def on_out(self, fd: int, payload: bytes):
        self.calls_out.append(payload)
        if payload == b"drop me":
            return CBEvent.IGNORE
        if payload == b"close me":
            return CBEvent.FD_CLOSING
        if payload == b"break me":
            raise ValueError("output callback bug")
        os.write(fd, payload + b"\n")
        return CBEvent.NO_ERROR


class Foreign:
    """A pyipc client, and a socketpair whose one end speaks lines and is
    switched (with callbacks) to the client's connection in the service."""

    def __init__(self, make) -> None:
        self.server = make()
        self.server.service_init("lines")
        self.client = make()
        self.cfd = self.client.connect_service("lines")
        self.conn = wait_for(self.server, EventType.CONNECTION)[-1].fd
        self.inner, self.outer = socket.socketpair()
        self.fd = self.inner.detach()           # the context owns it now
        self.proto = LineProtocol()
        self.server.add_external(self.fd)
        self.server.add_switch(self.fd, self.conn)
        self.server.set_switch_callbacks(self.fd, self.proto.on_in, self.proto.on_out)
        self.outer.settimeout(10)

    def lines(self, n: int) -> list[bytes]:
        data = b""
        tick = deadline()
        while data.count(b"\n") < n:
            tick()
            self.server.timer = 0
            self.server.wait_events()
            try:
                data += self.outer.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        return data.split(b"\n")[:n]


@pytest.fixture
def foreign(ctx_factory):
    f = Foreign(ctx_factory)
    try:
        yield f
    finally:
        f.outer.close()


def test_callbacks_translate_a_foreign_protocol(foreign):
    foreign.outer.sendall(b"hello\nworld\n\n")
    events = pump(foreign.server, lambda e: sum(x.type == EventType.SWITCH_TX for x in e) >= 3)
    assert [(e.type, e.fd, e.message) for e in events] == [
        (EventType.SWITCH_RX, foreign.fd, b"hello"),
        (EventType.SWITCH_TX, foreign.conn, None),
        (EventType.SWITCH_RX, foreign.fd, b"world"),
        (EventType.SWITCH_TX, foreign.conn, None),
        (EventType.SWITCH_RX, foreign.fd, b""),
        (EventType.SWITCH_TX, foreign.conn, None)]
    assert [foreign.client.read(foreign.cfd) for _ in range(3)] == [b"hello", b"world", b""]
    # The other way: pyipc frames become lines, SWITCH_TX as soon as on_out returns.
    foreign.client.write(foreign.cfd, b"one")
    foreign.client.write(foreign.cfd, b"two")
    assert foreign.lines(2) == [b"one", b"two"]
    assert foreign.proto.calls_out == [b"one", b"two"]


def test_on_out_reports_switch_tx_at_once(foreign):
    foreign.client.write(foreign.cfd, b"ping")
    events = pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.fd, e.message) for e in events] == [
        (EventType.SWITCH_RX, foreign.conn, b"ping"),
        (EventType.SWITCH_TX, foreign.fd, None)]
    assert foreign.outer.recv(100) == b"ping\n"


def test_a_callback_may_call_its_own_context(foreign):
    """A callback runs inside wait_events(): its calls to the same context are
    nested calls of the owner's thread, which the thread guard lets in."""
    seen = []

    def on_out(fd: int, payload: bytes):
        seen.append(foreign.server.peer_credentials(foreign.conn)[0])
        return foreign.proto.on_out(fd, payload)

    foreign.server.set_switch_callbacks(foreign.fd, foreign.proto.on_in, on_out)
    foreign.client.write(foreign.cfd, b"nested")
    assert foreign.lines(1) == [b"nested"]
    assert seen == [os.getpid()]


def test_a_read_or_a_wait_inside_a_callback_is_refused_and_nothing_is_lost(foreign):
    """The loop that calls a callback is still decoding the bytes it read;
    a read or a wait inside the callback would decode into the same
    buffers (native sent one connection's bytes to another's peer and lost
    frames): both backends refuse them, saying why."""
    refused: list = []
    other = foreign.client.connect_service("lines")
    other_conn = wait_for(foreign.server, EventType.CONNECTION)[-1].fd
    foreign.client.write(other, b"for the other connection")

    def on_out(fd: int, payload: bytes):
        for call in (lambda: foreign.server.read(other_conn, timeout=0),
                     lambda: foreign.server.read_many(other_conn, timeout=0),
                     lambda: foreign.server.read_into(other_conn, bytearray(100), timeout=0),
                     lambda: foreign.server.wait_event(timeout=0),
                     lambda: foreign.server.wait_events(timeout=0)):
            with pytest.raises(pyipc.IPCError) as info:
                call()
            refused.append(str(info.value))
        return foreign.proto.on_out(fd, payload)

    foreign.server.set_switch_callbacks(foreign.fd, foreign.proto.on_in, on_out)
    foreign.client.write_many(foreign.cfd, [b"AAAAA", b"CCCCC"])
    events = pump(foreign.server, lambda e: sum(x.type == EventType.SWITCH_TX for x in e) >= 2
                  and any(x.type == EventType.MESSAGE_RX for x in e))
    assert [e.message for e in events if e.type == EventType.MESSAGE_RX] == \
        [b"for the other connection"]                 # whole, once, to its own connection
    assert read_exactly(foreign.outer, 12) == b"AAAAA\nCCCCC\n"
    assert refused == (["cannot read inside a switch callback"] * 3 +
                       ["cannot wait inside a switch callback"] * 2) * 2


def test_a_callbacks_first_fileno_does_not_hide_the_rounds_events(foreign):
    """fileno() made for the first time inside a callback (the loop is about
    to be handed to another event loop) gives the context a new event queue:
    the wait that ran the callback still returns its events (pure looked at
    the old queue and spun until its timeout, or forever)."""
    seen = []

    def on_in(fd: int):
        seen.append(foreign.server.fileno())
        return foreign.proto.on_in(fd)

    foreign.server.set_switch_callbacks(foreign.fd, on_in, foreign.proto.on_out)
    foreign.server.timer = None
    foreign.outer.sendall(b"first\n")
    events = foreign.server.wait_events(timeout=10)
    assert [(e.type, e.message) for e in events][:1] == [(EventType.SWITCH_RX, b"first")]
    assert len(seen) == 1 and seen[0] >= 0


def test_ignore_drops_the_unit(foreign):
    foreign.outer.sendall(b"# comment\nreal\n")
    events = pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.message) for e in events] == [
        (EventType.SWITCH_RX, b"real"), (EventType.SWITCH_TX, None)]
    assert foreign.client.read(foreign.cfd) == b"real"
    foreign.client.write(foreign.cfd, b"drop me")
    foreign.client.write(foreign.cfd, b"kept")
    events = pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.message) for e in events] == [
        (EventType.SWITCH_RX, b"drop me"), (EventType.SWITCH_RX, b"kept"),
        (EventType.SWITCH_TX, None)]
    assert foreign.outer.recv(100) == b"kept\n"


def test_fd_closing_from_on_in_closes_both(foreign):
    foreign.outer.shutdown(socket.SHUT_WR)          # on_in reads EOF -> FD_CLOSING
    events = pump(foreign.server,
                  lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.DISCONNECTION, foreign.fd, None),
        (EventType.DISCONNECTION, foreign.conn, None)]
    assert wait_for(foreign.client, EventType.DISCONNECTION)[-1].fd == foreign.cfd
    assert settle(foreign.server) == []
    assert foreign.outer.recv(10) == b""            # the external fd was closed


def test_fd_closing_from_on_out_closes_both(foreign):
    foreign.client.write(foreign.cfd, b"close me")
    events = pump(foreign.server,
                  lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.SWITCH_RX, foreign.conn, None),
        (EventType.DISCONNECTION, foreign.fd, None),
        (EventType.DISCONNECTION, foreign.conn, None)]


@pytest.mark.parametrize("line", [b"fail\n", b"raise\n"])
def test_on_in_error_or_exception(foreign, line):
    foreign.outer.sendall(line)
    events = pump(foreign.server,
                  lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.ERROR, foreign.fd, f"switch callback failed on fd {foreign.fd}"),
        (EventType.DISCONNECTION, foreign.fd, None),
        (EventType.DISCONNECTION, foreign.conn, None)]


def test_on_out_exception(foreign):
    foreign.client.write(foreign.cfd, b"break me")
    events = pump(foreign.server,
                  lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.SWITCH_RX, foreign.conn, None),
        (EventType.ERROR, foreign.fd, f"switch callback failed on fd {foreign.fd}"),
        (EventType.DISCONNECTION, foreign.fd, None),
        (EventType.DISCONNECTION, foreign.conn, None)]


@pytest.mark.parametrize("queued", [False, True])
def test_messages_read_after_the_switch_ended_are_dropped(foreign, queued):
    """on_out fails on the first of two messages that came in one read: the
    switch ends (ERROR), and the second, read with it, has nowhere to go. It
    is dropped, as the unread rest of the stream is, on both backends: never
    an exception out of wait_events() (pure's AssertionError), nor a
    MESSAGE_RX on the switched fd (native's, while the fd was still flushing
    what was forwarded to it: `queued`). The fd then closes once flushed."""
    server, client = foreign.server, foreign.client
    server.set_switch_callbacks(foreign.fd, None, lambda fd, payload: CBEvent.ERROR)
    big = b"b" * (3 << 20)                      # more than the socket takes at once
    if queued:
        server.switch_send(foreign.conn, frame(big))
    client.write(foreign.cfd, b"one")
    client.write(foreign.cfd, b"two")           # both in the socket: one read
    events = pump(server, lambda e: any(x.type == EventType.DISCONNECTION
                                        and x.fd == foreign.fd for x in e))
    got = []
    tick = deadline()
    while not any(e.fd == foreign.cfd and e.type == EventType.DISCONNECTION for e in got):
        tick()                                  # the client reads; the server flushes
        server.timer = client.timer = 0
        events += server.wait_events()
        got += client.wait_events()
    events = [e for e in events if e.type != EventType.TIMER]
    assert [(e.type, e.fd, e.message, e.error) for e in events
            if e.type != EventType.SWITCH_TX] == [
        (EventType.SWITCH_RX, foreign.conn, b"one", None),
        (EventType.ERROR, foreign.fd, None, f"switch callback failed on fd {foreign.fd}"),
        (EventType.DISCONNECTION, foreign.fd, None, None),
        (EventType.DISCONNECTION, foreign.conn, None, None)]
    got = [e for e in got if e.type != EventType.TIMER]
    assert [(e.type, e.message) for e in got] == \
        [(EventType.MESSAGE_RX, big)] * queued + [(EventType.DISCONNECTION, None)]
    assert foreign.outer.recv(100) == b""       # the foreign fd is closed


def test_on_in_payload_too_large(ctx_factory):
    server = ctx_factory(max_message_size=4)
    left, right = socket.socketpair()
    r, w = os.pipe()
    try:
        fd = left.detach()
        server.add_external(fd)
        server.add_external(r)
        server.add_switch(fd, r)
        server.set_switch_callbacks(r, lambda f: (CBEvent.NO_ERROR, os.read(f, 100)), None)
        os.write(w, b"12345")
        events = pump(server, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
        assert [(e.type, e.fd, e.error) for e in events] == [
            (EventType.ERROR, r, f"switch callback failed on fd {r}"),
            (EventType.DISCONNECTION, r, None),
            (EventType.DISCONNECTION, fd, None)]
    finally:
        right.close()
        os.close(w)


def test_pipe_into_a_connection(ctx_factory):
    """A pipe's read end with on_in, switched to a pyipc connection."""
    server, client = ctx_factory(), ctx_factory()
    server.service_init("pipe")
    cfd = client.connect_service("pipe")
    conn = wait_for(server, EventType.CONNECTION)[-1].fd
    r, w = os.pipe()
    try:
        server.add_external(r)
        server.add_switch(r, conn)

        def on_in(fd):
            data = os.read(fd, 3)          # fixed-size units of 3 bytes
            return (CBEvent.NO_ERROR, data) if data else (CBEvent.FD_CLOSING, None)

        server.set_switch_callbacks(r, on_in, None)
        os.write(w, b"abcdefghi")
        got = []
        tick = deadline()
        while len(got) < 3:
            tick()
            server.timer = 0
            server.wait_events()
            client.timer = 0
            got += [e.message for e in client.wait_events() if e.type == EventType.MESSAGE_RX]
        assert got == [b"abc", b"def", b"ghi"]
    finally:
        os.close(w)
    events = pump(server, lambda e: sum(x.type == EventType.DISCONNECTION for x in e) >= 2)
    assert [(e.type, e.fd) for e in events] == [
        (EventType.DISCONNECTION, r), (EventType.DISCONNECTION, conn)]


def test_callbacks_can_be_removed(foreign):
    """set_switch_callbacks(fd, None, None): back to pyipc framing on that side."""
    foreign.server.set_switch_callbacks(foreign.fd, None, None)
    foreign.outer.sendall(frame(b"framed now"))
    events = pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.message) for e in events] == [
        (EventType.SWITCH_RX, b"framed now"), (EventType.SWITCH_TX, None)]
    assert foreign.client.read(foreign.cfd) == b"framed now"
    foreign.client.write(foreign.cfd, b"back")
    pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert foreign.outer.recv(100) == frame(b"back")


def test_an_on_in_that_removes_itself_is_not_called_again(foreign):
    """An on_in that unregisters its callbacks and returns MORE: what it
    returned is forwarded, it is not called again (the native core called
    the old function for the rest of the round; pure raised AssertionError),
    and the fd is read with pyipc framing from then on."""
    calls = []

    def on_in(fd: int):
        calls.append(os.read(fd, 64))
        foreign.server.set_switch_callbacks(fd, None, None)
        return CBEvent.MORE, b"held"

    foreign.server.set_switch_callbacks(foreign.fd, on_in, None)
    foreign.outer.sendall(b"go\n")
    pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    foreign.outer.sendall(frame(b"framed"))
    events = pump(foreign.server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.message) for e in events] == [
        (EventType.SWITCH_RX, b"framed"), (EventType.SWITCH_TX, None)]
    assert calls == [b"go\n"]
    assert [foreign.client.read(foreign.cfd) for _ in range(2)] == [b"held", b"framed"]


def test_a_paused_fd_on_in_is_not_called_for_its_more(foreign):
    """pause_reading(fd): calling fd's on_in reads it, so a MORE it asked for
    waits until fd is resumed (both backends called it 64 times a round)."""
    calls = [0]
    held = [3 * MAX_MORE_PER_ROUND]

    def on_in(fd: int):
        if calls[0] == 0:
            os.read(fd, 64)
        calls[0] += 1
        held[0] -= 1
        return (CBEvent.MORE if held[0] else CBEvent.NO_ERROR), b"r"

    server = foreign.server
    server.set_switch_callbacks(foreign.fd, on_in, None)
    foreign.outer.sendall(b"go\n")
    server.timer = 0
    server.wait_events()                    # one round: the most it calls on_in
    assert calls[0] == MAX_MORE_PER_ROUND
    server.pause_reading(foreign.fd)
    for _ in range(3):                      # what those calls forwarded goes out
        server.timer = 0
        assert EventType.SWITCH_RX not in [e.type for e in server.wait_events()]
    assert calls[0] == MAX_MORE_PER_ROUND
    server.pause_reading(foreign.fd, False)
    events = pump(server, lambda e: sum(x.type == EventType.SWITCH_RX for x in e)
                  >= 2 * MAX_MORE_PER_ROUND)
    assert calls[0] == 3 * MAX_MORE_PER_ROUND
    assert [e.message for e in events if e.type == EventType.SWITCH_RX] == \
        [b"r"] * (2 * MAX_MORE_PER_ROUND)


def test_callback_type_checks(foreign):
    with pytest.raises(TypeError):
        foreign.server.set_switch_callbacks(foreign.fd, "not callable", None)
    with pytest.raises(TypeError):
        foreign.server.set_switch_callbacks(foreign.fd, None, 42)


def test_back_pressure_instead_of_loss(ctx_factory, rundir):
    """A switched reader that does not read: the writer's side is paused, and
    every message arrives, in order, once the reader reads."""
    server = ctx_factory(max_message_size=1000, max_queue_size=20_000)
    server.service_init("bp")
    src = raw_connect(rundir, "bp")
    s1 = wait_for(server, EventType.CONNECTION)[-1].fd
    dst = raw_connect(rundir, "bp")
    s2 = wait_for(server, EventType.CONNECTION)[-1].fd
    try:
        server.add_switch(s1, s2)
        src.setblocking(False)
        n = 3000
        stream = b"".join(frame(struct.pack(">I", i) + b"p" * 996) for i in range(n))
        view = memoryview(stream)
        stalled_rounds = 0
        tick = deadline()
        while view and stalled_rounds < 200:      # the source fills every buffer
            tick()
            try:
                sent = src.send(view)
                view = view[sent:]
                stalled_rounds = 0
            except BlockingIOError:
                stalled_rounds += 1
            server.timer = 0
            server.wait_events()
        assert view, "a 3 MB stream should not fit: back-pressure must stop it"
        received = b""
        dst.setblocking(False)
        tick = deadline()
        while len(received) < len(stream):
            tick()
            if view:
                try:
                    view = view[src.send(view):]
                except BlockingIOError:
                    pass
            server.timer = 0
            server.wait_events()
            try:
                received += dst.recv(1 << 20)
            except BlockingIOError:
                pass
        assert received == stream
    finally:
        src.close()
        dst.close()


def test_frames_written_into_a_switched_pipe_arrive_whole(ctx_factory):
    """write() to a pipe (a switch side): a small frame (sent as one buffer)
    and a large one (header and payload apart) arrive whole and in order."""
    ctx = ctx_factory()
    a, peer = socket.socketpair()
    r, w = os.pipe()
    try:
        fd = a.detach()
        ctx.add_external(fd)
        ctx.add_external(w)
        ctx.add_switch(fd, w)
        large = bytes(range(256)) * 20
        ctx.write(w, b"hello")
        ctx.write(w, large)     # both written (blocking) before anything is read
        expected = frame(b"hello") + frame(large)
        os.set_blocking(r, False)   # all of it is in the pipe already: no waiting
        assert os.read(r, 65536) == expected
    finally:
        os.close(r)
        peer.close()


@pytest.mark.parametrize("call", [
    lambda ctx, svc: ctx.add_switch(999, "x"),
    lambda ctx, svc: ctx.add_switch(svc, "x"),
    lambda ctx, svc: ctx.set_switch_callbacks(999, "not callable", None),
    lambda ctx, svc: ctx.set_switch_callbacks(svc, None, "not callable"),
])
def test_arguments_are_checked_before_the_fds_are_looked_up(ctx_factory, call):
    """The same misuse gets the same error on both backends: a bad argument's
    TypeError first, whatever the fd (pure looked the fd up first)."""
    ctx = ctx_factory()
    svc = ctx.service_init("svc")
    with pytest.raises(TypeError):
        call(ctx, svc)


def _switched_socketpairs(ctx):
    """Two socket pairs, one end of each a connection of ctx, those two
    switched: (a, a's other end, b, b's other end)."""
    x1, x2 = socket.socketpair()
    y1, y2 = socket.socketpair()
    a, b = x1.detach(), y1.detach()
    ctx.add_connection(a)
    ctx.add_connection(b)
    ctx.add_switch(a, b)
    return a, x2, b, y2


def test_an_on_in_that_closes_its_fd_while_drained_ends_once(ctx_factory):
    """A write to a switched fd fails (its peer is gone): its on_in reads what
    is left and, at the end, closes the fd itself. The close lingers, and the
    linger flushed the failed queue again, which drained again, which closed
    again... (pure: RecursionError; native: memory without end). Once."""
    ctx = ctx_factory(linger=1.0)
    a, x2, b, y2 = _switched_socketpairs(ctx)
    calls: list[bytes] = []

    def on_in(fd: int):
        try:
            data = os.read(fd, 3)
        except BlockingIOError:
            return CBEvent.IGNORE, None
        calls.append(data)
        if not data:
            ctx.close(fd)
            return CBEvent.NO_ERROR, b"after close"
        return CBEvent.NO_ERROR, data

    ctx.set_switch_callbacks(a, on_in, None)
    ctx.pause_reading(a)                # read by the drain only
    x2.sendall(b"hello world")
    x2.close()
    y2.sendall(frame(b"hi"))            # forwarded to a: its write fails (EPIPE)
    want = frame(b"hel") + frame(b"lo ") + frame(b"wor") + frame(b"ld")
    got = b""
    tick = deadline()
    while len(got) < len(want):
        tick()
        ctx.timer = 0
        ctx.wait_events()
        try:
            got += y2.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
    assert calls == [b"hel", b"lo ", b"wor", b"ld", b""]
    assert got.startswith(want)
    y2.close()


def test_the_drain_after_a_failed_write_is_bounded(ctx_factory):
    """MAX_DRAIN_CALLS: an on_in that hands out messages for ever without
    reading is called that many times after its fd's write failed, not more
    (the loop would never end), then the fd ends as any other."""
    ctx = ctx_factory(linger=0)
    a, x2, b, y2 = _switched_socketpairs(ctx)
    ctx.switch_events = False
    calls = [0]

    def on_in(fd: int):
        calls[0] += 1
        return CBEvent.NO_ERROR, b""

    ctx.set_switch_callbacks(a, on_in, None)
    ctx.pause_reading(a)                # called by the drain only
    ctx.pause_reading(b)
    x2.close()
    ctx.pause_reading(b, False)
    y2.sendall(frame(b"hi"))            # forwarded to a: its write fails (EPIPE)
    collect(ctx, lambda evs: any(e.type == EventType.DISCONNECTION and e.fd == a
                                 for e in evs))
    assert calls[0] == pyipc.MAX_DRAIN_CALLS
    y2.close()


def test_close_all_from_a_callback_ends_the_wait_that_ran_it(ctx_factory):
    """A callback closes everything: the wait that ran it has nothing left to
    wait for and says so at once (it waited its whole timeout, or for ever
    without one)."""
    import time
    ctx = ctx_factory()
    a, x2, b, y2 = _switched_socketpairs(ctx)

    def on_in(fd: int):
        os.read(fd, 100)
        ctx.close_all()
        return CBEvent.IGNORE, None

    ctx.set_switch_callbacks(a, on_in, None)
    x2.sendall(b"bye")
    start = time.monotonic()
    with pytest.raises(pyipc.IPCError, match="nothing to wait for: no fd and no timer"):
        ctx.wait_events(timeout=5)
    assert time.monotonic() - start < 2
    x2.close()
    y2.close()


def test_a_close_inside_a_callback_lingers_writing_only(ctx_factory, caplog):
    """close() of fds with scheduled messages from inside a callback: a
    linger there ran rounds of the loop under the loop that called the
    callback (native read another connection into the buffer the outer read
    was still decoding: the frames after the one being forwarded were
    replaced by that connection's bytes). On both backends it only writes:
    what fits goes out, the rest is dropped with its WARNING when the linger
    ends, and nothing else is read meanwhile."""
    import logging
    ctx = ctx_factory(linger=0.3)
    a, x2, b, y2 = _switched_socketpairs(ctx)
    c1, c2 = socket.socketpair()        # a connection whose peer never reads
    stuck = c1.detach()
    ctx.add_connection(stuck)
    ctx.schedule(stuck, bytes(4 << 20))
    e1, e2 = socket.socketpair()        # one whose scheduled message fits
    fits = e1.detach()
    ctx.add_connection(fits)
    ctx.schedule(fits, b"goodbye")
    d1, d2 = socket.socketpair()        # one that sends while the callback runs
    other = d1.detach()
    ctx.add_connection(other)
    p1, p2 = socket.socketpair()        # another switched pair, with an on_in
    q1, q2 = socket.socketpair()
    p, q = p1.detach(), q1.detach()
    ctx.add_connection(p)
    ctx.add_connection(q)
    ctx.add_switch(p, q)
    closed: list[bool] = []
    nested: list[bool] = []             # on_in calls, and whether inside on_out

    def on_in(fd: int):
        nested.append(inside[0])
        return CBEvent.NO_ERROR, os.read(fd, 100)

    inside = [False]

    def on_out(fd: int, payload: bytes):
        if not closed:
            inside[0] = True
            d2.sendall(frame(b"DDDDD") * 3)
            p2.sendall(b"PPP")
            ctx.close(fits)
            ctx.close(stuck)
            inside[0] = False
            closed.append(True)
        os.write(fd, payload)
        return CBEvent.NO_ERROR

    ctx.set_switch_callbacks(b, None, on_out)
    ctx.set_switch_callbacks(p, on_in, None)
    x2.sendall(frame(b"AAAAA") * 3)     # one read decodes all three
    got, got_q = bytearray(), bytearray()
    messages: list[tuple[int, bytes]] = []
    tick = deadline()
    with caplog.at_level(logging.WARNING, logger="pyipc"):
        while len(got) < 15 or len(messages) < 3 or len(got_q) < 7:
            tick()
            ctx.timer = 0
            messages += [(e.fd, e.message) for e in ctx.wait_events()
                         if e.type == EventType.MESSAGE_RX]
            for sock, into in ((y2, got), (q2, got_q)):
                try:
                    into += sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
    assert got == b"AAAAA" * 3
    assert messages == [(other, b"DDDDD")] * 3
    assert nested == [False]            # not run by the close inside on_out
    assert got_q == frame(b"PPP")
    e2.settimeout(10)
    assert read_exactly(e2, 11) == frame(b"goodbye")
    assert e2.recv(1) == b""
    assert [r.getMessage() for r in caplog.records] == \
        [f"closing fd {stuck} discards 1 scheduled message(s)"]
    for s in (x2, y2, c2, d2, e2, p2, q2):
        s.close()


def test_add_switch_refuses_a_side_whose_switch_ended_and_drains(ctx_factory):
    """After switch_end, the other side writes what is queued for it, then
    closes. add_switch took it as free: when its drain ended, it closed its
    new partner too. Refused as switch_send refuses it, on both backends."""
    ctx = ctx_factory(linger=0)
    a, x2, b, y2 = _switched_socketpairs(ctx)
    ctx.switch_send(b, bytes(1 << 20))      # more than the socketpair holds
    ctx.switch_end(a)                       # a closed; b drains
    z1, z2 = socket.socketpair()
    c = z1.detach()
    ctx.add_connection(c)
    with pytest.raises(pyipc.ConnectionClosedError,
                       match=f"^connection on fd {b} is closed by the peer$"):
        ctx.add_switch(b, c)
    with pytest.raises(pyipc.ConnectionClosedError):
        ctx.add_switch(c, b)
    # c is untouched: still a plain connection.
    z2.sendall(frame(b"still mine"))
    assert [e.message for e in wait_for(ctx, EventType.MESSAGE_RX)
            if e.type == EventType.MESSAGE_RX] == [b"still mine"]
    for s in (x2, y2, z2):
        s.close()


def test_pure_a_relaying_callback_writes_no_wake_up(rundir, monkeypatch):
    """A switch callback that relays with switch_send() is a nested call of
    the loop: pure's nested calls raise the wake-up pipe when events are
    pending (for a read they interrupted), which in a callback, where no
    read can wait, cost a write(2) and a spurious wake-up per message.
    White-box: pure only."""
    from pyipc._pure.context import PureContext
    server = pyipc.Context(rundir=rundir, backend="pure")
    client = pyipc.Context(rundir=rundir, backend="pure")
    wakes: list[int] = []
    real = PureContext._wakeup
    monkeypatch.setattr(PureContext, "_wakeup", lambda self: (wakes.append(1), real(self)))
    try:
        server.service_init("lines")
        cfd = client.connect_service("lines")
        conn = next(ev.fd for ev in server.wait_events(timeout=5)
                    if ev.type == EventType.CONNECTION)
        inner, outer = socket.socketpair()
        fd = inner.detach()
        server.add_external(fd)
        server.add_switch(fd, conn)

        def on_out(f: int, payload: bytes) -> CBEvent:
            server.switch_send(f, payload + b"\n")
            return CBEvent.NO_ERROR
        server.set_switch_callbacks(fd, None, on_out)
        client.write_many(cfd, [b"m%d" % i for i in range(100)])
        got = b""
        outer.settimeout(0.05)
        for _ in range(1000):       # rounds: each relays what came and flushes
            if got.count(b"\n") == 100:
                break
            server.wait_events(timeout=0)           # (switch_send's bytes make no event)
            try:
                got += outer.recv(1 << 16)
            except socket.timeout:
                pass
        assert got.split(b"\n")[:100] == [b"m%d" % i for i in range(100)]
        assert wakes == []
        outer.close()
    finally:
        server.close_all()
        client.close_all()
