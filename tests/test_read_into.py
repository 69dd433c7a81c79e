"""read_into(): the next message copied into the caller's buffer, on both backends.

A large message that fits is read from the socket straight into the buffer;
every other case takes the usual path. Either way each message comes once,
whole, in order; one that does not fit stays queued; the socket is left
non-blocking.
"""

from __future__ import annotations

import array
import os
import struct
import threading

import pytest

import pyipc
from pyipc import EventType

from conftest import Pair, frame, raw_connect, settle, wait_for

MIB = 1 << 20


def sender(ctx: pyipc.Context, fd: int, payloads: list) -> threading.Thread:
    """write_many in another thread (batches larger than the socket buffer)."""
    thread = threading.Thread(target=ctx.write_many, args=(fd, payloads))
    thread.start()
    return thread


def read_into_bytes(ctx: pyipc.Context, fd: int, buf: bytearray) -> bytes:
    size = ctx.read_into(fd, buf)
    return bytes(buf[:size])


def test_messages_of_every_size_in_order(pair: Pair):
    sizes = [10, 200_000, 0, 70_000, 5, MIB, 65_535, 65_536, 0]
    sent = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    thread = sender(pair.client, pair.client_fd, sent)
    buf = bytearray(2 * MIB)
    got = [read_into_bytes(pair.server, pair.server_fd, buf) for _ in sent]
    thread.join()
    assert got == sent
    assert os.get_blocking(pair.server_fd)       # our own sockets stay in blocking mode
    assert settle(pair.server) == []            # none of them comes again


def test_mixed_with_read_and_read_many(pair: Pair):
    sent = [bytes([i]) * (100_000 if i % 2 else 10) for i in range(8)]
    thread = sender(pair.client, pair.client_fd, sent)
    buf = bytearray(MIB)
    got = [read_into_bytes(pair.server, pair.server_fd, buf),
           pair.server.read(pair.server_fd),
           read_into_bytes(pair.server, pair.server_fd, buf)]
    got += pair.server.read_many(pair.server_fd, 1)
    while len(got) < len(sent):
        got.append(read_into_bytes(pair.server, pair.server_fd, buf))
    thread.join()
    assert got == sent


def test_messages_already_pending_come_first(pair: Pair):
    sent = [b"first", b"second" * 20_000, b"third"]
    pair.client.write_many(pair.client_fd, sent[:1])
    assert wait_for(pair.server, EventType.MESSAGE_RX)[-1].message == b"first"
    pair.client.write_many(pair.client_fd, sent)
    buf = bytearray(MIB)
    assert [read_into_bytes(pair.server, pair.server_fd, buf) for _ in sent] == sent


@pytest.mark.parametrize("size, room", [(20, 10), (200_000, 100_000), (MIB, 65_536)])
def test_a_message_that_does_not_fit_stays_queued(pair: Pair, size, room):
    message = b"m" * size
    thread = sender(pair.client, pair.client_fd, [message, b"next"])
    with pytest.raises(pyipc.MessageTooLargeError,
                       match=f"^buffer of {room} bytes is too small for a message of {size} bytes$"):
        pair.server.read_into(pair.server_fd, bytearray(room))
    assert pair.server.read(pair.server_fd) == message
    thread.join()
    assert read_into_bytes(pair.server, pair.server_fd, bytearray(room)) == b"next"


@pytest.mark.parametrize("size", [1, 65_535, 65_536, 300_000])
def test_a_buffer_of_exactly_the_size_fits_and_one_byte_less_does_not(pair: Pair, size):
    """The edge of read_into's one bound, the caller's buffer, on both sides
    of the direct read's threshold (64 KiB)."""
    message = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    thread = sender(pair.client, pair.client_fd, [message, message])
    with pytest.raises(pyipc.MessageTooLargeError,
                       match=f"^buffer of {size - 1} bytes is too small for a message of {size} bytes$"):
        pair.server.read_into(pair.server_fd, bytearray(size - 1))
    exact = bytearray(size)
    assert pair.server.read_into(pair.server_fd, exact) == size and exact == message
    assert pair.server.read_into(pair.server_fd, exact) == size and exact == message
    thread.join()


