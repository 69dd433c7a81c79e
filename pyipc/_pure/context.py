"""The pure-Python backend: sockets, a poller (epoll or `selectors`) and the
rules of docs/reference.md; its event loop (the core's context.zig).

This is the reference the native backend is tested against, so it follows
"Behaviour in detail" in docs/reference.md literally: one round = flush
queues, wait for readiness, handle every ready fd; a connection that ends
reports its last messages, then ERROR when there is a reason, then
DISCONNECTION.

PureContext is put together from one class per concern, each in the module
named like its twin in zig/ (see pyipc/_pure/__init__.py).
"""

from __future__ import annotations

import errno
import os
import time
import weakref
import socket
from typing import Any, Callable, Final, Optional

from .._checks import check_timeout
from .._context import Context, named_as_context
from .._events import EventQueue
from .._types import Event, EventType, IPCError, TimeoutError
from .blocking import Blocking, Waits, yield_cpu
from .closing import Closing, drop_shared_in_child, release
from .conn_table import SERVICE, EXTERNAL, Conn, ConnTable
from .fdpass import Ipcd
from .io import DirectRead, Reading, Writing
from .poller import READ, WRITE, Poller, new_poller
from .readiness import PendingQueue, Readiness
from .send_queue import SendQueue
from .services import Services
from .switching import Switching
from .syscalls import SpareFd, drain, os_error

#: Size of the context's receive scratch buffer.
SCRATCH_SIZE = 64 * 1024

#: The poller data of the wake-up pipe (another thread's schedule()); every
#: other fd's is its Conn.
_WAKE: Final = None


