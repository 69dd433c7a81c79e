"""write_many() and read_many(): many messages per call, on both backends.

Every message written is delivered once, whole, in order, whichever mix of
read(), read_many() and the event loop takes it; a batch with one bad payload
sends nothing; read_many()'s bound is checked at and past its edges.
"""

from __future__ import annotations

import array
import contextlib
import threading

import pytest

import pyipc
from pyipc import EventType

from conftest import Pair, frame, raw_connect, settle, spin_until, unread_bytes, wait_for


def numbered(n: int, size_of=lambda i: i % 100) -> list[bytes]:
    """n distinct payloads of varied sizes: message i starts with its number."""
    return [(b"%d:" % i + bytes([i % 251]) * size_of(i)) for i in range(n)]


def writer(ctx: pyipc.Context, fd: int, payloads: list) -> threading.Thread:
    """write_many in another thread: for batches larger than the socket buffer
    while this thread reads (each context is used by one thread at a time).
    If write_many fails, the writer closes fd: the reader then fails with
    ConnectionClosedError instead of waiting for ever for the rest."""
    def write() -> None:
        try:
            ctx.write_many(fd, payloads)
        except BaseException:
            with contextlib.suppress(Exception):    # the write_many error is the one to see
                ctx.close(fd)
            raise

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def read_all(ctx: pyipc.Context, fd: int, n: int, max_messages: int = 1024) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        batch = ctx.read_many(fd, max_messages)
        assert 1 <= len(batch) <= max_messages
        got += batch
    return got


def test_write_many_then_read_one_by_one(pair: Pair):
    sent = numbered(700)                      # more than one gathered batch (512)
    pair.client.write_many(pair.client_fd, sent)
    assert [pair.server.read(pair.server_fd) for _ in sent] == sent


def test_read_many_returns_every_message_in_order(pair: Pair):
    sent = numbered(20000)
    thread = writer(pair.client, pair.client_fd, sent)
    assert read_all(pair.server, pair.server_fd, len(sent)) == sent
    thread.join()
    assert settle(pair.server) == []          # none of them comes again as an event


def test_read_many_respects_max_messages(pair: Pair):
    sent = numbered(10)
    pair.client.write_many(pair.client_fd, sent)
    assert read_all(pair.server, pair.server_fd, 10, max_messages=3) == sent


def test_messages_beyond_max_messages_wait_as_events(pair: Pair):
    sent = numbered(5)
    pair.client.write_many(pair.client_fd, sent)
    got = pair.server.read_many(pair.server_fd, 1)
    events = wait_for(pair.server, lambda ev: ev.type == EventType.MESSAGE_RX
                      and ev.message == sent[-1])
    got += [ev.message for ev in events if ev.type == EventType.MESSAGE_RX]
    assert got == sent


def test_read_many_takes_messages_already_fetched_by_the_event_loop(pair: Pair):
    sent = numbered(50)
    pair.client.write_many(pair.client_fd, sent)
    first = wait_for(pair.server, EventType.MESSAGE_RX)[-1].message
    # The other 49 may already be pending in the context: read_many takes them
    # first, in order, then reads the rest.
    assert [first] + read_all(pair.server, pair.server_fd, 49) == sent


def test_read_many_and_read_mix(pair: Pair):
    sent = numbered(30)
    pair.client.write_many(pair.client_fd, sent)
    got = [pair.server.read(pair.server_fd)]
    got += pair.server.read_many(pair.server_fd, 10)
    got.append(pair.server.read(pair.server_fd))
    got += read_all(pair.server, pair.server_fd, len(sent) - len(got))
    assert got == sent


def test_payload_types_in_one_batch(pair: Pair):
    words = array.array("H", [1, 2, 3])
    pair.client.write_many(pair.client_fd,
                           (p for p in [b"b", bytearray(b"ba"), memoryview(b"mv"),
                                        "héllo", words, b""]))
    assert read_all(pair.server, pair.server_fd, 6) == [
        b"b", b"ba", b"mv", "héllo".encode(), words.tobytes(), b""]


def test_empty_batch_sends_nothing_but_flushes_the_queue(pair: Pair):
    pair.client.schedule(pair.client_fd, b"queued")
    pair.client.write_many(pair.client_fd, [])
    assert unread_bytes(pair.server_fd) == len(frame(b"queued"))
    assert pair.server.read_many(pair.server_fd) == [b"queued"]
    # The queued message was written: its MESSAGE_TX comes with the next wait.
    assert wait_for(pair.client, EventType.MESSAGE_TX)[-1].fd == pair.client_fd


