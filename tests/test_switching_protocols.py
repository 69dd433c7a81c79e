"""The switching extension for protocol daemons (WebSocket, TLS): on_in
returning MORE, switch_send(), switch_end() and switch_events, on both
backends with the same behaviour and the same error texts."""

from __future__ import annotations

import os
import selectors
import socket
import threading

import pytest

import pyipc
from pyipc import CBEvent, EventType, MAX_MORE_PER_ROUND, MAX_SWITCH_END_REASON

from conftest import collect, deadline, frame, quiet, raises, settle, spin_until, wait_for

RX, TX = EventType.SWITCH_RX, EventType.SWITCH_TX
DISC = EventType.DISCONNECTION


class Lines:
    """A foreign protocol of newline-ended records, read the way a protocol
    daemon reads: one read() may bring many records; on_in hands them out one
    by one, returning MORE while it still holds some (no read in between)."""

    def __init__(self, ctx: pyipc.Context) -> None:
        self.ctx = ctx
        self.held: list[bytes] = []
        self.partial = b""
        self.calls = 0
        self.reads = 0
        #: on_in calls per wait_events() call of the test (one round each).
        self.calls_per_round: list[int] = []

    def on_in(self, fd: int):
        self.calls += 1
        if not self.held:                       # read only when nothing is held
            self.reads += 1
            data = os.read(fd, 1 << 20)
            if not data:
                return CBEvent.FD_CLOSING, None
            *self.held, self.partial = (self.partial + data).split(b"\n")
        while self.held:
            record = self.held.pop(0)
            if record == b"ping":               # answered by the protocol itself
                self.ctx.switch_send(fd, b"pong\n")
                continue
            if record == b"quit":               # the protocol's own end
                self.ctx.switch_send(fd, b"bye\n")
                self.ctx.switch_end(fd, "client quit")
                return CBEvent.IGNORE, None
            return (CBEvent.MORE if self.held else CBEvent.NO_ERROR), record
        return CBEvent.IGNORE, None             # nothing whole yet

    def on_out(self, fd: int, payload: bytes):
        # The protocol's output goes through the core's queue: in order with
        # switch_send's, with back-pressure, never a partial record.
        self.ctx.switch_send(fd, payload + b"\n")
        return CBEvent.NO_ERROR


class Gateway:
    """A service with one pyipc client, whose connection in the service is
    switched to one end of a socketpair speaking Lines (the foreign peer
    holds the other end: `outer`)."""

    def __init__(self, make, **limits) -> None:
        self.server = make(**limits)
        self.server.service_init("gw")
        self.client = make()
        self.cfd = self.client.connect_service("gw")
        self.conn = wait_for(self.server, EventType.CONNECTION)[-1].fd
        inner, self.outer = socket.socketpair()
        self.fd = inner.detach()                # the context owns it now
        self.proto = Lines(self.server)
        self.server.add_external(self.fd)
        self.server.add_switch(self.fd, self.conn)
        self.server.set_switch_callbacks(self.fd, self.proto.on_in, self.proto.on_out)
        #: The server's events (not TIMER) seen by run_server().
        self.events: list[pyipc.Event] = []

    def run_server(self) -> None:
        """One round of the server, its events (not TIMER) kept in `events`."""
        self.server.timer = 0
        self.events += [e for e in self.server.wait_events() if e.type != EventType.TIMER]

    def received(self, n: int) -> bytes:
        """What the foreign peer reads, until `n` bytes (the server runs meanwhile)."""
        data = b""
        tick = deadline()
        while len(data) < n:
            tick()
            self.run_server()
            try:
                data += self.outer.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        return data

    def at_end(self) -> bool:
        """The foreign peer reads the end (EOF) next, with nothing before it
        (the server runs meanwhile: an ended fd is closed by its next round)."""
        tick = deadline()
        while True:
            tick()
            self.run_server()
            try:
                return self.outer.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                pass

    def client_messages(self, n: int) -> list[bytes]:
        got: list[bytes] = []
        tick = deadline()
        while len(got) < n:
            tick()
            self.run_server()
            self.client.timer = 0
            got += [e.message for e in self.client.wait_events()
                    if e.type == EventType.MESSAGE_RX]
        return got


