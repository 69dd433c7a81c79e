"""busy_poll: a wait (the event loop's, or a read's) polls without sleeping for
up to busy_poll microseconds before it sleeps. Bounded, off by default, and
it changes when a wait returns, never what it returns."""

from __future__ import annotations

import threading
import time

import pytest

import pyipc
from pyipc import EventType

from conftest import require_backend, wait_for

RANGE_TEXT = f"busy_poll must be between 0 and {pyipc.MAX_BUSY_POLL} us"


def _cpu_of(call) -> tuple[object, float]:
    """call()'s result and the CPU seconds this thread spent in it."""
    start = time.thread_time()
    result = call()
    return result, time.thread_time() - start


def _most_cpu(attempt, at_least: float, tries: int = 6) -> float:
    """The most CPU seconds of up to ``tries`` calls of attempt() (each
    checks its own upper bounds and returns its CPU time), stopping once one
    spent more than ``at_least``. A spin yields the CPU and ends by the clock,
    so other load can only lower its CPU time: one good attempt is proof."""
    most = 0.0
    for _ in range(tries):
        most = max(most, attempt())
        if most > at_least:
            break
    return most


def test_busy_poll_is_off_by_default_and_bounded(ctx_factory):
    ctx = ctx_factory()
    assert ctx.busy_poll == 0
    for value in (0, 1, pyipc.MAX_BUSY_POLL):
        ctx.busy_poll = value
        assert ctx.busy_poll == value
    for bad in (pyipc.MAX_BUSY_POLL + 1, -1, 1 << 40):
        with pytest.raises(ValueError, match=RANGE_TEXT):
            ctx.busy_poll = bad
    for bad in (True, 1.5, "5", None):
        with pytest.raises(TypeError, match="busy_poll must be int"):
            ctx.busy_poll = bad
    assert ctx.busy_poll == pyipc.MAX_BUSY_POLL      # unchanged by the refusals


def _echo_server(server: pyipc.Context, failures: list) -> threading.Thread:
    """A thread that owns ``server`` and echoes every message until the
    client hangs up."""
    def run() -> None:
        try:
            server.timer = 20_000
            while True:
                for ev in server.wait_events():
                    if ev.type is EventType.MESSAGE_RX:
                        server.write(ev.fd, ev.message)
                    elif ev.type is EventType.DISCONNECTION:
                        return
                    elif ev.type is EventType.TIMER:
                        raise AssertionError("the client went quiet")
        except BaseException as exc:    # reported by the test, not lost in the thread
            failures.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("spin", [1, 50, pyipc.MAX_BUSY_POLL])
def test_spinning_peers_exchange_every_message_whole_and_in_order(pair, spin):
    """The loop and the reads spin (with 1 us the message nearly always comes
    after the spin, in the kernel's wait; with more, nearly always during it):
    every reply comes back whole, in order, through read, read_many and a
    direct read_into."""
    pair.server.busy_poll = spin
    pair.client.busy_poll = spin
    failures: list = []
    server = _echo_server(pair.server, failures)
    big = bytes(range(256)) * 300                     # 76,800 B: read_into's direct path
    into = bytearray(len(big))
    try:
        for i in range(200):
            payload = b"m%d" % i * (i % 7)
            pair.client.write(pair.client_fd, payload)
            if i % 2:
                assert pair.client.read(pair.client_fd) == payload
            else:
                assert pair.client.read_many(pair.client_fd) == [payload]
        pair.client.write(pair.client_fd, big)
        assert pair.client.read_into(pair.client_fd, into) == len(big)
        assert into == big
    finally:
        pair.client.close(pair.client_fd)
        server.join(30)
    assert not server.is_alive() and failures == []