def test_write_many_sends_the_queue_first(pair: Pair):
    pair.client.schedule(pair.client_fd, b"first")
    pair.client.write_many(pair.client_fd, [b"second", b"third"])
    assert read_all(pair.server, pair.server_fd, 3) == [b"first", b"second", b"third"]


@pytest.mark.parametrize("bad", [b"x" * 1025, 12, None])
def test_one_bad_payload_sends_nothing(ctx_factory, bad):
    server, client = ctx_factory(), ctx_factory(max_message_size=1024)
    p = Pair(server, client, "svc")
    batch = [b"ok", b"x" * 1024, bad, b"late"]     # 1024 is the edge: accepted alone
    error = pyipc.MessageTooLargeError if isinstance(bad, bytes) else TypeError
    with pytest.raises(error):
        client.write_many(p.client_fd, batch)
    assert unread_bytes(p.server_fd) == 0
    client.write_many(p.client_fd, batch[:2])
    assert read_all(server, p.server_fd, 2) == batch[:2]


def test_too_large_text_names_the_largest(ctx_factory):
    server, client = ctx_factory(), ctx_factory(max_message_size=10)
    p = Pair(server, client, "svc")
    with pytest.raises(pyipc.MessageTooLargeError,
                       match=r"^message of 12 bytes exceeds max_message_size \(10\)$"):
        client.write_many(p.client_fd, [b"a" * 11, b"b" * 12, b"c"])


@pytest.mark.parametrize("payloads", [b"abc", "abc", 5, None])
def test_payloads_must_be_an_iterable_of_payloads(pair: Pair, payloads):
    with pytest.raises(TypeError, match="payloads must be an iterable of payloads"):
        pair.client.write_many(pair.client_fd, payloads)


def test_unknown_fd(pair: Pair):
    with pytest.raises(pyipc.UnknownFdError, match="^fd 999 is not managed by this context$"):
        pair.client.write_many(999, [b"x"])
    with pytest.raises(pyipc.UnknownFdError, match="^fd 999 is not managed by this context$"):
        pair.server.read_many(999)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1, ValueError), (pyipc.MAX_READ_MANY + 1, ValueError),
    (True, TypeError), (2.0, TypeError), ("3", TypeError)])
def test_max_messages_bound(pair: Pair, value, error):
    with pytest.raises(error, match="max_messages must be"):
        pair.server.read_many(pair.server_fd, value)


def test_max_messages_at_its_edge(pair: Pair):
    sent = numbered(pyipc.MAX_READ_MANY + 10, size_of=lambda i: 0)
    thread = writer(pair.client, pair.client_fd, sent)
    got = read_all(pair.server, pair.server_fd, len(sent), pyipc.MAX_READ_MANY)
    thread.join()
    assert got == sent
    assert pyipc.DEFAULT_READ_MANY == 1024


def test_a_message_larger_than_the_read_buffer(pair: Pair):
    sent = [b"small", b"L" * (300 << 10), b"after"]    # native's read buffer is 64 KiB
    thread = writer(pair.client, pair.client_fd, sent)
    assert read_all(pair.server, pair.server_fd, 3) == sent
    thread.join()


def test_more_than_the_socket_buffer_blocks_until_read(ctx_factory, rundir):
    """write_many waits while the socket is full; a reader in another thread
    (its own context) takes everything, whole and in order."""
    server = ctx_factory()
    server.service_init("svc")
    sent = numbered(5000, size_of=lambda i: 1000 + i % 7)   # about 5 MB
    got: list[bytes] = []

    def serve() -> None:
        fd = wait_for(server, EventType.CONNECTION)[-1].fd
        got.extend(read_all(server, fd, len(sent)))

    reader = threading.Thread(target=serve)
    reader.start()
    client = ctx_factory()
    client.write_many(client.connect_service("svc"), sent)
    reader.join(30)
    assert not reader.is_alive()
    assert got == sent


def test_read_many_after_the_peer_closed(pair: Pair):
    sent = numbered(20)
    pair.client.write_many(pair.client_fd, sent)
    pair.client.close(pair.client_fd)
    assert read_all(pair.server, pair.server_fd, 20) == sent
    with pytest.raises(pyipc.ConnectionClosedError,
                       match=f"^connection on fd {pair.server_fd} is closed by the peer$"):
        pair.server.read_many(pair.server_fd)


def test_write_many_to_a_closed_peer(pair: Pair):
    pair.server.close(pair.server_fd)
    with pytest.raises(pyipc.ConnectionClosedError):
        for _ in range(100):            # the first writes may still fit in the buffer
            pair.client.write_many(pair.client_fd, [b"x" * 65536] * 4)