@pytest.fixture
def gateway(ctx_factory):
    gw = Gateway(ctx_factory)
    try:
        yield gw
    finally:
        gw.outer.close()


def rounds(ctx: pyipc.Context, proto: Lines, until) -> list[list[pyipc.Event]]:
    """wait_events() calls (each one round that brought events) until
    `until(all events)`; proto.calls_per_round gets each round's on_in calls."""
    batches: list[list[pyipc.Event]] = []
    tick = deadline()
    while not until([e for b in batches for e in b]):
        tick()
        before = proto.calls
        ctx.timer = 1000
        batch = [e for e in ctx.wait_events() if e.type != EventType.TIMER]
        proto.calls_per_round.append(proto.calls - before)
        batches.append(batch)
    return batches


# -- MORE ----------------------------------------------------------------------
def test_more_delivers_every_payload_of_one_read_in_order(gateway):
    n = 3 * MAX_MORE_PER_ROUND + 8              # past the round bound, three times
    records = [b"record %d" % i for i in range(n)]
    gateway.outer.sendall(b"".join(r + b"\n" for r in records))
    rounds(gateway.server, gateway.proto,
           lambda evs: sum(e.type == RX for e in evs) == n)
    assert gateway.proto.reads == 1             # one read brought them all
    # At most MAX_MORE_PER_ROUND calls a round; the rest in the next rounds,
    # though the fd was not readable any more.
    assert gateway.proto.calls_per_round == [MAX_MORE_PER_ROUND] * 3 + [8]
    assert gateway.client_messages(n) == records


def test_more_lets_another_connection_be_served_between_rounds(ctx_factory):
    gw = Gateway(ctx_factory)
    try:
        other = ctx_factory()
        ofd = other.connect_service("gw")
        oconn = wait_for(gw.server, EventType.CONNECTION)[-1].fd
        n = 4 * MAX_MORE_PER_ROUND
        gw.outer.sendall(b"".join(b"r%d\n" % i for i in range(n)))
        other.write(ofd, b"first")              # both ready before the first round
        batches = rounds(gw.server, gw.proto,
                         lambda evs: any(e.type == EventType.MESSAGE_RX for e in evs))
        assert len(batches) == 1 and gw.proto.calls_per_round == [MAX_MORE_PER_ROUND]
        # MORE still due: the other connection is served in the next rounds too.
        other.write(ofd, b"second")
        batches = rounds(gw.server, gw.proto,
                         lambda evs: any(e.type == EventType.MESSAGE_RX for e in evs))
        assert len(batches) == 1 and gw.proto.calls_per_round[-1] == MAX_MORE_PER_ROUND
        msgs = [(e.fd, e.message) for e in batches[0] if e.type == EventType.MESSAGE_RX]
        assert msgs == [(oconn, b"second")]
        rx = [e.message for e in batches[0] if e.type == RX]
        assert rx == [b"r%d" % i for i in range(MAX_MORE_PER_ROUND, 2 * MAX_MORE_PER_ROUND)]
        assert gw.client_messages(n) == [b"r%d" % i for i in range(n)]
    finally:
        gw.outer.close()