def test_a_timer_shorter_than_busy_poll_ends_the_spin(pair):
    pair.server.busy_poll = pyipc.MAX_BUSY_POLL        # 10 ms
    pair.server.timer = 1
    ev, cpu = _cpu_of(pair.server.wait_event)
    assert ev.type is EventType.TIMER
    assert cpu < 0.005, f"{cpu * 1e3:.1f} ms of CPU in a 1 ms wait"


def test_the_loop_spins_for_busy_poll_then_sleeps_until_the_timer(pair):
    pair.server.timer = 40
    pair.server.busy_poll = 0
    ev, cpu_asleep = _cpu_of(pair.server.wait_event)
    assert ev.type is EventType.TIMER and cpu_asleep < 0.004
    pair.server.busy_poll = pyipc.MAX_BUSY_POLL        # 10 ms of the 40

    def attempt() -> float:
        began = time.monotonic()
        ev, cpu = _cpu_of(pair.server.wait_event)
        assert ev.type is EventType.TIMER
        assert time.monotonic() - began >= 0.04        # the spin did not end it early
        assert cpu < 0.03, f"{cpu * 1e3:.1f} ms of CPU: it did not sleep after 10 ms"
        return cpu

    # It spun: CPU time (a wait that sleeps at once spends well under 1 ms).
    assert _most_cpu(attempt, 0.002) > 0.002


def test_a_read_spins_for_busy_poll_then_sleeps_in_the_kernel(pair):
    """The message comes 60 ms late, long after the 5 ms spin."""
    pair.client.busy_poll = 5_000

    def attempt() -> float:
        late = threading.Timer(0.06, pair.server.write, (pair.server_fd, b"late"))
        late.start()
        try:
            message, cpu = _cpu_of(lambda: pair.client.read(pair.client_fd))
        finally:
            late.join()
        assert message == b"late"
        assert cpu < 0.04, f"{cpu * 1e3:.1f} ms of CPU in a 60 ms read: it did not sleep"
        return cpu

    assert _most_cpu(attempt, 0.001) > 0.001


def test_schedule_from_another_thread_ends_a_spinning_wait(pair):
    """The wake-up of schedule() is seen by a spinning loop: every message
    another thread scheduled is written (MESSAGE_TX) and read, in order."""
    pair.server.busy_poll = pyipc.MAX_BUSY_POLL
    pair.server.timer = 20_000
    count = 60

    def produce() -> None:
        for i in range(count):
            pair.server.schedule(pair.server_fd, b"s%d" % i)

    producer = threading.Thread(target=produce)
    producer.start()
    written = 0
    while written < count:
        ev = pair.server.wait_event()
        assert ev.type is EventType.MESSAGE_TX, f"{ev} after {written} written"
        written += 1
    producer.join()
    assert [pair.client.read(pair.client_fd) for _ in range(count)] == \
        [b"s%d" % i for i in range(count)]


def test_busy_poll_changes_no_event(pair):
    """CONNECTION, MESSAGE_RX and DISCONNECTION come as without busy_poll."""
    pair.server.busy_poll = 200
    other = pair.client                     # a second client of the same service
    fd = other.connect_service("svc")
    connected = wait_for(pair.server, EventType.CONNECTION)[-1]
    other.write(fd, b"hello")
    rx = wait_for(pair.server, EventType.MESSAGE_RX)[-1]
    assert (rx.fd, rx.message) == (connected.fd, b"hello")
    other.close(fd)
    gone = wait_for(pair.server, EventType.DISCONNECTION)[-1]
    assert gone.fd == connected.fd


def test_the_core_refuses_what_python_refuses():
    """The core's own bound (C callers reach it) is MAX_BUSY_POLL."""
    require_backend("native")
    with pyipc.Context(backend="native") as ctx:
        ctx._busy_poll_changed(pyipc.MAX_BUSY_POLL)
        with pytest.raises(pyipc.IPCError, match=f"busy_poll must be at most {pyipc.MAX_BUSY_POLL} us"):
            ctx._busy_poll_changed(pyipc.MAX_BUSY_POLL + 1)