@named_as_context
class PureContext(ConnTable, SendQueue, Writing, Reading, Waits, Switching, Services, Ipcd,
                  Closing, Context):
    """The pure-Python backend of `pyipc.Context`."""

    __slots__ = ("_by_fd", "_slots", "_free", "_dirty", "_poller", "_pending",
                 "_scratch", "_scratch_view", "_ended", "_wake_r", "_wake_w",
                 "_spare_fd", "_ready", "_timer_base", "_plain_reads", "_more", "_round_no",
                 "_out_fd", "_linger_depth", "_muted", "_callback_depth", "_direct_read",
                 "_stream_reads",
                 "_nested_events", "_ended_slots")

    backend = "pure"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._pending = EventQueue()    # events not yet returned, in order
        self._ready: Optional[Readiness] = None    # fileno()'s, made by its first call
        # When the timer last started counting: a zero-timeout wait's TIMER
        # is due ``timer`` ms after it (see _waited).
        self._timer_base = time.monotonic()
        self._by_fd: dict[int, Conn] = {}
        self._slots: list[Optional[Conn]] = []
        self._free: list[int] = []                 # heap of free slot numbers
        self._dirty: dict[Conn, None] = {}        # connections with queued frames
        # Switched fds whose on_in returned MORE and is due again (switching.py),
        # and the number of the current round (each fd's on_in runs one batch a round).
        self._more: dict[Conn, None] = {}
        self._round_no = 0
        self._out_fd = -1                          # the fd whose on_out runs (switching.py)
        self._callback_depth = 0                   # switch callbacks running (reads refused)
        # read_into's frame read straight into the caller's buffer, while it is
        # read (see Reading._take_direct_read); None: none.
        self._direct_read: Optional[DirectRead] = None
        # Reads that began taking a connection's stream (blocking reads and
        # the loop's): read_into, about to read a frame directly, knows by it
        # that a signal handler's read came in between.
        self._stream_reads = 0
        # Set when a nested call (a signal handler's) ended with events
        # waiting: a read it interrupted takes its fd's messages from them
        # before it reads the socket again (Reading._read_until_message).
        self._nested_events = False
        # Lingers running, and the external fds they muted (Conn.muted).
        self._linger_depth = 0
        self._muted: list[Conn] = []
        # Connections that ended (DISCONNECTION reported) keep their fd open until
        # the next round, so a new connection cannot get the same number while
        # the old one's events are handled (a reply would reach the wrong peer).
        self._ended: dict[int, socket.socket] = {}
        # ...and their slot, so that a client accepted in the same round gets
        # another index (as the core's: libIPC's index calls reached it).
        self._ended_slots: dict[int, int] = {}
        self._poller, self._wake_r, self._wake_w = _context_fds()
        self._scratch = bytearray(SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, READ, _WAKE)
        # The Blocking of every read without busy_poll or timeout (kept: it
        # keeps a poll object on the wake-up pipe).
        self._plain_reads = Blocking(0, None, "read", -1, self._wake_r)
        # A fd on /dev/null for refusing a client when out of fds (_refuse_with_spare).
        self._spare_fd = SpareFd()
        # Dropped without close_all(): its fds are closed, and its services'
        # sockets removed and locks released, as native's finalizer does.
        weakref.finalize(self, release, os.getpid(), self._by_fd, self._ended,
                         self._wake_r, self._wake_w, self._poller, self._spare_fd)
        self._track_unclosed()

    # -- the event loop ----------------------------------------------------------
    def wait_event(self, timeout: Optional[float] = None) -> Event:
        timeout = check_timeout(timeout)    # even when an event is there to return
        self._not_in_callback("wait")
        if not self._pending:
            self._fetch(timeout)
        ev = self._pending.popleft()
        self._waited()
        return ev

    def wait_events(self, timeout: Optional[float] = None) -> list[Event]:
        timeout = check_timeout(timeout)    # even when events are there to return
        self._not_in_callback("wait")
        if not self._pending:
            if timeout == 0:
                return self._poll_events()
            self._fetch(timeout)
        events = list(self._pending)
        self._pending.clear()
        self._waited()
        return events

    def _poll_events(self) -> list[Event]:
        """wait_events(timeout=0): one round that does not wait; [] when
        nothing is ready (a loop driven by fileno() drains with it)."""
        try:
            self._fetch(0)
        except TimeoutError:
            self._arm_timer()
            return []
        events = list(self._pending)
        self._pending.clear()
        self._waited()
        return events

    def _waited(self) -> None:
        """A wait call returns events: the timer counts from now."""
        self._timer_base = time.monotonic()
        if self._ready is not None:
            self._arm_timer()

    def _timer_changed(self, value: Optional[int]) -> None:
        self._timer_base = time.monotonic()
        if self._ready is not None:
            self._arm_timer()

    def _arm_timer(self) -> None:
        """fileno() becomes readable when a zero-timeout wait's TIMER is due,
        and stays readable while MORE calls are due (switching.py): that is
        work a zero-timeout wait does, with no fd ready to show it."""
        if self._ready is not None:
            self._ready.set_pending(bool(self._pending) or self._more_due())
            self._ready.arm_timer(None if self._timer is None
                                  else self._timer_base + self._timer / 1000)

    def _more_due(self) -> bool:
        """Some on_in asked for MORE and may be called now (switching.py)."""
        return bool(self._more) and self._more_ready()

    def fileno(self) -> int:
        if self._ready is None:
            try:
                ready = Readiness(self._poller.fileno())
            except OSError as e:
                if isinstance(e, IPCError):
                    raise
                raise os_error("cannot make the context's fd", e.errno) from None
            self._ready = ready
            self._pending = PendingQueue(self._pending, ready)
            self._arm_timer()
        return self._ready.fileno()

    def close_all(self) -> None:
        try:
            Closing.close_all(self)
        finally:
            self._close_ready()

    def _close_in_child(self, fd: Optional[int]) -> None:
        if fd is None:      # first: the queue must not drain the pipe the parent shares
            self._close_ready()
        Closing._close_in_child(self, fd)

    def _forked(self, settled: bool) -> None:
        if settled:
            drop_shared_in_child(self._by_fd.values(), self._ended)

    def _close_ready(self) -> None:
        """close_all(): fileno()'s fds are closed (a later call makes new ones)."""
        if self._ready is not None:
            ready, self._ready = self._ready, None
            self._pending = EventQueue(self._pending)
            ready.close()

    def _nested_call(self, method: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        """A call made inside one of this thread's (a signal handler's). A
        nested read may leave messages of the fd an outer read waits on as
        events (it read more than it returned): that read must return them
        before anything it reads next (_nested_events), and the wake-up
        pipe, which the reads poll, ends its wait (else it waited on the
        socket for more, for good without a timeout)."""
        try:
            return method(self, *args, **kwargs)
        finally:
            # Not inside a switch callback: no read can be waiting there
            # (they are refused), and a relaying callback would pay a wake-up
            # for every message (SWITCH events are pending in every round).
            if self._pending and not self._callback_depth:
                self._nested_events = True
                self._wakeup()

    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"\1")
        except BlockingIOError:
            pass                                # full: a wake-up is already pending

    def _fetch(self, timeout: Optional[float]) -> None:
        # First: the ended connections' events were all handed out, so a
        # wait forgets them (as the core's), even one that raises below.
        if self._ended:
            self._release_ended()
        if not self._by_fd and self._timer is None:
            if timeout == 0:    # cannot hang: nothing is ready, as with fds of which none is
                raise TimeoutError("wait timed out")
            raise IPCError("nothing to wait for: no fd and no timer")
        now = time.monotonic()
        deadline = None if self._timer is None else \
            (self._timer_base if timeout == 0 else now) + self._timer / 1000
        # The call's timeout: a failure, where the timer is an event.
        expiry = None if timeout is None else now + timeout
        until = deadline if expiry is None else expiry if deadline is None else min(deadline, expiry)
        if self._busy_poll and self._spin(until):
            return
        while True:
            # Again each round: a callback may have called close_all() (the
            # round would then wait for nothing, for ever without a timeout).
            if not self._by_fd and self._timer is None:
                raise IPCError("nothing to wait for: no fd and no timer")
            if until is None:
                self._round(None)
            else:
                self._round(max(0.0, until - time.monotonic()))
            # self._pending, not a copy: a callback's first fileno() (or
            # close_all()) made a new queue, the events are in that one.
            if self._pending:
                return
            # Both due (the wait ends late: the poll waits whole ms, the
            # scheduler more): the one due first is what this wait says,
            # the timer when they tie, as the core's endsBefore decides.
            if deadline is not None and time.monotonic() >= deadline \
                    and (expiry is None or expiry >= deadline):
                self._pending.append(Event(EventType.TIMER))
                return
            if expiry is not None and time.monotonic() >= expiry:
                raise TimeoutError("wait timed out")

    def _spin(self, deadline: Optional[float]) -> bool:
        """busy_poll: rounds that do not sleep, for busy_poll us at most (less
        when the timer's deadline comes first); True when one brought an event.
        Why: see busy_poll in docs/reference.md (a sleeping loop's wake-up
        costs more)."""
        end = time.monotonic() + self._busy_poll / 1e6
        if deadline is not None:
            end = min(end, deadline)
        monotonic = time.monotonic
        while True:
            self._round(0)
            if self._pending:               # (not a copy: see _fetch)
                return True
            yield_cpu()                    # to a process on this CPU (as native)
            if monotonic() >= end:
                return False

    def _round(self, timeout: Optional[float], wait: bool = False) -> None:
        """Flush every queue without blocking, wait up to `timeout` seconds
        (None: forever; not at all when the flush brought events, unless
        `wait`: the linger) for readiness, then handle every ready fd. The
        linger (`wait`) flushes and checks what is left itself right before:
        a flush here could send the rest and then wait its whole timeout
        for nothing (a close(linger=30) held for 30 s, as native's is not)."""
        self._round_no += 1
        if not wait:
            self._flush_dirty()
        if (self._pending or (self._more and self._more_ready())) and not wait:
            timeout = 0
        woken = False
        for conn, mask in self._poller.select(timeout):
            if conn is _WAKE:
                drain(self._wake_r)
                woken = True
                continue
            self._handle(conn, mask)
        if self._more and not wait:     # MORE asked for by on_in (not in the linger)
            self._run_more()
        if woken:       # after the ready fds: a close handed over may linger (rounds)
            self._guard.apply(self)     # what other threads handed over

    def _handle(self, conn: Conn, mask: int) -> None:
        if not conn.alive:
            return
        if conn.closing:
            self._flush(conn)               # only written now
            return
        if conn.kind == SERVICE:
            self._accept(conn)
        elif conn.peer is not None:
            if mask & READ:
                self._switch_in(conn)
            if conn.alive and mask & WRITE:
                self._flush(conn)
        elif conn.kind == EXTERNAL:
            self._pending.append(Event(EventType.EXTERNAL, conn.fd, conn.index))
            if self._linger_depth and not conn.muted:   # see Conn.muted
                conn.muted = True
                self._muted.append(conn)
                self._set_interest(conn)
        else:
            if mask & READ:
                # A hang-up shows as readable while a write is queued: a
                # paused fd is not read, the flush meets the hang-up (_flush).
                if conn.read_paused:
                    self._flush(conn)
                    return
                self._read_conn(conn)
            if conn.alive and mask & WRITE:
                self._flush(conn)


def _context_fds() -> "tuple[Poller, int, int]":
    """A new context's poller and wake-up pipe (read end, write end). Out of
    fds: native's IPCError "cannot create context: ..." with errno, and
    nothing left open; out of memory: MemoryError, as native."""
    poller = None
    try:
        poller = new_poller()
        r, w = os.pipe()
    except OSError as e:
        if poller is not None:
            poller.close()
        if e.errno == errno.ENOMEM:
            raise MemoryError("cannot create context: out of memory") from None
        raise os_error("cannot create context", e.errno) from None
    return poller, r, w
