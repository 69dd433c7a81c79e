"""Every EventType, with its fd, index and payload, on both backends; slot
indexes; wait_events returning one whole round in order."""

from __future__ import annotations

import os
import socket

import pytest

import pyipc
from pyipc import CBEvent, EventType

from conftest import collect, frame, quiet, raw_connect, settle, spin_until, unread_bytes, wait_for


def test_connection_event(ctx_factory):
    server, client = ctx_factory(), ctx_factory()
    sfd = server.service_init("ev")
    cfd = client.connect_service("ev")
    ev = wait_for(server, EventType.CONNECTION)[-1]
    assert ev.fd not in (sfd, -1) and ev.index == 1
    assert ev.message is None and ev.error is None
    # The new fd is a real connection: credentials name this process.
    assert server.peer_credentials(ev.fd)[0] == os.getpid()
    assert cfd != ev.fd


def test_message_rx_event_carries_the_message(pair):
    pair.client.write(pair.client_fd, b"hello")
    ev = wait_for(pair.server, EventType.MESSAGE_RX)[-1]
    assert (ev.fd, ev.index, ev.message, ev.error) == \
        (pair.server_fd, pair.server_index, b"hello", None)


def test_message_tx_event_after_schedule(pair):
    pair.client.schedule(pair.client_fd, b"a")
    pair.client.schedule(pair.client_fd, b"")
    events = collect(pair.client, lambda e: len(e) >= 2)
    assert [(e.type, e.fd, e.message, e.error) for e in events] == \
        [(EventType.MESSAGE_TX, pair.client_fd, None, None)] * 2
    assert events[0].index == 0
    assert pair.server.read(pair.server_fd) == b"a"
    assert pair.server.read(pair.server_fd) == b""


def test_no_message_tx_for_write(pair):
    pair.client.write(pair.client_fd, b"direct")
    assert pair.server.read(pair.server_fd) == b"direct"
    assert quiet(pair.client, 50) == []


def test_disconnection_event_when_peer_closes(pair):
    pair.client.close(pair.client_fd)
    events = wait_for(pair.server, EventType.DISCONNECTION)
    assert [(e.type, e.fd, e.index, e.error) for e in events] == \
        [(EventType.DISCONNECTION, pair.server_fd, pair.server_index, None)]
    # The fd is forgotten (after the next round at the latest).
    assert settle(pair.server) == []
    with pytest.raises(pyipc.UnknownFdError):
        pair.server.write(pair.server_fd, b"x")


def test_disconnection_on_the_client_when_service_closes_it(pair):
    pair.server.close(pair.server_fd)
    ev = wait_for(pair.client, EventType.DISCONNECTION)[-1]
    assert (ev.fd, ev.index, ev.error) == (pair.client_fd, 0, None)


def test_timer_event(ctx_factory):
    ctx = ctx_factory()
    ctx.service_init("t")
    ctx.timer = 0
    ev = ctx.wait_event()
    assert (ev.type, ev.fd, ev.index, ev.message, ev.error) == \
        (EventType.TIMER, -1, -1, None, None)
    assert [e.type for e in ctx.wait_events()] == [EventType.TIMER]


def test_timer_none_waits_for_an_event(pair):
    """With timer None, wait_event blocks until something arrives."""
    import threading
    pair.server.timer = None
    t = threading.Timer(0.05, pair.client.write, (pair.client_fd, b"late"))
    t.start()
    try:
        ev = pair.server.wait_event()
    finally:
        t.join()
    assert (ev.type, ev.message) == (EventType.MESSAGE_RX, b"late")