def test_good_messages_before_a_bad_header_then_too_large(ctx_factory, rundir):
    server = ctx_factory(max_message_size=100)
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    sock.sendall(frame(b"one") + frame(b"two") + b"\xff\xff\xff\xff")
    assert read_all(server, fd, 2) == [b"one", b"two"]
    with pytest.raises(pyipc.MessageTooLargeError):
        server.read_many(fd)
    sock.close()


def test_a_bad_header_first(ctx_factory, rundir):
    server = ctx_factory(max_message_size=100)
    server.service_init("svc")
    sock = raw_connect(rundir, "svc")
    fd = wait_for(server, EventType.CONNECTION)[-1].fd
    sock.sendall(b"\x00\x00\x01\x00")
    with pytest.raises(pyipc.MessageTooLargeError,
                       match=r"^message of 256 bytes exceeds max_message_size \(100\)$"):
        server.read_many(fd)
    sock.close()


def test_large_payloads_of_every_type(pair: Pair):
    """Large payloads are written from where they are (native: one pointer
    each); the bytes must be the same as for small ones."""
    big = bytes(range(256)) * 400                  # 100 KiB
    words = array.array("I", range(25_600))        # 100 KiB, 4-byte items
    sent = [big, bytearray(big), memoryview(big)[1:], words, "é" * 50_000, b""]
    thread = writer(pair.client, pair.client_fd, sent)
    got = read_all(pair.server, pair.server_fd, len(sent))
    thread.join()
    assert got == [big, big, big[1:], words.tobytes(), ("é" * 50_000).encode(), b""]


def test_a_stream_of_large_messages_reuses_buffers_correctly(pair: Pair):
    """Large frames cycle through one spare buffer in the native core: every
    message must still come out with its own content."""
    sent = [bytes([i]) * ((1 << 20) - i) for i in range(12)]
    thread = writer(pair.client, pair.client_fd, sent)
    got = [pair.server.read(pair.server_fd) if i % 2 else pair.server.read_many(pair.server_fd, 1)[0]
           for i in range(len(sent))]
    thread.join()
    assert got == sent


def test_batches_hold_64_kib_together_on_both_backends(pair: Pair):
    """read_many's batch: at most READ_MANY_BYTES together, a larger first
    message alone; the same grouping whether the messages were pending or not."""
    sizes = [1, 65_537, 1, 40_000, 20_000, 20_000, 5_000]
    sent = [bytes([i + 1]) * size for i, size in enumerate(sizes)]
    thread = writer(pair.client, pair.client_fd, sent)
    # Everything is in the server's socket before the first read_many, so the
    # grouping depends on the sizes alone.
    spin_until(lambda: unread_bytes(pair.server_fd) == sum(sizes) + 4 * len(sizes))
    thread.join()
    batches: list = []
    while sum(map(len, batches)) < len(sent):
        batches.append(pair.server.read_many(pair.server_fd))
    assert [[len(m) for m in batch] for batch in batches] == [
        [1], [65_537], [1, 40_000, 20_000], [20_000, 5_000]]
    assert [m for batch in batches for m in batch] == sent
    assert pyipc.READ_MANY_BYTES == 64 * 1024


@pytest.mark.parametrize("sizes", [
    [0, 1, 1023, 1024, 1025, 4096] * 300 + [1025] * 600,     # native: one joined buffer
    [0, 3, 1024, 1025, 100_000] * 40 + [2000] * 600,          # native: a pointer each
], ids=["mostly-small", "mostly-large"])
def test_mixed_sizes_cross_every_gather_bound(pair: Pair, sizes):
    """write_many copies small frames into one buffer and writes large ones
    from where they are (native: zig/gather.zig): sizes on both sides of its
    1 KiB copy limit, enough small frames to fill its 64 KiB buffer many times,
    enough large ones to need more than one writev of 1,024 iovecs."""
    sent = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    thread = writer(pair.client, pair.client_fd, sent)
    got = read_all(pair.server, pair.server_fd, len(sent))
    thread.join()
    assert [len(m) for m in got] == sizes
    assert got == sent


def test_large_payloads_stay_alive_while_write_many_waits(pair: Pair):
    """write_many blocks with the GIL released; another thread may empty the
    caller's list meanwhile: the payloads must still be sent intact."""
    import gc
    payloads = [bytes([i]) * 100_000 for i in range(1, 41)]   # ~4 MB: it must wait
    expected = [bytes(bytearray(p)) for p in payloads]    # copies: the originals must go
    thread = writer(pair.client, pair.client_fd, payloads)
    spin_until(lambda: unread_bytes(pair.server_fd) > 0)
    payloads.clear()
    gc.collect()
    junk = [b"\xee" * 100_000 for _ in range(200)]           # reuses freed memory
    got = read_all(pair.server, pair.server_fd, len(expected))
    thread.join()
    del junk
    assert got == expected
