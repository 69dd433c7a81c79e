"""Contexts in different threads run in parallel: a blocking call releases
the GIL while it waits (cffi's ABI mode releases it around every C call of
the native backend; the pure backend's waits are Python's own) and while it
moves a large payload, so another thread's work goes on meanwhile."""

from __future__ import annotations

import threading

import pyipc

from conftest import Pair, spin_until

SIZE = 64 * 1024
#: 64 KiB messages per thread: far more than a socket buffer holds, so each
#: writer blocks inside write() while its reader, in another thread, reads.
COUNT = 400


def test_a_thread_blocked_in_read_does_not_stop_pure_python_work(pair):
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(pair.client.read(pair.client_fd, timeout=10))
        except pyipc.IPCError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    spin_until(lambda: pair.client._guard._owner == thread.ident)
    # Pure-Python work in this thread, while the reader is blocked: had the
    # read kept the GIL, this would not run until the read timed out.
    total = sum(i * i for i in range(300_000))
    assert thread.is_alive() and not outcome        # still blocked in read()
    pair.server.write(pair.server_fd, b"%d" % total)
    thread.join(10)
    assert outcome == [b"%d" % total]


def test_two_contexts_in_two_threads_move_64k_messages_at_once(ctx_factory):
    """Two pairs; per pair a writer thread (one context) and a reader thread
    (the other): four threads in C at once. Each write blocks until the
    reader of its pair, in another thread, makes room: a call that kept the
    GIL while it waits or copies would stop the reader, and the write would
    time out."""
    pairs = [Pair(ctx_factory(), ctx_factory(), f"par{i}") for i in range(2)]
    problems: list[object] = []

    def write(p: Pair) -> None:
        payload = bytes(range(256)) * (SIZE // 256)
        try:
            for _ in range(COUNT):
                p.client.write(p.client_fd, payload, timeout=20)
        except pyipc.IPCError as exc:
            problems.append(exc)

    def read(p: Pair) -> None:
        buf = bytearray(SIZE)
        expected = bytes(range(256)) * (SIZE // 256)
        try:
            for _ in range(COUNT):
                if p.server.read_into(p.server_fd, buf, timeout=20) != SIZE or buf != expected:
                    problems.append("a message came cut or changed")
                    return
        except pyipc.IPCError as exc:
            problems.append(exc)

    threads = [threading.Thread(target=f, args=(p,)) for p in pairs for f in (write, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert problems == []