def test_external_event_with_a_pipe(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    try:
        ctx.add_external(r)
        assert quiet(ctx, 30) == []
        os.write(w, b"ping")
        ev = wait_for(ctx, EventType.EXTERNAL)[-1]
        assert (ev.fd, ev.index, ev.message, ev.error) == (r, 0, None, None)
        # pyipc does not read it: still readable, so reported again next round.
        ctx.timer = 0
        assert [e.type for e in ctx.wait_events()] == [EventType.EXTERNAL]
        assert os.read(r, 10) == b"ping"
        assert quiet(ctx, 30) == []
        ctx.close(r)
        with pytest.raises(OSError):
            os.fstat(r)     # the context owned and closed it
    finally:
        os.close(w)


def test_external_fd_closed_by_close_all(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    ctx.add_external(r)
    ctx.close_all()
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


def test_switch_events(ctx_factory):
    server, a, b = ctx_factory(), ctx_factory(), ctx_factory()
    server.service_init("sw")
    afd = a.connect_service("sw")
    sa = wait_for(server, EventType.CONNECTION)[-1]
    bfd = b.connect_service("sw")
    sb = wait_for(server, EventType.CONNECTION)[-1]
    server.add_switch(sa.fd, sb.fd)
    a.write(afd, b"to b")
    events = collect(server, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
    assert [(e.type, e.fd, e.index, e.message) for e in events] == [
        (EventType.SWITCH_RX, sa.fd, sa.index, b"to b"),
        (EventType.SWITCH_TX, sb.fd, sb.index, None)]
    assert b.read(bfd) == b"to b"


def test_error_event_then_disconnection(ctx_factory, rundir):
    server = ctx_factory(max_message_size=10)
    server.service_init("err")
    raw = raw_connect(rundir, "err")
    try:
        conn = wait_for(server, EventType.CONNECTION)[-1]
        raw.sendall(frame(b"ok") + b"\0\0\0\x0b")
        events = collect(server, lambda e: any(x.type == EventType.DISCONNECTION for x in e))
        assert [(e.type, e.fd, e.index, e.message, e.error) for e in events] == [
            (EventType.MESSAGE_RX, conn.fd, conn.index, b"ok", None),
            (EventType.ERROR, conn.fd, conn.index, None,
             "message of 11 bytes exceeds max_message_size (10)"),
            (EventType.DISCONNECTION, conn.fd, conn.index, None, None)]
        assert raw.recv(10) == b""      # the service closed it
    finally:
        raw.close()


def test_index_is_the_lowest_free_slot_and_is_reused(ctx_factory):
    server = ctx_factory()
    server.service_init("idx")                      # slot 0
    clients = [ctx_factory() for _ in range(4)]
    conns = []
    for c in clients:
        c.connect_service("idx")
        conns.append(wait_for(server, EventType.CONNECTION)[-1])
    assert [e.index for e in conns] == [1, 2, 3, 4]
    # Free slots 2 and 3 (the peers close); the next clients take 2, then 3.
    clients[2].close_all()
    clients[1].close_all()
    gone = collect(server, lambda e: len(e) >= 2)
    assert sorted((e.type, e.index) for e in gone) == [
        (EventType.DISCONNECTION, 2), (EventType.DISCONNECTION, 3)]
    more = [ctx_factory(), ctx_factory(), ctx_factory()]
    new, fds = [], []
    for c in more:
        fds.append(c.connect_service("idx"))
        new.append(wait_for(server, EventType.CONNECTION)[-1])
    assert [e.index for e in new] == [2, 3, 5]
    # A slot stays the connection's for its lifetime.
    more[0].write(fds[0], b"x")
    ev = wait_for(server, EventType.MESSAGE_RX)[-1]
    assert (ev.fd, ev.index) == (new[0].fd, 2)
    clients[3].close_all()
    ev = wait_for(server, EventType.DISCONNECTION)[-1]
    assert (ev.fd, ev.index) == (conns[3].fd, 4)


def test_index_of_close_and_external(ctx_factory):
    ctx = ctx_factory()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        s = ctx.service_init("slots")            # 0
        ctx.add_external(r1)                     # 1
        ctx.close(s)                             # frees 0
        ctx.add_external(r2)                     # takes 0
        os.write(w1, b"x")
        os.write(w2, b"x")
        events = collect(ctx, lambda e: len(e) >= 2)
        assert sorted((e.fd, e.index) for e in events) == sorted([(r1, 1), (r2, 0)])
    finally:
        os.close(w1)
        os.close(w2)


def test_wait_events_returns_a_whole_round_in_order(pair):
    raw = b"".join(frame(b"m%d" % i) for i in range(50))
    os.write(pair.client_fd, raw)      # one send: all in the same round
    spin_until(lambda: not (unread_bytes(pair.server_fd) < len(raw)))
    events = pair.server.wait_events()
    assert [e.message for e in events] == [b"m%d" % i for i in range(50)]
    assert all(e.type == EventType.MESSAGE_RX for e in events)
    pair.server.timer = 0
    assert [e.type for e in pair.server.wait_events()] == [EventType.TIMER]


def test_wait_event_keeps_the_rest_of_the_round(pair):
    raw = b"".join(frame(b"%d" % i) for i in range(5))
    os.write(pair.client_fd, raw)
    spin_until(lambda: not (unread_bytes(pair.server_fd) < len(raw)))
    assert pair.server.wait_event().message == b"0"
    assert pair.server.wait_event().message == b"1"
    assert [e.message for e in pair.server.wait_events()] == [b"2", b"3", b"4"]


def test_one_round_covers_several_connections(ctx_factory):
    server = ctx_factory()
    server.service_init("many")
    clients = []
    for i in range(3):
        c = ctx_factory()
        fd = c.connect_service("many")
        clients.append((c, fd))
    collect(server, lambda e: len(e) >= 3)
    for i, (c, fd) in enumerate(clients):
        c.write(fd, b"from %d" % i)
    events = collect(server, lambda e: len(e) >= 3)
    assert sorted(e.message for e in events) == [b"from 0", b"from 1", b"from 2"]


def test_close_drops_pending_events_of_that_fd(pair):
    raw = b"".join(frame(b"%d" % i) for i in range(3))
    os.write(pair.client_fd, raw)
    spin_until(lambda: not (unread_bytes(pair.server_fd) < len(raw)))
    assert pair.server.wait_event().message == b"0"
    pair.server.close(pair.server_fd)
    pair.server.timer = 0
    assert [e.type for e in pair.server.wait_events()] == [EventType.TIMER]


def test_switch_callback_events_fd_and_index(ctx_factory):
    ctx = ctx_factory()
    left, right = socket.socketpair()
    r, w = os.pipe()
    try:
        ctx.add_external(left.fileno())
        ctx.add_external(r)
        ctx.add_switch(left.fileno(), r)
        ctx.set_switch_callbacks(r, lambda fd: (CBEvent.NO_ERROR, os.read(fd, 100)), None)
        os.write(w, b"raw bytes")
        events = collect(ctx, lambda e: any(x.type == EventType.SWITCH_TX for x in e))
        assert [(e.type, e.fd, e.index, e.message) for e in events] == [
            (EventType.SWITCH_RX, r, 1, b"raw bytes"),
            (EventType.SWITCH_TX, left.fileno(), 0, None)]
        assert right.recv(100) == frame(b"raw bytes")
    finally:
        left.detach()
        right.close()
        os.close(w)


def test_event_is_an_immutable_value():
    """Events are values (a named tuple): equal by their fields, hashable,
    never changed once made, so a batch may hold one object several times."""
    ev = pyipc.Event(EventType.MESSAGE_RX, 5, 1, b"hi")
    assert ev == pyipc.Event(EventType.MESSAGE_RX, fd=5, index=1, message=b"hi", error=None)
    assert ev != pyipc.Event(EventType.MESSAGE_RX, 5, 2, b"hi")
    assert hash(ev) == hash(pyipc.Event(EventType.MESSAGE_RX, 5, 1, b"hi"))
    kind, fd, index, message, error = ev
    assert (kind, fd, index, message, error) == (EventType.MESSAGE_RX, 5, 1, b"hi", None)
    with pytest.raises(AttributeError):
        ev.fd = 6      # type: ignore[misc]
    assert pyipc.Event(EventType.TIMER) == (EventType.TIMER, -1, -1, None, None)


def test_a_round_of_message_tx_on_two_fds_counts_each_message(ctx_factory):
    """A sender's round of MESSAGE_TX on two connections (both backends
    report a run on one fd as one repeated Event): one event per scheduled
    message, each with its own fd and index."""
    server, client = ctx_factory(), ctx_factory()
    server.service_init("tx2")
    a, b = client.connect_service("tx2"), client.connect_service("tx2")
    for i in range(300):
        client.schedule(a, b"a%d" % i)
        if i % 3 == 0:
            client.schedule(b, b"b%d" % i)
    events = collect(client, lambda e: len(e) >= 400)
    assert len(events) == 400
    assert all(e.type == EventType.MESSAGE_TX and e.message is None for e in events)
    assert sorted((e.fd, e.index) for e in events) == sorted([(a, 0)] * 300 + [(b, 1)] * 100)


def test_a_round_of_message_rx_from_two_connections_keeps_each_order(ctx_factory):
    """A receiver's round from two connections, sizes mixed (the native
    backend decodes a round of MESSAGE_RX by columns): every message once,
    whole, with its sender's fd and index, in each sender's order."""
    server = ctx_factory()
    server.service_init("rx2")
    clients = [ctx_factory() for _ in range(2)]
    fds = [c.connect_service("rx2") for c in clients]
    joined = collect(server, lambda e: len(e) >= 2)
    index_of = {e.fd: e.index for e in joined}
    sent = {0: [b"x" * (i % 7) + b"%d" % i for i in range(200)],
            1: [b"y" * 64 for _ in range(150)]}
    for k, c in enumerate(clients):
        c.write_many(fds[k], sent[k])
    events = collect(server, lambda e: len(e) >= 350)
    assert all(e.type == EventType.MESSAGE_RX for e in events)
    by_fd: dict[int, list[bytes]] = {}
    for e in events:
        assert e.index == index_of[e.fd]
        by_fd.setdefault(e.fd, []).append(e.message)
    assert sorted(by_fd.values(), key=len, reverse=True) == [sent[0], sent[1]]


def test_rounds_of_equal_sized_messages_arrive_whole_and_in_order(pair):
    """Thousands of equal-sized messages, each different (the native backend
    cuts a round of equal sizes from the pieces of memory the core copied
    them into, one 64 KiB chunk each): every payload once, in order."""
    sent = [b"%064d" % i for i in range(4000)]
    got = []
    for start in range(0, len(sent), 2000):      # 2,000 frames (136 KB) fit the socket
        pair.client.write_many(pair.client_fd, sent[start:start + 2000])
        got += collect(pair.server, lambda e: len(e) >= 2000)
    assert [e.message for e in got] == sent


def test_native_payload_pieces():
    """White box: the runs of evenly spaced payload addresses."""
    from conftest import require_backend
    require_backend("native")
    from pyipc._native_events import MAX_PIECES, _pieces
    assert _pieces([10, 15, 20], 5) == [(10, 3)]
    assert _pieces([10, 15, 20, 100, 105, 3], 5) == [(10, 3), (100, 2), (3, 1)]
    assert _pieces([10, 16, 22], 5) == [(10, 1), (16, 1), (22, 1)]
    assert _pieces(list(range(0, 5 * (MAX_PIECES + 1), 5))[::-1], 5) is None


def test_a_round_of_empty_messages(pair):
    """Empty payloads in one round (their addresses in the core mean nothing)."""
    pair.client.write_many(pair.client_fd, [b""] * 300)
    events = collect(pair.server, lambda e: len(e) >= 300)
    assert [e.message for e in events] == [b""] * 300


def test_wait_events_leaves_the_cyclic_gc_as_it_was(pair):
    """The native backend pauses the cyclic GC while it makes a batch of
    Events (they cannot form cycles): enabled or disabled by the program, the
    GC is as it was when wait_events() returns, or raises."""
    import gc
    was = gc.isenabled()
    try:
        for enabled in (True, False, True):
            gc.enable() if enabled else gc.disable()
            pair.client.write_many(pair.client_fd, [b"m"] * 50)
            assert len(collect(pair.server, lambda e: len(e) >= 50)) == 50
            assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