def test_buffer_types(pair: Pair):
    pair.client.write_many(pair.client_fd, [b"abcd", b"efgh"])
    words = array.array("I", [0, 0])
    assert pair.server.read_into(pair.server_fd, memoryview(words)) == 4
    assert words.tobytes()[:4] == b"abcd"
    for bad in (b"readonly", "text", 12, memoryview(bytearray(8))[::2]):
        with pytest.raises(TypeError, match="^buffer must be a writable"):
            pair.server.read_into(pair.server_fd, bad)
    assert read_into_bytes(pair.server, pair.server_fd, bytearray(10)) == b"efgh"


def test_a_header_split_by_the_event_loop(ctx_factory, rundir):
    """Part of a header was read by the event loop; read_into completes the
    frame from there (the direct path takes over the decoder's bytes)."""
    server = ctx_factory()
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    payload = bytes(range(256)) * 400                     # 100 KiB
    whole = frame(payload)
    sock.sendall(whole[:2])
    assert settle(server) == []                           # the loop took the 2 bytes
    threading.Thread(target=sock.sendall, args=(whole[2:],)).start()
    assert read_into_bytes(server, fd, bytearray(MIB)) == payload
    sock.sendall(frame(b""))                              # a header alone: an empty message
    assert read_into_bytes(server, fd, bytearray(MIB)) == b""
    sock.close()


def test_peer_gone_in_the_middle_of_a_large_message(ctx_factory, rundir):
    server = ctx_factory()
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    sock.sendall(struct.pack(">I", 200_000) + b"x" * 1000)
    sock.close()
    with pytest.raises(pyipc.ConnectionClosedError,
                       match=f"^connection on fd {fd} is closed by the peer$"):
        server.read_into(fd, bytearray(MIB))


def test_an_announced_size_over_the_limit(ctx_factory, rundir):
    server = ctx_factory(max_message_size=100_000)
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    sock.sendall(struct.pack(">I", 100_001))
    with pytest.raises(pyipc.MessageTooLargeError,
                       match=r"^message of 100001 bytes exceeds max_message_size \(100000\)$"):
        server.read_into(fd, bytearray(MIB))
    sock.close()


def test_unknown_fd(pair: Pair):
    with pytest.raises(pyipc.UnknownFdError, match="^fd 999 is not managed by this context$"):
        pair.server.read_into(999, bytearray(10))


def test_on_a_switched_connection_nothing_is_forwarded_by_read_into(ctx_factory, rundir):
    """read_into reads a switched fd itself: a message its header read
    completes (an empty one) is returned, not forwarded to the switch peer."""
    server = ctx_factory()
    server.service_init("svc")
    a, b = raw_connect(rundir, "svc"), raw_connect(rundir, "svc")
    fds: list = []
    wait_for(server, lambda ev: len(server_fds(ev, fds)) == 2)
    server.add_switch(fds[0], fds[1])
    a.sendall(frame(b"") + frame(b"hello"))
    assert server.read_into(fds[0], bytearray(MIB)) == 0
    wait_for(server, EventType.SWITCH_TX)          # the event loop forwards the rest
    assert b.recv(100) == frame(b"hello")
    a.close()
    b.close()


def server_fds(ev, seen: list) -> list:
    """The CONNECTION fds seen so far (a wait_for predicate's helper)."""
    if ev.type == EventType.CONNECTION:
        seen.append(ev.fd)
    return seen


@pytest.mark.parametrize("backend", ["pure"])
def test_interrupted_by_a_signal_handler_the_frame_is_kept(ctx_factory, rundir):
    """Pure only: a Python exception from a signal handler (a timeout, Ctrl-C)
    can stop its blocking read midway; what was read of the frame goes back
    to the decoder, so the next read returns the whole message. (Native
    finishes the read in C before the handler runs.)"""
    import signal

    class Alarm(Exception):
        pass

    def ring(*_):
        raise Alarm()

    server = ctx_factory()
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    big = frame(b"P" * 100_000)
    sock.sendall(big[:80_000])                   # most of a large frame
    old = signal.signal(signal.SIGALRM, ring)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            server.read_into(fd, bytearray(MIB))  # waits for the rest: interrupted
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    sock.sendall(big[80_000:] + frame(b"next"))
    buf = bytearray(MIB)
    assert read_into_bytes(server, fd, buf) == b"P" * 100_000
    assert read_into_bytes(server, fd, buf) == b"next"
    sock.close()
