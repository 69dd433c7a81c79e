"""How the pure backend's blocking calls wait (the core's blocking.zig):
busy_poll's transfers that do not wait, then waits in the kernel, or poll()
up to the call's timeout. The reads poll() their fd and the context's
wake-up pipe: another thread's wake-up ends their wait (Woken), so that the
reading thread makes the calls handed over to it (pyipc/_threads.py).
"""

from __future__ import annotations

import math
import os
import select
import time
import socket
from typing import TYPE_CHECKING, Optional

from .._checks import check_timeout
from .._types import Buffer, TimeoutError
from .poller import MAX_WAIT_MS
from .syscalls import DONTWAIT, drain

if TYPE_CHECKING:
    from .state import PureState


class Woken(Exception):
    """Another thread's wake-up ended a read's wait, nothing consumed (the
    bytes read so far stay with the decoder): the read makes the calls
    handed over, then reads again (the core's Interrupted, see blocking.zig)."""


#: wait_fd's results.
READY, WOKEN, TIMED_OUT = 1, 2, 0


class Blocking:
    """How one blocking call waits (the core's blocking.zig): transfers that
    do not wait until `end` (busy_poll; monotonic, 0.0: none), then
    transfers that wait in the kernel, or, with a `deadline` (the call's
    timeout), poll() up to it: then TimeoutError("<what> timed out"). One
    per call, so that the call spins busy_poll us at most. Signals need
    nothing here: Python's own calls run the handler and go on (PEP 475).
    With `wake` (a read: the context's wake-up pipe), the waits poll() it
    too, and a wake-up raises Woken."""

    __slots__ = ("end", "deadline", "what", "fd", "wake", "poll_first", "waiters")

    def __init__(self, busy_poll_us: int, deadline: Optional[float] = None,
                 what: str = "", fd: int = -1, wake: int = -1) -> None:
        self.end = time.monotonic() + busy_poll_us / 1e6 if busy_poll_us else 0.0
        if deadline is not None and self.end:
            self.end = min(self.end, deadline)
        self.deadline = deadline
        self.what = what
        self.fd = fd
        self.wake = wake
        #: A read that neither spins nor has a deadline polls before its
        #: first recv: a recv that finds nothing costs an exception more.
        self.poll_first = wake >= 0 and not self.end and deadline is None
        #: Per fd read, a poll object on it and `wake`, kept (a context keeps
        #: the Blocking of its plain reads, see Waits._blocking): a read's
        #: wait costs one poll() call more than a blocking recv, no more.
        self.waiters: dict[int, select.poll] = {}

    def flags(self) -> int:
        """recv/send flags (MSG_DONTWAIT or none) of the next transfer."""
        return DONTWAIT if self.end or self.deadline is not None or self.wake >= 0 else 0

    def idle(self, fd: int, events: int = select.POLLIN) -> None:
        """Nothing moved: go on spinning while there is time, else wait."""
        if self.end:
            yield_cpu()
            if time.monotonic() >= self.end:
                self.end = 0.0
            return
        if self.deadline is None:
            if self.wake >= 0 and events == select.POLLIN:     # a plain read
                waiter = self.waiters.get(fd) or self._waiter(fd)
                # In registration order: fd first, so a ready fd wins.
                if waiter.poll()[0][0] != fd:
                    drain(self.wake)
                    raise Woken()
                return
            outcome = self._wait(fd, events, None)
        else:
            left = self.deadline - time.monotonic()
            outcome = self._wait(fd, events, left) if left > 0 else TIMED_OUT
        if outcome == WOKEN:
            drain(self.wake)
            raise Woken()
        if outcome == TIMED_OUT:
            raise TimeoutError(f"{self.what} on fd {self.fd} timed out"
                               if self.fd >= 0 else f"{self.what} timed out")


    def _waiter(self, fd: int) -> select.poll:
        """The kept poll object of reads of fd (see `waiters`)."""
        waiter = self.waiters[fd] = select.poll()
        waiter.register(fd, select.POLLIN)
        waiter.register(self.wake, select.POLLIN)
        return waiter

    def _wait(self, fd: int, events: int, timeout: Optional[float]) -> int:
        return wait_fd(fd, events, timeout, self.wake)


#: The Blocking of every call without busy_poll or timeout (never changed:
#: its end is 0.0 and it has no deadline, so idle() only waits).
NO_SPIN = Blocking(0)


class Waits:
    """PureContext's choice of how one blocking call waits."""

    __slots__ = ()

    def _blocking(self: PureState, fd: int, timeout: Optional[float], what: str,
                  spin: bool = True) -> "Blocking":
        """How one blocking call on fd waits: busy_poll (with `spin`) and
        its `timeout` (no object made when there is neither)."""
        busy = self._busy_poll if spin else 0
        # The reads (`spin`) also wake for another thread's hand-over.
        wake = self._wake_r if spin else -1
        if timeout is None:
            if busy:
                return Blocking(busy, None, what, fd, wake)
            return self._plain_reads if spin else NO_SPIN
        return Blocking(busy, time.monotonic() + check_timeout(timeout), what, fd, wake)


def recv_exactly(sock: socket.socket, buf: Buffer, filled: list[int], at: int, end: int,
                  spin: Blocking, ctx: Optional[PureState] = None, mine: object = None) -> bool:
    """Fill buf from filled[at] to `end` from a blocking socket, keeping
    filled[at] up to date (so an interruption knows how far it got); False
    at EOF. The reads wait as `spin` says (busy_poll). With `ctx`: Woken as
    soon as ctx._direct_read is no longer `mine` (a signal handler's read
    took over, see Reading._read_frame_into), checked with no call between
    the check and the read."""
    view = memoryview(buf)
    n = -1
    while filled[at] < end:
        reads = map(sock.recv_into, (view[filled[at]:end],), (0,), (spin.flags(),))
        if ctx is not None and ctx._direct_read is not mine:
            raise Woken()
        try:
            # Counted as taken, with no call in between: a signal handler's
            # exception (Ctrl-C) lands before both or after both.
            for n in reads:
                filled[at] += n
        except BlockingIOError:
            spin.idle(sock.fileno())
            continue
        except InterruptedError:
            continue
        if n == 0:
            return False
    return True


def yield_cpu() -> None:
    """busy_poll, between two polls that found nothing: give the CPU to a
    process waiting for this one (often the peer); without it, a spin on a
    shared CPU kept the peer off it for the whole busy_poll."""
    os.sched_yield()


def wait_fd(fd: int, events: int, timeout: Optional[float] = None, wake: int = -1) -> int:
    """Wait until fd has `events` (READY), at most `timeout` seconds
    (TIMED_OUT, which is false), or, with `wake` (an fd >= 0), until it is
    readable first (WOKEN; fd ready wins, so that a transfer goes on)."""
    waiter = select.poll()
    waiter.register(fd, events)
    if wake >= 0:
        waiter.register(wake, select.POLLIN)
    return _poll(waiter, timeout, wake)


def _poll(waiter: select.poll, timeout: Optional[float], wake: int) -> int:
    """wait_fd's wait, on a poll object that has its fds."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        # poll() takes at most MAX_WAIT_MS (an int): a longer wait is several.
        ready = waiter.poll(None if timeout is None
                            else min(math.ceil(timeout * 1000), MAX_WAIT_MS))
        if ready:
            return WOKEN if all(f == wake for f, _ in ready) else READY
        assert end is not None
        timeout = end - time.monotonic()
        if timeout <= 0:
            return TIMED_OUT
