"""Ordering rules: write() after schedule(), read() against pending events."""

from __future__ import annotations

import os

from pyipc import EventType

from conftest import collect, deadline, frame, quiet, spin_until, unread_bytes, wait_for


def test_write_after_schedule_keeps_the_order(pair):
    pair.client.schedule(pair.client_fd, b"A")
    pair.client.schedule(pair.client_fd, b"B")
    pair.client.write(pair.client_fd, b"C")
    assert [pair.server.read(pair.server_fd) for _ in range(3)] == [b"A", b"B", b"C"]
    # MESSAGE_TX of A and B are still reported by the next wait.
    tx = collect(pair.client, lambda e: len(e) >= 2)
    assert [(e.type, e.fd) for e in tx] == [(EventType.MESSAGE_TX, pair.client_fd)] * 2
    assert quiet(pair.client, 30) == []


def test_interleaved_write_and_schedule(pair):
    expected = []
    for i in range(200):
        payload = b"%d" % i * (i % 13)
        expected.append(payload)
        if i % 3:
            pair.client.schedule(pair.client_fd, payload)
        else:
            pair.client.write(pair.client_fd, payload)
        if i % 50 == 49:
            pair.client.timer = 0
            pair.client.wait_events()
    pair.client.write(pair.client_fd, b"end")
    got = []
    tick = deadline()
    while True:
        tick()
        msg = pair.server.read(pair.server_fd)
        if msg == b"end":
            break
        got.append(msg)
    assert got == expected


def test_read_returns_pending_messages_first(pair):
    raw = b"".join(frame(b"%d" % i) for i in range(4))
    os.write(pair.client_fd, raw)
    spin_until(lambda: not (unread_bytes(pair.server_fd) < len(raw)))
    first = pair.server.wait_event()                   # the round received all 4
    assert (first.type, first.message) == (EventType.MESSAGE_RX, b"0")
    assert pair.server.read(pair.server_fd) == b"1"     # pending, not the socket
    assert pair.server.read(pair.server_fd) == b"2"
    rest = pair.server.wait_events()
    assert [(e.type, e.message) for e in rest] == [(EventType.MESSAGE_RX, b"3")]
    pair.client.write(pair.client_fd, b"4")
    assert pair.server.read(pair.server_fd) == b"4"
    assert quiet(pair.server, 30) == []


def test_messages_that_come_with_the_read_one_are_queued(pair):
    raw = b"".join(frame(b"m%d" % i) for i in range(5))
    os.write(pair.client_fd, raw)
    spin_until(lambda: not (unread_bytes(pair.server_fd) < len(raw)))
    assert pair.server.read(pair.server_fd) == b"m0"
    events = pair.server.wait_events()
    assert [(e.type, e.fd, e.index, e.message) for e in events] == [
        (EventType.MESSAGE_RX, pair.server_fd, pair.server_index, b"m%d" % i)
        for i in range(1, 5)]


def test_read_leaves_other_fds_events_in_place(ctx_factory):
    server = ctx_factory()
    server.service_init("two")
    a, b = ctx_factory(), ctx_factory()
    afd = a.connect_service("two")
    sa = wait_for(server, EventType.CONNECTION)[-1].fd
    bfd = b.connect_service("two")
    sb = wait_for(server, EventType.CONNECTION)[-1].fd
    raw_b, raw_a = frame(b"b1") + frame(b"b2"), frame(b"a1") + frame(b"a2")
    os.write(bfd, raw_b)
    os.write(afd, raw_a)
    spin_until(lambda: not (unread_bytes(sa) < len(raw_a) or unread_bytes(sb) < len(raw_b)))
    first = server.wait_event()            # one round got all four
    if first.fd == sa:
        assert first.message == b"a1"
        assert server.read(sa) == b"a2"
        expected = [(sb, b"b1"), (sb, b"b2")]
    else:
        assert (first.fd, first.message) == (sb, b"b1")
        assert server.read(sa) == b"a1"
        expected = [(sb, b"b2"), (sa, b"a2")]
    assert [(e.fd, e.message) for e in server.wait_events()] == expected


def test_read_then_event_loop_on_a_mixed_queue(pair):
    """A pending DISCONNECTION of another connection is untouched by read()."""
    other = pair.client.__class__(rundir=pair.server.rundir, backend=pair.server.backend)
    try:
        ofd = other.connect_service(pair.name)
        conn = wait_for(pair.server, EventType.CONNECTION)[-1]
        pair.client.write(pair.client_fd, b"x1")
        pair.client.write(pair.client_fd, b"x2")
        other.close(ofd)
        events = collect(pair.server, lambda e: len(e) >= 3)
        kinds = [(e.type, e.fd) for e in events]
        assert (EventType.DISCONNECTION, conn.fd) in kinds
        assert [e.message for e in events if e.type == EventType.MESSAGE_RX] == [b"x1", b"x2"]
    finally:
        other.close_all()


def test_flood_of_scheduled_messages_arrives_in_order(pair):
    n = 20_000
    for i in range(n):
        pair.client.schedule(pair.client_fd, i.to_bytes(4, "big") * (i % 5))
    got = []
    tx = 0
    tick = deadline()
    while len(got) < n:
        tick()
        pair.client.timer = 0
        tx += sum(e.type == EventType.MESSAGE_TX for e in pair.client.wait_events())
        pair.server.timer = 0
        got += [e.message for e in pair.server.wait_events() if e.type == EventType.MESSAGE_RX]
    tick = deadline()
    while tx < n:
        tick()
        tx += sum(e.type == EventType.MESSAGE_TX for e in pair.client.wait_events())
    assert tx == n
    assert got == [i.to_bytes(4, "big") * (i % 5) for i in range(n)]


def test_replies_in_order_both_ways(pair):
    for i in range(100):
        pair.client.schedule(pair.client_fd, b"q%d" % i)
    answers = []
    replied = 0
    tick = deadline()
    while len(answers) < 100:
        tick()
        pair.client.timer = 0
        answers += [e.message for e in pair.client.wait_events()
                    if e.type == EventType.MESSAGE_RX]
        pair.server.timer = 0
        for e in pair.server.wait_events():
            if e.type == EventType.MESSAGE_RX:
                assert e.message == b"q%d" % replied
                pair.server.schedule(e.fd, b"a%d" % replied)
                replied += 1
    assert answers == [b"a%d" % i for i in range(100)]
