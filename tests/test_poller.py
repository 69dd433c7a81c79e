"""The pure backend's poller: epoll used directly reports what selectors does.

Both pollers are checked against the same expectations, so the epoll one (the
one Linux uses) cannot drift from selectors' rules that the other platforms get.
"""

from __future__ import annotations

import select
import socket
import time

import pytest

from pyipc._pure.poller import READ, WRITE, EpollPoller, SelectorPoller

POLLERS = [SelectorPoller] + ([EpollPoller] if hasattr(select, "epoll") else [])


@pytest.fixture(params=POLLERS, ids=lambda cls: cls.__name__)
def poller(request):
    p = request.param()
    yield p
    p.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_nothing_ready_then_read_ready_with_its_data(poller, pair):
    a, b = pair
    poller.register(a.fileno(), READ, "a")
    assert poller.select(0) == []
    b.send(b"x")
    assert poller.select(None) == [("a", READ)]


def test_ready_mask_is_limited_to_the_interest(poller, pair):
    a, b = pair
    poller.register(a.fileno(), READ, "a")
    b.send(b"x")                                # a is writable too: not asked for
    assert poller.select(0) == [("a", READ)]
    poller.modify(a.fileno(), READ | WRITE, "a2")
    assert poller.select(0) == [("a2", READ | WRITE)]
    poller.modify(a.fileno(), WRITE, "a3")
    assert poller.select(0) == [("a3", WRITE)]


def test_hang_up_is_reported_as_readable(poller, pair):
    a, b = pair
    poller.register(a.fileno(), READ, "a")
    b.close()
    assert poller.select(0) == [("a", READ)]


def test_unregistered_fd_is_not_reported(poller, pair):
    a, b = pair
    other_a, other_b = socket.socketpair()
    try:
        poller.register(a.fileno(), READ, "a")
        poller.register(other_a.fileno(), READ, "other")
        b.send(b"x")
        other_b.send(b"y")
        poller.unregister(other_a.fileno())
        assert poller.select(0) == [("a", READ)]
    finally:
        other_a.close()
        other_b.close()


def test_unregister_after_the_fd_was_closed(poller, pair):
    """pyipc may close an fd before it stops watching it: no error, and the
    fd is not reported (the kernel dropped it from epoll when it closed)."""
    a, b = pair
    other_a, other_b = socket.socketpair()
    fd = other_a.fileno()
    poller.register(a.fileno(), READ, "a")
    poller.register(fd, READ, "other")
    other_b.close()                         # other_a would be readable (hang-up)
    other_a.close()
    poller.unregister(fd)
    b.send(b"x")
    assert poller.select(0) == [("a", READ)]


@pytest.mark.skipif(not hasattr(select, "epoll"), reason="only epoll refuses regular files")
def test_a_failed_register_keeps_nothing(poller, tmp_path):
    with open(tmp_path / "f", "wb") as f:
        with pytest.raises(PermissionError):
            poller.register(f.fileno(), READ, "file")
        assert poller.select(0) == []


def test_a_sub_millisecond_timeout_waits_at_least_that_long(poller, pair):
    a, _ = pair
    poller.register(a.fileno(), READ, "a")
    start = time.monotonic()
    assert poller.select(0.0002) == []          # rounded up to 1 ms, never down to 0
    assert time.monotonic() - start >= 0.0002
