"""ctx.fileno() in the pure backend (the core's readiness.zig): one fd that
is readable, level-triggered, while ``wait_events(timeout=0)`` would return
something, so that another event loop (selectors, asyncio, GLib...) can
drive a context.

It is an outer poller (epoll on Linux, kqueue on the BSDs and macOS) that
watches the context's own poller fd (a ready connection, a client, room for
scheduled data, another thread's wake-up), a pipe that holds one byte while
events wait in the context's queue (PendingQueue raises and lowers it as the
queue fills and empties), and a one-shot timer (a timerfd, or kqueue's
EVFILT_TIMER) armed for when the context's timer is due. Made by the first
fileno(); a context that never asks pays nothing.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
import weakref
from typing import Any, Optional

from .._events import EventQueue
from .._types import IPCError

#: The text when the poller has no fd to nest (as the core says it).
NO_FD_TEXT = "fileno() is not available with the poll(2) poller backend"

_LINUX = hasattr(select, "epoll")
#: select's kqueue names (not on Linux, where the type checker runs).
_kq: Any = select
#: kqueue's identifier of the timer (timers have their own namespace).
_TIMER_IDENT = 1
_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _TimerFd:
    """A non-blocking CLOCK_MONOTONIC timerfd (os.timerfd_* from Python 3.13,
    else libc's through ctypes), armed at an absolute time.monotonic()."""

    __slots__ = ("fd", "_settime")

    def __init__(self) -> None:
        flags = os.O_NONBLOCK | os.O_CLOEXEC       # TFD_NONBLOCK, TFD_CLOEXEC
        if hasattr(os, "timerfd_create"):
            self.fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=flags)
            self._settime: Any = None
            return
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.timerfd_create(_CLOCK_MONOTONIC, flags)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = fd
        self._settime = libc.timerfd_settime

    def set(self, due: Optional[float]) -> None:
        """Readable from monotonic time ``due`` on; None disarms. Either way
        a timer that fired is no longer readable."""
        at = 0.0 if due is None else max(due, 1e-9)     # zero disarms
        if self._settime is None:
            os.timerfd_settime(self.fd, flags=os.TFD_TIMER_ABSTIME,   # type: ignore[attr-defined]
                               initial=at)
            return
        sec = int(at)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((at - sec) * 1e9)))
        self._settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None)


class Readiness:
    """The outer poller, the pending-events pipe and the timer of one context."""

    __slots__ = ("_outer", "_r", "_w", "_timer", "_fds", "raised", "armed", "__weakref__")

    def __init__(self, inner: Optional[int]) -> None:
        if inner is None:
            raise IPCError(NO_FD_TEXT)
        self._outer: Any = None
        self._r, self._w = os.pipe()
        # Its fds are closed by close(), or when this object goes (the
        # context collected without close_all); the outer poller's object
        # closes its own.
        fds = [self._r, self._w]
        self._fds = weakref.finalize(self, _close, fds)
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._timer: Optional[_TimerFd] = None
        if _LINUX:
            self._timer = _TimerFd()
            fds.append(self._timer.fd)
            self._outer = select.epoll()
            for fd in (inner, self._r, self._timer.fd):
                self._outer.register(fd, select.EPOLLIN)
        else:
            self._outer = _kq.kqueue()
            self._outer.control([_kq.kevent(fd, _kq.KQ_FILTER_READ, _kq.KQ_EV_ADD)
                                 for fd in (inner, self._r)], 0)
        #: Whether the pipe holds its byte.
        self.raised = False
        #: The monotonic time the timer is armed for; None: disarmed.
        self.armed: Optional[float] = None

    def fileno(self) -> int:
        """The fd handed out."""
        return self._outer.fileno()  # type: ignore[no-any-return]

    def owns(self, fd: int) -> bool:
        """Whether fd is one of this object's own fds."""
        return fd in (self.fileno(), self._r, self._w) or \
            (self._timer is not None and fd == self._timer.fd)

    def set_pending(self, yes: bool) -> None:
        """Readable while ``yes`` (events wait); a system call only on a change."""
        if yes == self.raised:
            return
        if yes:
            os.write(self._w, b"\1")
        else:
            try:
                while os.read(self._r, 64):
                    pass
            except BlockingIOError:
                pass
        self.raised = yes

    def arm_timer(self, due: Optional[float]) -> None:
        """Readable from monotonic time ``due`` on (None: never). An earlier
        alarm that has not fired is kept (it fires early: one empty round,
        whose end arms the right time), saving a system call per wait in a
        busy loop; one that fired is always replaced."""
        armed = self.armed
        if due == armed:
            return
        if due is not None and armed is not None and armed < due and time.monotonic() < armed:
            return
        if self._timer is not None:
            self._timer.set(due)
        else:
            self._kqueue_timer(due)
        self.armed = due

    def _kqueue_timer(self, due: Optional[float]) -> None:
        # A fired one-shot stays pending until deleted: delete, then add.
        try:
            self._outer.control([_kq.kevent(_TIMER_IDENT, _kq.KQ_FILTER_TIMER,
                                            _kq.KQ_EV_DELETE)], 0)
        except OSError:
            pass                            # none armed
        if due is not None:
            ms = max(0, int((due - time.monotonic()) * 1000 + 0.999))
            self._outer.control([_kq.kevent(
                _TIMER_IDENT, _kq.KQ_FILTER_TIMER,
                _kq.KQ_EV_ADD | _kq.KQ_EV_ONESHOT, 0, ms)], 0)

    def close(self) -> None:
        """Close every fd (in a forked child: this process's copies only)."""
        if self._outer is not None:
            self._outer.close()
        self._fds()


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


class PendingQueue(EventQueue):
    """The context's event queue once fileno() was asked for: it keeps the
    readiness pipe raised exactly while it holds events."""

    __slots__ = ("_ready",)

    def __init__(self, events: EventQueue, ready: Readiness) -> None:
        self._ready = ready
        super().__init__(events)
        ready.set_pending(bool(self))

    def _changed(self) -> None:
        self._ready.set_pending(bool(self))

    def append(self, ev: Any) -> None:
        super().append(ev)
        self._ready.set_pending(True)

    def extend(self, evs: Any) -> None:
        super().extend(evs)
        self._changed()

    def popleft(self) -> Any:
        ev = super().popleft()
        if not self:
            self._ready.set_pending(False)
        return ev

    def clear(self) -> None:
        super().clear()
        self._ready.set_pending(False)

    def take_message(self, fd: int) -> Optional[bytes]:
        message = super().take_message(fd)
        self._changed()
        return message

    def take_into(self, fd: int, view: memoryview) -> Optional[int]:
        size = super().take_into(fd, view)
        self._changed()
        return size

    def drop(self, fd: int) -> None:
        super().drop(fd)
        self._changed()