@pytest.mark.parametrize("events", [True, False])
def test_more_under_a_loop_driven_by_fileno(ctx_factory, events):
    """fileno() stays readable while MORE calls are due (their input is in
    the callback, not in any socket), so a selectors/asyncio loop that only
    calls wait_events(timeout=0) when it is readable gets every record. Here
    neither side queues anything (on_out writes at once) and, with
    switch_events off, no event is pending either."""
    s = ctx_factory()
    a_in, a_out = socket.socketpair()
    b_in, b_out = socket.socketpair()
    try:
        fa, fb = a_in.detach(), b_in.detach()
        s.add_external(fa)
        s.add_external(fb)
        s.add_switch(fa, fb)
        s.set_switch_callbacks(fa, Lines(s).on_in, None)

        def on_out(fd: int, payload: bytes) -> CBEvent:
            os.write(fd, payload + b"\n")
            return CBEvent.NO_ERROR
        s.set_switch_callbacks(fb, None, on_out)
        s.switch_events = events
        n = 3 * MAX_MORE_PER_ROUND + 1
        records = b"".join(b"r%d\n" % i for i in range(n))
        a_out.sendall(records)
        got = b""
        with selectors.DefaultSelector() as sel:
            sel.register(s.fileno(), selectors.EVENT_READ)
            tick = deadline()
            while len(got) < len(records):
                tick()
                if sel.select(timeout=0.5):
                    s.wait_events(timeout=0)
                try:
                    got += b_out.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        assert got == records
    finally:
        a_out.close()
        b_out.close()


def test_more_waits_while_the_peer_queue_is_over_its_bound(ctx_factory):
    """Back-pressure holds MORE calls as it holds reads: the client does not
    read, so its queue stays over max_queue_size; nothing is lost."""
    gw = Gateway(ctx_factory, max_message_size=1000, max_queue_size=4000)
    try:
        record = b"x" * 900
        n = 2 * MAX_MORE_PER_ROUND
        # The client's connection takes a few KiB at most (the kernel's
        # smallest send buffer), so the server's queue for it fills.
        with socket.socket(fileno=os.dup(gw.conn)) as conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        gw.outer.sendall(b"".join(record + b"\n" for _ in range(n)))
        # The server's queue fills past its bound and the calls stop (at most
        # one record past it).
        settle(gw.server)
        calls = gw.proto.calls
        assert calls < n
        assert settle(gw.server) == [] and gw.proto.calls == calls
        assert gw.client_messages(n) == [record] * n     # reading resumes them
    finally:
        gw.outer.close()


def test_more_needs_a_payload(gateway):
    """(MORE, None) is an error, as (NO_ERROR, None): a unit with nothing to
    forward (a ping) is handled inside on_in, which goes on to the next."""
    gateway.server.set_switch_callbacks(gateway.fd, lambda fd: (CBEvent.MORE, None), None)
    gateway.outer.sendall(b"x")
    events = collect(gateway.server, lambda e: sum(x.type == DISC for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.ERROR, gateway.fd, f"switch callback failed on fd {gateway.fd}"),
        (DISC, gateway.fd, None),
        (DISC, gateway.conn, None)]


def test_a_ping_among_records_is_answered_and_the_rest_forwarded(gateway):
    gateway.outer.sendall(b"a\nping\nb\nping\n")
    assert gateway.client_messages(2) == [b"a", b"b"]
    assert gateway.received(10) == b"pong\npong\n"


def test_more_from_on_out_is_an_error(gateway):
    gateway.server.set_switch_callbacks(gateway.fd, gateway.proto.on_in,
                                        lambda fd, p: CBEvent.MORE)
    gateway.client.write(gateway.cfd, b"x")
    events = collect(gateway.server, lambda e: sum(x.type == DISC for x in e) >= 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (RX, gateway.conn, None),
        (EventType.ERROR, gateway.fd, f"switch callback failed on fd {gateway.fd}"),
        (DISC, gateway.fd, None),
        (DISC, gateway.conn, None)]


# -- switch_send ------------------------------------------------------------------
def test_switch_send_replies_in_order_with_on_out_output(gateway):
    gateway.client.write(gateway.cfd, b"one")
    assert gateway.received(4) == b"one\n"
    gateway.outer.sendall(b"ping\n")            # on_in answers with switch_send
    assert gateway.received(5) == b"pong\n"
    gateway.client.write(gateway.cfd, b"two")
    assert gateway.received(4) == b"two\n"
    assert gateway.client_messages(0) == []     # the ping itself went nowhere


