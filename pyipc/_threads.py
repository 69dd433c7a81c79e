"""Which thread may use a context, and schedule() from the others.

A context belongs to one thread at a time: each public method holds the
context's guard while it runs (re-entrant, so switch callbacks and the typed
helpers can call back in). A call from a second thread while the first is
inside raises IPCError instead of corrupting the backend's state.

The exception is schedule(): from another thread it hands the message over.
It is queued here, the waiting loop is woken (the backend's `_wakeup`:
a byte on a pipe its poller watches), and the loop's thread schedules it and
reports the outcome back; the calling thread returns or raises exactly what
schedule() would have. If the owner is not waiting but busy in another call,
the hand-over is done when that call ends.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import sys
import threading
from collections import deque
from typing import Any, Callable, Optional

from ._checks import as_payload
from ._types import IPCError, Payload

#: A context's method as the guard calls it: the context, then the method's
#: own arguments.
Method = Callable[..., Any]
#: schedule() as the guard calls it (the backend's own, unguarded).
Direct = Callable[[Any, int, Payload], None]

_get_ident = threading.get_ident

BUSY_TEXT = ("context is in use by another thread (a context belongs to one thread "
             "at a time; other threads may only call schedule())")

#: Public methods that hold the guard (schedule is handled on its own).
GUARDED = ("service_init", "connect_service", "connect", "write", "read",
           "write_many", "read_many", "read_into",
           "wait_event", "wait_events", "add_external", "add_switch",
           "set_switch_callbacks", "peer_credentials", "close", "close_all", "fileno")

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
    """The owner thread of a context, and the messages other threads hand over.

    The outermost public call holds `_lock` and records its thread in
    `_owner`; a nested call of the same thread (a switch callback, a typed
    helper) sees itself as the owner and goes straight in.
    """

    __slots__ = ("_lock", "_tries", "_owner", "_short", "_handoffs")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Each step tries to take the lock once, without waiting: see _TRIES.
        self._tries = map(self._lock.acquire, itertools.repeat(False))
        self._owner: Optional[int] = None
        # The holder is another thread's schedule(): a short call worth waiting for.
        self._short = False
        self._handoffs: deque[_Handoff] = deque()

    def leave(self, ctx: Any) -> None:
        """End the outermost call: schedule what was handed over, then release."""
        try:
            if self._handoffs:
                self.apply(ctx)
        finally:
            self._owner, self._short = None, False
            self._lock.release()

    def call(self, ctx: Any, method: Method, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """The slow path of a guarded call (the lock was taken): a nested call
        of the owner's thread goes in; another thread's short schedule() is
        waited for; any other holder is misuse (IPCError)."""
        me = _get_ident()
        if self._owner == me:
            return method(ctx, *args, **kwargs)
        if not self._short:
            raise IPCError(BUSY_TEXT)
        self._lock.acquire()
        self._owner = me
        try:
            return method(ctx, *args, **kwargs)
        finally:
            self.leave(ctx)

    def schedule(self, ctx: Any, direct: Direct, fd: int, payload: Payload) -> None:
        """The slow path of schedule() (the lock was taken): direct when this
        thread is inside the context, else handed over to the owner (which
        hand_over also does itself if the owner has left meanwhile)."""
        if self._owner == _get_ident():
            return direct(ctx, fd, payload)
        return self.hand_over(ctx, fd, payload)

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
        item = _Handoff(fd, as_payload(payload))   # a wrong type fails here and now
        self._handoffs.append(item)
        ctx._wakeup()
        while not item.done.is_set():
            if self._lock.acquire(False):   # the owner left: do it (and others) here
                self._owner, self._short = _get_ident(), True
                self.leave(ctx)
            else:
                item.done.wait(RECHECK_S)
        if item.error is not None:
            raise item.error


#: _TRIES: a guarded call takes its context's lock as `for got in
#: guard._tries: break`, a step of a map that calls lock.acquire(False).
#: CPython runs signal handlers at calls and backward jumps, not in a for
#: loop's step, so `got` is stored (and the finally clause will release the
#: lock) before a handler's exception can come. With `if
#: lock.acquire(False):` a KeyboardInterrupt raised as acquire returned left
#: the lock taken by nobody, and every later call raised "in use by another
#: thread". The map is made once per guard: about 25 ns a call, where a new
#: map per call cost 130.
#:
#: The guarded method's source: its own parameters (so positional and keyword
#: calls cost what a plain call costs; a `*args, **kwargs` wrapper costs about
#: three times more on CPython 3.11), the lock taken without blocking on the
#: fast path, ThreadGuard.call for nested calls and contention. It is compiled
#: as lines of this file (see _TEMPLATE_LINE), so a traceback through the guard
#: shows this file and the template's line, not "<string>".
_TEMPLATE_LINE = sys._getframe().f_lineno + 1   # the line _TEMPLATE's text starts on
_TEMPLATE = """
def make(method, _get_ident):
    def {name}(self, {params}):
        guard = self._guard
        got = False
        try:
            for got in guard._tries:
                break
            if got:
                guard._owner = _get_ident()
                return method(self, {args})
        finally:
            if got:
                if guard._handoffs:
                    guard.leave(self)
                else:
                    guard._owner = None
                    guard._lock.release()
        return guard.call(self, method, ({args}{comma}), {{}})
    return {name}
