"""Which thread may use a context, and schedule() from the others.

A context belongs to one thread at a time: each public method holds the
context's guard while it runs (re-entrant, so switch callbacks and the typed
helpers can call back in). A call from a second thread while the first is
inside raises IPCError instead of corrupting the backend's state.

The exception is schedule(): from another thread it hands the message over.
It is queued here, the waiting loop is woken (the backend's ``_wakeup``:
a byte on a pipe its poller watches), and the loop's thread schedules it and
reports the outcome back; the calling thread returns or raises exactly what
schedule() would have. If the owner is not waiting but busy in another call,
the hand-over is done when that call ends.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from typing import Any, Callable, Optional

from ._types import IPCError

_get_ident = threading.get_ident

BUSY_TEXT = ("context is in use by another thread (a context belongs to one thread "
             "at a time; other threads may only call schedule())")

#: Public methods that hold the guard (schedule is handled on its own).
GUARDED = ("service_init", "connect_service", "connect", "write", "read",
           "write_many", "read_many", "read_into",
           "wait_event", "wait_events", "add_external", "add_switch",
           "set_switch_callbacks", "peer_credentials", "close", "close_all")

#: How often a handing-over thread rechecks whether the owner left (seconds).
RECHECK_S = 0.05


class _Handoff:
    """One message handed over by another thread, and what became of it."""

    __slots__ = ("fd", "payload", "done", "error")

    def __init__(self, fd: int, payload: object) -> None:
        self.fd = fd
        self.payload = payload
        self.done = threading.Event()
        self.error: Optional[BaseException] = None


class ThreadGuard:
    """The owner thread of a context, and the messages other threads hand over."""

    __slots__ = ("_lock", "_owner", "_depth", "_short", "_handoffs")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._depth = 0
        # The holder is another thread's schedule(): a short call worth waiting for.
        self._short = False
        self._handoffs: deque[_Handoff] = deque()

    def try_enter(self, short: bool = False) -> bool:
        """Become (or stay) the owner; False when another thread is inside."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            return True
        if not self._lock.acquire(blocking=False):
            return False
        self._owner, self._depth, self._short = me, 1, short
        return True

    def enter(self) -> None:
        """Enter for a public call; another thread inside is misuse, except a
        short schedule() of another thread, which is waited for."""
        if self.try_enter():
            return
        if not self._short:
            raise IPCError(BUSY_TEXT)
        self._lock.acquire()
        self._owner, self._depth, self._short = threading.get_ident(), 1, False

    def exit(self, ctx: Any) -> None:
        """Leave; the outermost exit first schedules what was handed over."""
        self._depth -= 1
        if self._depth:
            return
        try:
            if self._handoffs:
                self.apply(ctx)
        finally:
            self._owner, self._short = None, False
            self._lock.release()

    def apply(self, ctx: Any) -> None:
        """In the owner's thread: schedule every handed-over message, in order."""
        while self._handoffs:
            item = self._handoffs.popleft()
            try:
                ctx._schedule_direct(item.fd, item.payload)
            except BaseException as exc:  # reported to the thread that handed it over
                item.error = exc
            item.done.set()

    def hand_over(self, ctx: Any, fd: int, payload: object) -> None:
        """From a thread that is not the owner: have the owner schedule it."""
        from ._context import as_payload
        item = _Handoff(fd, as_payload(payload))   # a wrong type fails here and now
        self._handoffs.append(item)
        ctx._wakeup()
        while not item.done.is_set():
            if self.try_enter(short=True):  # the owner left: do it (and others) here
                self.exit(ctx)
            else:
                item.done.wait(RECHECK_S)
        if item.error is not None:
            raise item.error


def _leave_fast(guard: ThreadGuard, ctx: Any) -> None:
    """exit() of the outermost call, inlined for the common case (nothing handed over)."""
    if guard._depth == 1 and not guard._handoffs:
        guard._depth, guard._owner, guard._short = 0, None, False
        guard._lock.release()
    else:
        guard.exit(ctx)


def _guarded(method: Callable) -> Callable:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        guard = self._guard
        if guard._lock.acquire(False):      # fast path: nobody inside (enter(), inlined)
            guard._owner, guard._depth = _get_ident(), 1
            try:
                return method(self, *args, **kwargs)
            finally:
                _leave_fast(guard, self)
        guard.enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            guard.exit(self)
    call._guarded = True  # type: ignore[attr-defined]
    return call


def _guarded_schedule(direct: Callable) -> Callable:
    @functools.wraps(direct)
    def schedule(self: Any, fd: int, payload: object) -> None:
        guard = self._guard
        if guard._lock.acquire(False):      # fast path: try_enter(short=True), inlined
            guard._owner, guard._depth, guard._short = _get_ident(), 1, True
            try:
                return direct(self, fd, payload)
            finally:
                _leave_fast(guard, self)
        if not guard.try_enter(short=True):
            return guard.hand_over(self, fd, payload)
        try:
            return direct(self, fd, payload)
        finally:
            guard.exit(self)
    schedule._guarded = True  # type: ignore[attr-defined]
    return schedule


def guard_methods(cls: type) -> None:
    """Wrap a backend class's public methods (own or inherited) in the guard."""
    for name in GUARDED:
        method = getattr(cls, name)
        if not getattr(method, "_guarded", False):
            setattr(cls, name, _guarded(method))
    if not getattr(cls.schedule, "_guarded", False):
        cls._schedule_direct = cls.schedule
        cls.schedule = _guarded_schedule(cls.schedule)