def test_switch_send_keeps_order_behind_a_full_socket(gateway):
    """The foreign peer does not read: switch_send's bytes and on_out's wait
    in one queue, and come out exactly in the order they were made."""
    big = os.urandom(1 << 20)                   # more than the socketpair holds
    gateway.server.switch_send(gateway.fd, big)
    for i in range(50):
        gateway.client.write(gateway.cfd, b"m%d" % i)
        wait_for(gateway.server, TX)            # on_out ran (and queued its line)
        if i % 10 == 0:
            gateway.server.switch_send(gateway.fd, b"raw%d\n" % i)
    expected = big + b"".join(
        b"m%d\n" % i + (b"raw%d\n" % i if i % 10 == 0 else b"") for i in range(50))
    assert gateway.received(len(expected)) == expected


def test_switch_send_to_a_framed_side_goes_between_its_frames(gateway):
    """switch_send on the pyipc side: raw bytes in the frame stream (here, a
    frame made by hand) keep their place among forwarded messages."""
    gateway.outer.sendall(b"a\n")
    assert gateway.client_messages(1) == [b"a"]
    gateway.server.switch_send(gateway.conn, frame(b"made by hand"))
    gateway.outer.sendall(b"b\n")
    assert gateway.client_messages(2) == [b"made by hand", b"b"]


def test_switch_send_queue_bound_at_and_past_its_edge(ctx_factory):
    gw = Gateway(ctx_factory, max_message_size=100, max_queue_size=1000)
    try:
        s = gw.server
        raises(pyipc.QueueFullError, "switch_send of 1001 bytes exceeds max_queue_size (1000)",
               s.switch_send, gw.fd, b"z" * 1001)
        s.switch_send(gw.fd, b"a" * 1000)       # exactly the bound: taken
        s.switch_send(gw.fd, b"b")              # the queue is at, not over, its bound
        raises(pyipc.QueueFullError,
               f"send queue of fd {gw.fd} is full (1001 bytes queued, max_queue_size 1000)",
               s.switch_send, gw.fd, b"c")
        assert gw.received(1001) == b"a" * 1000 + b"b"   # nothing lost, nothing more
        s.switch_send(gw.fd, b"")               # written: room again
        s.switch_send(gw.fd, b"c")
        assert gw.received(1) == b"c"
    finally:
        gw.outer.close()


def test_a_slow_foreign_reader_holds_the_other_side_back(ctx_factory):
    """on_out writes through switch_send: while the foreign peer does not read,
    the fd's queue goes over max_queue_size, the pyipc side is not read any
    more, and its client's messages wait in its own queue; nothing is lost."""
    gw = Gateway(ctx_factory, max_message_size=1000, max_queue_size=10_000)
    try:
        for fd in (gw.fd, gw.cfd):              # the kernel's smallest buffers
            with socket.socket(fileno=os.dup(fd)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        n, payload = 200, b"p" * 500
        for _ in range(n):
            gw.client.schedule(gw.cfd, payload)
        sent = 0
        for _ in range(50):                     # both loops run; the peer reads nothing
            gw.client.timer = 0
            sent += sum(e.type == EventType.MESSAGE_TX for e in gw.client.wait_events())
            gw.run_server()
        assert sent < n // 2                    # held back: 100 KB did not go through
        expected = (payload + b"\n") * n
        got = b""
        tick = deadline()
        while len(got) < len(expected):         # the peer reads: everything comes
            tick()
            gw.client.timer = 0
            gw.client.wait_events()
            got += gw.received(1)
        assert got == expected
    finally:
        gw.outer.close()


# -- switch_end ---------------------------------------------------------------------
def test_switch_end_flushes_then_closes_both_sides(gateway):
    big = os.urandom(1 << 20)                   # still queued when the switch ends
    gateway.server.switch_send(gateway.fd, big)
    gateway.server.switch_end(gateway.fd, "going away")
    raises(pyipc.ConnectionClosedError,
           f"connection on fd {gateway.fd} is closed by the peer",
           gateway.server.switch_send, gateway.fd, b"late")
    # The pyipc side had nothing queued: closed at once; its client sees it.
    first = collect(gateway.server, lambda e: any(x.type == DISC for x in e))
    assert [(e.type, e.fd, e.error) for e in first] == [
        (EventType.ERROR, gateway.fd, "going away"), (DISC, gateway.conn, None)]
    assert wait_for(gateway.client, DISC)[-1].fd == gateway.cfd
    # The foreign side gets every queued byte, then the end; then its DISCONNECTION.
    gateway.events = []
    assert gateway.received(len(big)) == big
    assert gateway.at_end()
    assert [(e.type, e.fd) for e in gateway.events] == [(DISC, gateway.fd)]


def test_switch_end_reports_in_order(gateway):
    gateway.server.switch_end(gateway.conn)     # nothing queued: both close now
    events = settle(gateway.server)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (DISC, gateway.conn, None), (DISC, gateway.fd, None)]
    assert wait_for(gateway.client, DISC)[-1].fd == gateway.cfd
    assert gateway.at_end()