"""


def _guarded(method: Method) -> Method:
    """`method` wrapped in its context's guard, with the same signature."""
    sig = inspect.signature(method)
    params = list(sig.parameters.values())[1:]         # without self
    if any(p.kind not in (p.POSITIONAL_OR_KEYWORD,) for p in params):
        raise TypeError(f"cannot guard {method.__qualname__}: only plain parameters")
    defaults = {p.name: p.default for p in params if p.default is not p.empty}
    names = [p.name for p in params]
    text = _TEMPLATE.format(
        name=method.__name__,
        params=", ".join(f"{n}=_d_{n}" if n in defaults else n for n in names),
        args=", ".join(names), comma="," if len(names) == 1 else "")
    scope: dict[str, Any] = {f"_d_{n}": v for n, v in defaults.items()}
    # Filling in the names keeps every line where it was: text line k is line
    # _TEMPLATE_LINE + k - 1 of this file.
    tree = ast.parse(text)
    ast.increment_lineno(tree, _TEMPLATE_LINE - 1)
    code = compile(tree, __file__, "exec")
    exec(code, scope)   # noqa: S102 - a fixed template, filled with parameter names
    call: Method = scope["make"](method, _get_ident)
    functools.update_wrapper(call, method)
    call._guarded = True  # type: ignore[attr-defined]
    return call


def _guarded_schedule(direct: Direct) -> Direct:
    @functools.wraps(direct)
    def schedule(self: Any, fd: int, payload: Payload) -> None:
        guard: ThreadGuard = self._guard
        got = False
        try:        # the lock taken as in _TEMPLATE (see _TRIES)
            for got in guard._tries:
                break
            if got:                         # fast path: nobody inside
                guard._owner, guard._short = _get_ident(), True
                return direct(self, fd, payload)
        finally:
            if got:
                if guard._handoffs:
                    guard.leave(self)
                else:
                    guard._owner, guard._short = None, False
                    guard._lock.release()
        return guard.schedule(self, direct, fd, payload)
    schedule._guarded = True  # type: ignore[attr-defined]
    return schedule


def guard_methods(cls: type[Any]) -> None:
    """Wrap a backend class's public methods (own or inherited) in the guard."""
    for name in GUARDED:
        method = getattr(cls, name)
        if not getattr(method, "_guarded", False):
            setattr(cls, name, _guarded(method))
    if not getattr(cls.schedule, "_guarded", False):
        cls._schedule_direct = cls.schedule
        cls.schedule = _guarded_schedule(cls.schedule)


#: What any call but close, close_all and leaving a `with` raises in a
#: forked child (docs/reference.md, "Signals, timeouts and fork").
FORK_TEXT = ("this Context was inherited through fork(): in the child, create a new "
             "Context (closing the inherited one only closes this process's copies "
             "of its fds)")


class ForkedGuard(ThreadGuard):
    """The guard of a Context in a forked child (set by the at-fork hook).

    Its lock is held for good, so every guarded call takes the slow path:
    close() and close_all() close the child's copies of the fds, and nothing
    that the parent shares (its socket files, its lock, its poller); every
    other call raises IPCError(FORK_TEXT). schedule() too.
    """

    __slots__ = ()

    def __init__(self, inherited: ThreadGuard) -> None:
        super().__init__()
        self._lock.acquire()
        # What another thread of the parent had handed over is not ours to send.
        del inherited

    def call(self, ctx: Any, method: Method, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        if method.__name__ == "close":
            # args is (fd, linger): no linger here, the child never sends
            # what its parent scheduled.
            return ctx._close_in_child(args[0])
        if method.__name__ == "close_all":
            return ctx._close_in_child(None)
        raise IPCError(FORK_TEXT)

    def schedule(self, ctx: Any, direct: Direct, fd: int, payload: Payload) -> None:
        raise IPCError(FORK_TEXT)
