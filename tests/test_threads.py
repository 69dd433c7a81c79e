"""Threads: a context belongs to one thread at a time; other threads may call
schedule(), which wakes a waiting loop; any other call from a second thread
while the owner is inside raises IPCError instead of corrupting the context."""

from __future__ import annotations

import threading

import pytest

import pyipc
from pyipc import EventType

from conftest import wait_for

BUSY = ("context is in use by another thread (a context belongs to one thread "
        "at a time; other threads may only call schedule())")


def _reader(client: pyipc.Context, fd: int, count: int, out: list) -> threading.Thread:
    """A thread that owns the client context and reads ``count`` messages."""
    def run() -> None:
        out.extend(client.read(fd) for _ in range(count))
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_schedule_from_other_threads_wakes_the_waiting_loop(pair):
    per_thread, threads = 150, 2
    received: list[bytes] = []
    reader = _reader(pair.client, pair.client_fd, per_thread * threads, received)

    def produce(tag: bytes) -> None:
        for i in range(per_thread):
            pair.server.schedule(pair.server_fd, tag + b"%d" % i)

    producers = [threading.Thread(target=produce, args=(bytes([65 + t]),))
                 for t in range(threads)]
    # No timer would be needed: without the wake-up this wait would never end.
    pair.server.timer = 20_000
    for p in producers:
        p.start()
    written = 0
    while written < per_thread * threads:
        ev = pair.server.wait_event()
        assert ev.type == EventType.MESSAGE_TX, f"{ev} after {written} written"
        written += 1
    for p in producers:
        p.join()
    reader.join(10)
    assert not reader.is_alive()
    for t in range(threads):
        tag = bytes([65 + t])
        assert [m for m in received if m[:1] == tag] == [tag + b"%d" % i for i in range(per_thread)]


def test_schedule_from_another_thread_reports_its_error_there(pair):
    errors: list[BaseException] = []

    def bad() -> None:
        try:
            pair.server.schedule(9999, b"x")
        except pyipc.IPCError as exc:
            errors.append(exc)
        pair.client.write(pair.client_fd, b"done")       # ends the owner's wait

    pair.server.timer = 20_000
    thread = threading.Thread(target=bad)
    thread.start()
    assert wait_for(pair.server, EventType.MESSAGE_RX)[-1].message == b"done"
    thread.join()
    assert len(errors) == 1 and type(errors[0]) is pyipc.UnknownFdError
    assert str(errors[0]) == "fd 9999 is not managed by this context"


def test_other_calls_from_a_second_thread_are_refused(pair):
    outcomes: list[object] = []
    in_wait = threading.Event()

    def owner() -> None:
        in_wait.set()
        outcomes.append(pair.server.wait_event())

    pair.server.timer = 20_000
    thread = threading.Thread(target=owner)
    thread.start()
    in_wait.wait()
    while True:      # a call that returns at once, until the owner is in wait_event
        try:
            pair.server.peer_credentials(pair.server_fd)
        except pyipc.IPCError as exc:
            assert type(exc) is pyipc.IPCError and str(exc) == BUSY
            break
    for call in (lambda: pair.server.read(pair.server_fd),
                 lambda: pair.server.write(pair.server_fd, b"x"),
                 lambda: pair.server.wait_event(),
                 lambda: pair.server.close(pair.server_fd)):
        with pytest.raises(pyipc.IPCError) as info:
            call()
        assert type(info.value) is pyipc.IPCError and str(info.value) == BUSY
    pair.client.write(pair.client_fd, b"wake")
    thread.join()
    assert outcomes[0].type == EventType.MESSAGE_RX and outcomes[0].message == b"wake"
    # Nothing was corrupted: the context goes on working from this thread.
    pair.server.write(pair.server_fd, b"still fine")
    assert pair.client.read(pair.client_fd) == b"still fine"


def test_schedule_from_another_thread_when_idle_is_sent_by_the_next_wait(pair):
    thread = threading.Thread(target=lambda: pair.server.schedule(pair.server_fd, b"idle"))
    thread.start()
    thread.join()
    assert wait_for(pair.server, EventType.MESSAGE_TX)[-1].fd == pair.server_fd
    assert pair.client.read(pair.client_fd) == b"idle"


def test_guarded_methods_keep_their_signatures(pair):
    """The guard wraps each public method in a function with the method's own
    parameters: keywords and defaults work, a wrong call names the method."""
    pair.client.write(fd=pair.client_fd, payload=b"kw")
    assert pair.server.read_many(pair.server_fd, max_messages=1) == [b"kw"]
    pair.client.write_many(payloads=[b"a", b"b"], fd=pair.client_fd)
    assert pair.server.read(fd=pair.server_fd) == b"a"
    assert pair.server.read_many(pair.server_fd) == [b"b"]
    with pytest.raises(TypeError, match=r"write\(\) missing 1 required positional argument"):
        pair.client.write(pair.client_fd)          # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'size'"):
        pair.client.read(pair.client_fd, size=3)   # type: ignore[call-arg]