def test_switch_end_from_inside_on_in(gateway):
    gateway.outer.sendall(b"hello\nquit\nignored after the end\n")
    assert gateway.client_messages(1) == [b"hello"]
    assert gateway.received(4) == b"bye\n"
    assert gateway.at_end()
    assert wait_for(gateway.client, DISC)[-1].fd == gateway.cfd
    events = gateway.events + settle(gateway.server)
    # Each side's own events in order (the two sides' flushes may come in
    # either order: each backend walks its queues its own way).
    assert per_fd(events, gateway.fd) == [
        (RX, b"hello"), (EventType.ERROR, "client quit"), (DISC, None)]
    assert per_fd(events, gateway.conn) == [(TX, None), (DISC, None)]


def per_fd(events: list[pyipc.Event], fd: int) -> list[tuple]:
    return [(e.type, e.message if e.type == RX else e.error) for e in events if e.fd == fd]


# -- switch_events -------------------------------------------------------------------
def test_switch_events_false_reports_no_relay_but_the_end(gateway):
    assert gateway.server.switch_events is True
    gateway.server.switch_events = False
    gateway.outer.sendall(b"in\n")
    gateway.client.write(gateway.cfd, b"out")
    assert gateway.client_messages(1) == [b"in"]
    assert gateway.received(4) == b"out\n"
    assert quiet(gateway.server, 50) == []
    gateway.client.close(gateway.cfd)
    events = collect(gateway.server, lambda e: sum(x.type == DISC for x in e) >= 2)
    assert [(e.type, e.fd) for e in events] == [(DISC, gateway.conn), (DISC, gateway.fd)]


def test_switch_events_false_still_reports_errors(gateway):
    gateway.server.switch_events = False
    gateway.server.set_switch_callbacks(gateway.fd, lambda fd: (CBEvent.ERROR, None), None)
    gateway.outer.sendall(b"x")
    events = collect(gateway.server, lambda e: sum(x.type == DISC for x in e) >= 2)
    assert [(e.type, e.fd) for e in events] == [
        (EventType.ERROR, gateway.fd), (DISC, gateway.fd), (DISC, gateway.conn)]


def test_switch_events_back_on(gateway):
    gateway.server.switch_events = False
    gateway.server.switch_events = True
    gateway.outer.sendall(b"in\n")
    events = collect(gateway.server, lambda e: any(x.type == TX for x in e))
    assert [(e.type, e.message) for e in events] == [(RX, b"in"), (TX, None)]


