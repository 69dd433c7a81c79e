"""No message of a connection ever reaches another connection's fd.

A connection that ends is reported (MESSAGE_RX..., DISCONNECTION) while its fd
stays open and unwatched until the next round of the event loop; so while the
program handles the old peer's events, no new connection (nor anything else
in the process) can be given that fd number, and a reply to the old peer fails
with ConnectionClosedError instead of reaching someone else.
"""

from __future__ import annotations

import os

import pytest

import pyipc
from pyipc import EventType

from conftest import wait_for


def test_ended_fd_stays_reserved_until_the_next_round(pair):
    pair.client.write(pair.client_fd, b"last words")
    pair.client.close(pair.client_fd)
    events = wait_for(pair.server, EventType.DISCONNECTION)
    assert [(e.type, e.fd) for e in events] == [
        (EventType.MESSAGE_RX, pair.server_fd), (EventType.DISCONNECTION, pair.server_fd)]

    os.fstat(pair.server_fd)                      # still open: the number is taken
    r, w = os.pipe()
    try:
        assert pair.server_fd not in (r, w)
    finally:
        os.close(r)
        os.close(w)
    closed = f"connection on fd {pair.server_fd} is closed by the peer"
    for call in (lambda: pair.server.write(pair.server_fd, b"reply"),
                 lambda: pair.server.schedule(pair.server_fd, b"reply"),
                 lambda: pair.server.read(pair.server_fd),
                 lambda: pair.server.peer_credentials(pair.server_fd)):
        with pytest.raises(pyipc.ConnectionClosedError) as info:
            call()
        assert str(info.value) == closed

    pair.server.timer = 0
    assert pair.server.wait_event().type == EventType.TIMER   # the next round
    with pytest.raises(OSError):
        os.fstat(pair.server_fd)
    with pytest.raises(pyipc.UnknownFdError):
        pair.server.write(pair.server_fd, b"reply")


def test_reply_to_a_gone_peer_never_reaches_a_new_client(pair, ctx_factory):
    # The old client says something and leaves; a new one connects at once.
    pair.client.write(pair.client_fd, b"question")
    pair.client.close(pair.client_fd)
    newcomer = ctx_factory()
    new_fd = newcomer.connect_service(pair.name)
    seen: dict[int, list[EventType]] = {}
    while EventType.CONNECTION not in seen.get(-1, []):
        for ev in pair.server.wait_events():
            if ev.type == EventType.CONNECTION:
                seen.setdefault(-1, []).append(ev.type)
            elif ev.type == EventType.MESSAGE_RX:
                # Handled like a server does: reply to the sender's fd.
                with pytest.raises(pyipc.ConnectionClosedError):
                    pair.server.write(ev.fd, b"answer for the old client")
    newcomer.timer = 200
    assert newcomer.wait_event().type == EventType.TIMER, "the newcomer got a stray reply"


def test_close_releases_an_ended_fd_at_once(pair):
    pair.client.close(pair.client_fd)
    wait_for(pair.server, EventType.DISCONNECTION)
    pair.server.close(pair.server_fd)
    with pytest.raises(OSError):
        os.fstat(pair.server_fd)
    with pytest.raises(pyipc.UnknownFdError):
        pair.server.close(pair.server_fd)


def test_an_ended_connection_keeps_its_index_until_the_next_round(ctx_factory, rundir):
    """The index too: a client accepted in the round that drops another got
    the dropped one's slot, so both were reported with the same index in the
    same batch (libIPC's ipc_close(ctx, index) on the old one's ERROR closed
    the new client). The new client gets another; the slot is free again
    from the next round (both backends)."""
    import struct
    from conftest import collect, raw_connect
    server = ctx_factory()
    server.service_init("svc")
    a = raw_connect(rundir, "svc")
    a_conn = wait_for(server, EventType.CONNECTION)[-1]
    # An empty round: the service is not ready any more, so the next round
    # handles a's fd first, as it became ready first.
    assert server.wait_events(timeout=0) == []
    a.sendall(struct.pack("<I", 0xFFFFFFFF))     # over every limit: dropped
    b = raw_connect(rundir, "svc")               # waits for the same round
    events = collect(server, lambda evs: any(e.type == EventType.CONNECTION for e in evs)
                     and any(e.type == EventType.DISCONNECTION for e in evs))
    ends = [(e.type, e.fd, e.index) for e in events if e.type != EventType.CONNECTION]
    assert ends == [(EventType.ERROR, a_conn.fd, a_conn.index),
                    (EventType.DISCONNECTION, a_conn.fd, a_conn.index)]
    b_conn = [e for e in events if e.type == EventType.CONNECTION][0]
    assert b_conn.index != a_conn.index
    server.close(a_conn.fd)                      # released: the next client takes it
    c = raw_connect(rundir, "svc")
    assert wait_for(server, EventType.CONNECTION)[-1].index == a_conn.index
    for s in (a, b, c):
        s.close()
