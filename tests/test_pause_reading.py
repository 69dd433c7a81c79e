"""pause_reading(fd): the event loop stops reading a connection or an
external fd until resumed, so its peer's writes block (back-pressure, as
asyncio's transport.pause_reading()); both backends."""

from __future__ import annotations

import os

import pytest

import pyipc
from pyipc import EventType

from conftest import collect, raises


def _messages(ctx: pyipc.Context, n: int) -> list[bytes]:
    events = collect(ctx, lambda seen: sum(e.type is EventType.MESSAGE_RX for e in seen) >= n)
    return [e.message for e in events if e.type is EventType.MESSAGE_RX]


def test_a_paused_connection_is_not_read_then_resumed_in_order(pair):
    pair.server.pause_reading(pair.server_fd)
    for m in (b"one", b"two"):
        pair.client.write(pair.client_fd, m)
    with pytest.raises(pyipc.TimeoutError):
        pair.server.wait_events(timeout=0.2)        # nothing is read meanwhile
    pair.server.pause_reading(pair.server_fd, False)
    assert _messages(pair.server, 2) == [b"one", b"two"]


def test_a_paused_connection_holds_its_peer_back(pair):
    """What the peer sends waits in the kernel: its blocking write times out
    once the socket buffers are full, and nothing was lost or cut."""
    pair.server.pause_reading(pair.server_fd)
    chunk, sent = b"z" * 65536, 0
    with pytest.raises(pyipc.TimeoutError):
        while sent < 1000:                          # 64 MiB: far past any socket buffer
            pair.client.write(pair.client_fd, chunk, timeout=0.5)
            sent += 1
    assert 0 < sent < 1000
    pair.server.pause_reading(pair.server_fd, False)
    got = _messages(pair.server, sent)
    assert got[:sent] == [chunk] * sent


def test_read_still_reads_a_paused_connection(pair):
    pair.server.pause_reading(pair.server_fd)
    pair.client.write(pair.client_fd, b"direct")
    assert pair.server.read(pair.server_fd, timeout=10) == b"direct"


def test_a_paused_external_fd_gives_no_event_until_resumed(ctx_factory):
    ctx = ctx_factory()
    r, w = os.pipe()
    try:
        ctx.add_external(r)
        ctx.pause_reading(r)
        os.write(w, b"x")
        with pytest.raises(pyipc.TimeoutError):
            ctx.wait_events(timeout=0.2)
        ctx.pause_reading(r, paused=False)
        assert [(e.type, e.fd) for e in ctx.wait_events(timeout=10)] == [(EventType.EXTERNAL, r)]
    finally:
        ctx.close(r)
        os.close(w)


def test_pause_reading_of_what_has_no_input_is_refused(pair):
    raises(pyipc.UnknownFdError, "fd 123456 is not managed by this context",
           pair.server.pause_reading, 123456)
    raises(pyipc.UnknownFdError, f"fd {pair.service_fd} is not a connection",
           pair.server.pause_reading, pair.service_fd)


@pytest.mark.parametrize("paused", ["no", None, 0, 1])
def test_paused_must_be_a_bool(pair, paused):
    """As switch_events: "no" would pause and None resume by truth value."""
    with pytest.raises(TypeError) as info:
        pair.server.pause_reading(pair.server_fd, paused)
    assert str(info.value) == f"paused must be bool, not {type(paused).__name__}"
    pair.client.write(pair.client_fd, b"still read")    # nothing was changed
    assert _messages(pair.server, 1) == [b"still read"]


def test_a_paused_connection_with_a_queued_write_sees_its_peer_end_once_resumed(pair):
    """With a write queued for it, the poller reports a paused fd's hang-up:
    it was read then (its messages, ERROR and DISCONNECTION while paused).
    Now the flush meets the hang-up and the fd waits: all of it comes once
    resumed, in order (both backends)."""
    pair.server.pause_reading(pair.server_fd)
    pair.server.schedule(pair.server_fd, bytes(4 << 20))  # the client never reads it
    for m in (b"one", b"two"):
        pair.client.write(pair.client_fd, m)
    pair.client.close(pair.client_fd, linger=0)
    for _ in range(3):      # the hang-up is there at once: each round sees it
        assert pair.server.wait_events(timeout=0) == []
    pair.server.pause_reading(pair.server_fd, False)
    events = collect(pair.server, lambda seen: any(e.type is EventType.DISCONNECTION
                                                   for e in seen))
    assert [(e.type, e.message or e.error) for e in events] == [
        (EventType.MESSAGE_RX, b"one"), (EventType.MESSAGE_RX, b"two"),
        (EventType.ERROR, "peer closed the connection with 1 scheduled message(s) unsent"),
        (EventType.DISCONNECTION, None)]


@pytest.mark.parametrize("first", ["wait_event", "read"])
def test_messages_decoded_before_the_pause_still_come(pair, first):
    """Pausing stops reading the socket, not handing out what was already
    read: the rest of the batch wait_event() kept, or the messages read()
    decoded along with the one it returned, still come as MESSAGE_RX, in
    order; what was sent after waits for the resume (docs/reference.md)."""
    server, fd = pair.server, pair.server_fd
    pair.client.write_many(pair.client_fd, [b"m1", b"m2", b"m3"])   # in the socket at once
    if first == "read":
        assert server.read(fd, timeout=10) == b"m1"
    else:
        ev = server.wait_event(timeout=10)
        assert (ev.type, ev.message) == (EventType.MESSAGE_RX, b"m1")
    server.pause_reading(fd)
    pair.client.write(pair.client_fd, b"m4")
    assert [(e.type, e.message) for e in server.wait_events(timeout=10)] == [
        (EventType.MESSAGE_RX, b"m2"), (EventType.MESSAGE_RX, b"m3")]
    with pytest.raises(pyipc.TimeoutError):
        server.wait_events(timeout=0.2)             # m4 is not read meanwhile
    server.pause_reading(fd, False)
    assert _messages(server, 1) == [b"m4"]