def test_a_quiet_switched_pair_relays_10000_messages(ctx_factory):
    server = ctx_factory()
    server.service_init("board")
    a, b = ctx_factory(), ctx_factory()
    afd = a.connect_service("board")
    sa = wait_for(server, EventType.CONNECTION)[-1].fd
    bfd = b.connect_service("board")
    sb = wait_for(server, EventType.CONNECTION)[-1].fd
    server.add_switch(sa, sb)
    server.switch_events = False
    n = 10_000
    for i in range(n):
        a.schedule(afd, b"%d" % i)
    got: list[bytes] = []
    seen: list[pyipc.Event] = []
    tick = deadline(60)
    while len(got) < n:
        tick()
        for ctx in (a, server):
            ctx.timer = 0
            evs = ctx.wait_events()
            if ctx is server:
                seen += [e for e in evs if e.type != EventType.TIMER]
        b.timer = 0
        got += [e.message for e in b.wait_events() if e.type == EventType.MESSAGE_RX]
    assert got == [b"%d" % i for i in range(n)]
    assert seen == []
    # Still relaying, both ways.
    b.write(bfd, b"back")
    a.write(afd, b"again")
    settle(server)
    assert a.read(afd, timeout=10) == b"back"
    assert b.read(bfd, timeout=10) == b"again"


# -- misuse ----------------------------------------------------------------------------
def test_misuse_raises_the_same_errors_on_both_backends(gateway, ctx_factory):
    s = gateway.server
    raises(pyipc.UnknownFdError, "fd 9999 is not managed by this context",
           s.switch_send, 9999, b"x")
    raises(pyipc.UnknownFdError, "fd 9999 is not managed by this context",
           s.switch_end, 9999)
    other = ctx_factory()
    other.connect_service("gw")
    plain = wait_for(s, EventType.CONNECTION)[-1].fd
    raises(pyipc.UnknownFdError, f"fd {plain} is not switched", s.switch_send, plain, b"x")
    raises(pyipc.UnknownFdError, f"fd {plain} is not switched", s.switch_end, plain)
    service = s.service_init("gw2")
    raises(pyipc.UnknownFdError, f"fd {service} is not switched", s.switch_send, service, b"x")
    for bad in ("text", 3, None, [1]):
        with pytest.raises(TypeError, match="data must be bytes-like"):
            s.switch_send(gateway.fd, bad)
    with pytest.raises(TypeError, match="fd must be int"):
        s.switch_send("3", b"x")
    with pytest.raises(TypeError, match="reason must be str or None, not bytes"):
        s.switch_end(gateway.fd, b"why")
    # Python's text names Python's None (the core's, for C, names NULL).
    with pytest.raises(ValueError, match=r"^reason must not be empty \(None for no reason\)$"):
        s.switch_end(gateway.fd, "")
    with pytest.raises(ValueError, match=f"at most {MAX_SWITCH_END_REASON} bytes"):
        s.switch_end(gateway.fd, "é" * (MAX_SWITCH_END_REASON // 2 + 1))
    with pytest.raises(UnicodeEncodeError):
        s.switch_end(gateway.fd, "\udc80")
    with pytest.raises(TypeError, match="switch_events must be bool, not int"):
        s.switch_events = 1
    assert s.switch_events is True
    # None of it changed anything: the switch still works.
    gateway.client.write(gateway.cfd, b"still")
    assert gateway.received(6) == b"still\n"
    # The longest reason is taken whole.
    reason = "r" * MAX_SWITCH_END_REASON
    s.switch_end(gateway.fd, reason)
    events = settle(s)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.ERROR, gateway.fd, reason), (DISC, gateway.fd, None),
        (DISC, gateway.conn, None)]
    # Ended and released: no longer known.
    raises(pyipc.UnknownFdError, f"fd {gateway.fd} is not managed by this context",
           s.switch_end, gateway.fd)


def test_only_the_owner_thread_may_call_them(gateway):
    """Callbacks run in the owner's wait (so the calls work there, as the
    tests above show); another thread, while the owner is inside, is refused
    with the usual IPCError and nothing changes."""
    s = gateway.server
    outcome: list[object] = []
    owner = threading.Thread(target=lambda: outcome.append(s.wait_event(timeout=10)))
    owner.start()
    spin_until(lambda: s._guard._owner == owner.ident)
    busy = ("context is in use by another thread (a context belongs to one thread "
            "at a time; other threads may only call schedule(), write(), write_many() "
            "and close())")
    raises(pyipc.IPCError, busy, s.switch_send, gateway.fd, b"x")
    raises(pyipc.IPCError, busy, s.switch_end, gateway.fd)
    gateway.outer.sendall(b"wake\n")
    owner.join(10)
    assert not owner.is_alive()
    ev = outcome[0]
    assert isinstance(ev, pyipc.Event) and (ev.type, ev.message) == (RX, b"wake")
    gateway.client.write(gateway.cfd, b"still switched")
    assert gateway.received(15) == b"still switched\n"


# -- what schedule() queued, around switch_send, switch_end and callbacks -------------
def test_a_scheduled_message_goes_before_a_later_switch_send(gateway):
    """schedule() then switch_send() on the same fd: out in that order (the
    native backend's schedule() buffer goes to the core first)."""
    gateway.server.schedule(gateway.fd, b"AAA")
    gateway.server.switch_send(gateway.fd, b"BBB\n")
    assert gateway.received(len(frame(b"AAA")) + 4) == frame(b"AAA") + b"BBB\n"


def test_a_scheduled_message_is_written_before_switch_end(gateway):
    gateway.server.schedule(gateway.fd, b"CCC")
    gateway.server.switch_end(gateway.fd)
    assert gateway.received(len(frame(b"CCC"))) == frame(b"CCC")
    assert gateway.at_end()


def test_a_message_scheduled_by_a_switch_callback_to_a_peer_gone_in_that_round(
        gateway, ctx_factory):
    """A callback runs inside the core's round: what it schedules is queued
    by the core at once (not left in the native backend's buffer until the
    next call), so when that connection's peer hung up in the same round the
    message is reported unsent with it, as on the pure backend, and no
    later call raises for it."""
    other = ctx_factory()
    other.connect_service("gw")
    oconn = wait_for(gateway.server, EventType.CONNECTION)[-1].fd

    def on_in(fd: int):
        os.read(fd, 100)
        gateway.server.schedule(oconn, b"for a peer that left")
        return CBEvent.IGNORE, None

    gateway.server.set_switch_callbacks(gateway.fd, on_in, gateway.proto.on_out)
    gateway.outer.sendall(b"x\n")              # readable first (epoll keeps the order),
    other.close_all()                           # then the hang-up
    events = collect(gateway.server, lambda seen: any(
        e.type == EventType.DISCONNECTION and e.fd == oconn for e in seen))
    assert [(e.type, e.fd, e.error) for e in events if e.fd == oconn] == [
        (EventType.ERROR, oconn, "peer closed the connection with 1 scheduled message(s) "
                                 "unsent"),
        (EventType.DISCONNECTION, oconn, None)]
    gateway.run_server()                        # nothing left to raise


def test_a_foreign_peer_gone_while_written_to_is_not_read_as_frames(gateway):
    """The foreign peer sent a line and went while bytes were queued for it:
    the failed write ends the switch, and the line is not decoded as pyipc
    frames ("hell" read as a 1.7 GB length: a false ERROR)."""
    gateway.server.set_switch_callbacks(gateway.fd, lambda fd: (CBEvent.IGNORE, None),
                                        gateway.proto.on_out)
    gateway.server.switch_send(gateway.fd, b"y" * (1 << 20))   # more than the pair holds
    gateway.outer.sendall(b"hello\n")
    gateway.outer.close()
    events = collect(gateway.server, lambda seen: sum(
        e.type == EventType.DISCONNECTION for e in seen) == 2)
    assert [(e.type, e.fd, e.error) for e in events] == [
        (EventType.ERROR, gateway.fd, "peer closed the connection with 1 scheduled "
                                      "message(s) unsent"),
        (EventType.DISCONNECTION, gateway.fd, None),
        (EventType.DISCONNECTION, gateway.conn, None)]
