"""Which thread may use a context, and what the other threads hand over.

A context belongs to one thread at a time: each public method holds the
context's guard while it runs (re-entrant, so switch callbacks and the typed
helpers can call back in). The thread inside is the owner.

Other threads may call schedule(), write(), write_many() and close() (and
so schedule_typed() and write_typed()) at any time. When nobody is inside,
such a call takes the guard and runs in its own thread. When the owner is
inside, the call is handed over: it is queued here, the owner is woken (the
backend's `_wakeup`: a byte on a pipe that its wait, and its blocking reads,
watch), and the owner's thread makes the call and reports the outcome back;
the calling thread returns (schedule() once queued, write() once written) or
raises exactly what the call raised. If the owner is busy in another call
(a blocking write, peer_credentials...), the hand-over is done when that call
ends. Calls handed over are made in the order they came, so the messages of
one thread keep their order.

Any other call while another thread is inside (a second read(), wait_event()
from a second thread) is misuse that cannot be made safe: it raises IPCError
(BUSY_TEXT) and changes nothing. Except while that thread runs a call any
thread may make (schedule, write, write_many, close): then the call waits
for it to leave, at most its own timeout= (TIMED; timeout=0: not at all),
and ends as with nothing ready when that passes: a write to a peer that
does not read can last for ever, and a loop driven by fileno() (pyipc.aio)
must not wait for it (held, when_free and try_call are what pyipc.aio uses
not to). The table of what may be called from where
is in docs/reference.md, "Threads".
"""

from __future__ import annotations

import _thread
import ast
import functools
import inspect
import itertools
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from ._checks import as_payload, as_payload_list, check_linger, check_timeout
from ._types import IPCError, Payload, TimeoutError

#: A context's method as the guard calls it: the context, then the method's
#: own arguments.
Method = Callable[..., Any]
#: schedule() as the guard calls it (the backend's own, unguarded).
Direct = Callable[[Any, int, Payload], None]

_get_ident = threading.get_ident
#: Threads alive that were started through `_thread` (threading's too), the
#: main thread not counted (45 ns; threading.active_count() takes 350).
_thread_count: Callable[[], int] = _thread._count

BUSY_TEXT = ("context is in use by another thread (a context belongs to one thread "
             "at a time; other threads may only call schedule(), write(), write_many() "
             "and close())")

#: Public methods that hold the guard (schedule is handled on its own).
GUARDED = ("service_init", "connect_service", "connect", "write", "read",
           "write_many", "read_many", "read_into",
           "wait_event", "wait_events", "add_external", "add_connection", "pause_reading",
           "add_switch",
           "set_switch_callbacks", "peer_credentials", "close", "close_all", "fileno",
           # The switching extension: the owner's thread only (callbacks
           # included: they run inside its wait), never handed over.
           "switch_send", "switch_end")

#: The guarded methods another thread may call while the owner is inside
#: (handed over); schedule() is the fourth.
HANDED = frozenset({"write", "write_many", "close"})

#: What a handed-over call raises on its own (pyipc's errors, a bad argument,
#: no memory): reported to the thread that handed it over. Anything else
#: raised while the owner makes it is the owner thread's (a signal handler's
#: exception): raised there, and to the calling thread too.
CALL_ERRORS = (IPCError, ValueError, TypeError, OverflowError, MemoryError)
#: The guarded calls with a `timeout=` that bounds how long they wait for
#: another thread's short call (schedule, write, write_many, close) to
#: leave the context: the timeout's index in the positional arguments, and
#: what the call says when it passes (as it says it with nothing ready).
TIMED: dict[str, tuple[int, str]] = {
    "wait_event": (0, "wait"), "wait_events": (0, "wait"),
    "read": (1, "read"), "read_into": (2, "read"), "read_many": (2, "read"),
    "connect": (1, "connect"),
}


def _timed_out(name: str, args: tuple[Any, ...]) -> Any:
    """What a TIMED call returns or raises when its timeout passes before
    another thread's short call leaves the context: wait_events(timeout=0)
    returns [] (nothing ready); the others raise pyipc.TimeoutError with the
    text they raise when nothing came in time."""
    what = TIMED[name][1]
    if name == "wait_events" and args[0] == 0:
        return []
    if what == "read":
        raise TimeoutError(f"read on fd {args[0]} timed out")
    if what == "connect":
        raise TimeoutError(f"connect to service {args[0]} timed out")
    raise TimeoutError("wait timed out")


#: acquire()'s argument for a claim that does not wait.
_NO_WAIT = (False,)

#: How often a handing-over thread rechecks whether the owner left, or its
#: write's timeout passed (seconds). A hand-over is normally picked up at once
#: (the owner is woken); this only bounds the rare case of an owner that
#: returned just as the call was queued, and then went idle.
RECHECK_S = 0.01


class _Handoff:
    """One call handed over by another thread, and what became of it.

    `claim` is taken by whoever settles it: the owner before it makes the
    call, or the calling thread when its write's timeout passes first (the
    call is then withdrawn, never made)."""

    __slots__ = ("method", "args", "deadline", "claim", "done", "error")

    def __init__(self, method: Method, args: tuple[Any, ...],
                 deadline: Optional[float]) -> None:
        self.method = method
        self.args = args
        #: write()'s timeout as a monotonic deadline: the owner gets what is left.
        self.deadline = deadline
        self.claim = threading.Lock()
        #: Held until the call is settled. A lock, not a threading.Event:
        #: released in C, it cannot be cut short by a signal handler's
        #: exception the way entering Event.set() (Python code) can, which
        #: left a settled call's thread waiting for good.
        self.done = _thread.allocate_lock()
        self.done.acquire()
        self.error: Optional[BaseException] = None

    def run(self, ctx: Any) -> None:
        """Make the call (in the owner's thread)."""
        args = self.args
        if self.deadline is not None:
            args = args[:-1] + (max(0.0, self.deadline - time.monotonic()),)
        self.method(ctx, *args)


class ThreadGuard:
    """The owner thread of a context, and the calls other threads hand over.

    The outermost public call holds `_lock` and records its thread in
    `_owner`; a nested call of the same thread (a switch callback, a typed
    helper) sees itself as the owner and goes straight in. `_short` says
    that the holder runs one of the calls any thread may make (schedule,
    write, write_many, close): another thread's call waits for it to end
    instead of failing.
    """

    __slots__ = ("_lock", "_tries", "_owner", "_short", "_handoffs")

    #: A forked child's guard (ForkedGuard): every call takes the slow path.
    forked = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Each step tries to take the lock once, without waiting: see _TRIES.
        self._tries = map(self._lock.acquire, itertools.repeat(False))
        self._owner: Optional[int] = None
        self._short = False
        self._handoffs: deque[_Handoff] = deque()

    def call(self, ctx: Any, method: Method, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        """The slow path of a guarded call (the lock was taken): a nested call
        of the owner's thread goes in; write, write_many and close are handed
        over; another thread's short call is waited for; any other holder is
        misuse (IPCError)."""
        me = _get_ident()
        if self._owner == me:
            return ctx._nested_call(method, args, kwargs)
        if method.__name__ in HANDED:
            return self.hand_over(ctx, method, _checked(method.__name__, args))
        if not self._short:
            raise IPCError(BUSY_TEXT)
        # The short call may take long (a write to a peer that does not
        # read): a call with a timeout waits for it at most that long
        # (timeout=0: not at all), then ends as it ends when nothing is
        # ready; the time waited counts in its timeout.
        at = TIMED[method.__name__][0] if method.__name__ in TIMED else -1
        wait, deadline = -1.0, 0.0     # Lock.acquire's "no limit"
        if at >= 0:
            timeout = check_timeout(args[at])
            if timeout is not None:
                wait = timeout
                deadline = time.monotonic() + timeout
        got = False
        try:
            # Taken in a map step, the owner stored with no call in between: a
            # signal handler that calls in cannot find the lock held by nobody
            # (see _TRIES).
            for got in map(self._lock.acquire, (True,), (wait,)):
                break
            if not got:
                return _timed_out(method.__name__, args)
            self._owner = me
            if wait >= 0:           # what is left of the call's timeout
                args = args[:at] + (max(0.0, deadline - time.monotonic()),) + args[at + 1:]
            return method(ctx, *args, **kwargs)
        finally:
            if got:
                try:                # the outermost call ends (see _LEAVE)
                    if self._handoffs:
                        self.apply(ctx)
                finally:
                    self._owner, self._short = None, False
                    self._lock.release()

    def held(self) -> bool:
        """Whether a thread is inside the context (asked by a thread that is
        not: pyipc.aio's loop, to tell "busy" from "nothing ready")."""
        return not self.forked and self._lock.locked()

    def when_free(self, ctx: Any, callback: Callable[[Any], None]) -> "_Handoff":
        """Have callback(ctx) called when the thread inside leaves, in its
        thread (queued as a hand-over, made when its outermost call ends),
        without waiting for it. It must be quick and must not raise.

        Not waited for, so it can be missed: queued just after the holder
        looked at the queue and just before it left, it is made only by the
        next call that takes the context. A caller that waits for it must
        also check now and then (try_call); `done` of the item returned is
        released once it was called."""
        item = _Handoff(callback, (), None)
        self._handoffs.append(item)
        return item

    def try_call(self, ctx: Any, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        """(True, fn(ctx)) made inside the context if no thread is inside
        now, else (False, None) at once (never waits): for pyipc.aio's loop,
        which must not block. fn may make the context's calls (nested)."""
        me = _get_ident()
        got = False
        try:        # the lock taken as in _TEMPLATE (see _TRIES, _LEAVE)
            for got in self._tries:
                break
            if not got:
                return False, None
            self._owner = me
            return True, fn(ctx)
        finally:
            if got:
                try:
                    if self._handoffs:
                        self.apply(ctx)
                finally:
                    self._owner = None
                    self._lock.release()

    def schedule(self, ctx: Any, direct: Direct, fd: int, payload: Payload) -> None:
        """The slow path of schedule() (the lock was taken): direct when this
        thread is inside the context, else handed over to the owner (which
        hand_over also does itself if the owner has left meanwhile)."""
        if self._owner == _get_ident():
            return direct(ctx, fd, payload)
        # A wrong type fails here and now, in the calling thread.
        self.hand_over(ctx, direct, (fd, as_payload(payload)))

    def apply(self, ctx: Any) -> None:
        """In the owner's thread: make every call handed over, in order, and
        report each outcome to its thread. Any other exception (a signal
        handler's in this thread, a KeyboardInterrupt) goes to both."""
        while self._handoffs:
            item = self._handoffs[0]
            # Claimed in a map step (see _TRIES): a signal handler's exception
            # cannot come between the claim and the try that settles it.
            for claimed in map(item.claim.acquire, _NO_WAIT):
                break
            if not claimed:                 # withdrawn: its thread gave up first
                self._handoffs.popleft()
                continue
            try:
                self._handoffs.popleft()
                item.run(ctx)
            except CALL_ERRORS as exc:      # the call's own: reported to its thread
                item.error = exc
            except BaseException as exc:
                item.error = exc
                raise
            finally:
                item.done.release()

    def hand_over(self, ctx: Any, method: Method, args: tuple[Any, ...]) -> Any:
        """From a thread that is not the owner: have the owner make the call
        (or make it here, with the calls queued before it, if the owner has
        left); return or raise its outcome. A write whose timeout passes
        before the owner takes it is withdrawn: TimeoutError, as write()."""
        deadline = None
        if method.__name__ in ("write", "write_many") and args[-1] is not None:
            deadline = time.monotonic() + args[-1]
        item = _Handoff(method, args, deadline)
        me = _get_ident()
        try:
            # Queued inside the try: a handler's exception right after it
            # withdraws the call too (below).
            self._handoffs.append(item)
            ctx._wakeup()
            while item.done.locked():
                got = False
                for got in self._tries:         # see _TRIES
                    break
                if got:                         # the owner left: do it (and others) here
                    self._owner, self._short = me, True
                    try:                        # see _LEAVE
                        self.apply(ctx)
                    finally:
                        self._owner, self._short = None, False
                        self._lock.release()
                    continue
                wait = RECHECK_S
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0 and item.claim.acquire(False):
                        raise TimeoutError(f"write on fd {args[0]} timed out")
                    if left > 0:
                        wait = min(wait, left)
                if item.done.acquire(True, wait):
                    break                       # settled (nobody else waits on it)
        except BaseException:
            # A signal's handler raised in this thread while it waited (or
            # the timeout above): a call the owner has not taken yet is
            # withdrawn, so nothing of it is made; one it took goes on to
            # its end, as a write that has begun does.
            item.claim.acquire(False)
            raise
        if item.error is not None:
            raise item.error
        return None


def _checked(name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A handed-over call's arguments, checked (and an iterable of payloads
    taken) in the calling thread, as the call would check them first."""
    if name == "close":
        return args
    fd, payloads, timeout = args
    timeout = check_timeout(timeout)
    if name == "write_many":
        payloads = as_payload_list(payloads)
    return (fd, payloads, timeout)


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
#: For the same reason the thread's ident is taken before the lock and stored
#: as the owner right after it, with no call in between: a call there (as
#: `guard._owner = _get_ident()` was) let a signal handler run while the lock
#: was held and no owner recorded, and a handler that called schedule() then
#: took itself for another thread and waited for itself forever.
#:
#: _LEAVE: the outermost call ends by making the calls handed over (apply),
#: then releasing the lock, in a try/finally written where the lock was taken,
#: not in a method of its own: a signal handler's exception can come as a
#: Python function is entered, before its first line, and with the try inside
#: a `leave()` method a KeyboardInterrupt there left the lock held for good
#: (every later call "in use by another thread", every hand-over waiting).
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
        me = _get_ident()
        guard = self._guard
        got = False
        try:
            for got in guard._tries:
                break
            if got:
                {enter}
                return method(self, {args})
        finally:
            if got:
                try:
                    if guard._handoffs:
                        guard.apply(self)
                finally:
                    {leave}
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
    short = method.__name__ in HANDED
    text = _TEMPLATE.format(
        name=method.__name__,
        params=", ".join(f"{n}=_d_{n}" if n in defaults else n for n in names),
        args=", ".join(names), comma="," if len(names) == 1 else "",
        # A call any thread may make marks itself short (see ThreadGuard).
        enter="guard._owner, guard._short = me, True" if short
        else "guard._owner = me",
        leave="guard._owner, guard._short = None, False" if short else "guard._owner = None")
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


def guarded_schedule(direct: Direct) -> Direct:
    """`direct` (a backend's schedule, unguarded) wrapped in the guard.

    While the process has no thread but the main one (no thread started
    through `threading` or `_thread` is alive), the guard is not taken: no
    other thread can be inside the context or hand a call over, and a signal
    handler that calls in between is a nested call of this thread, which the
    guard would let in anyway (the native backend's schedule() reasons the
    same way). Taking it cost about a third of a per-message schedule()
    (issue 21). A forked child's guard is always taken (it raises)."""
    @functools.wraps(direct)
    def schedule(self: Any, fd: int, payload: Payload) -> None:
        guard: ThreadGuard = self._guard
        if not _thread_count() and not guard.forked:
            return direct(self, fd, payload)
        me = _get_ident()
        got = False
        try:        # the lock taken as in _TEMPLATE (see _TRIES)
            for got in guard._tries:
                break
            if got:                         # fast path: nobody inside
                guard._owner, guard._short = me, True
                return direct(self, fd, payload)
        finally:
            if got:
                try:            # see _LEAVE
                    if guard._handoffs:
                        guard.apply(self)
                finally:
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
        cls.schedule = guarded_schedule(cls.schedule)


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

    forked = True

    def __init__(self, inherited: ThreadGuard) -> None:
        super().__init__()
        self._lock.acquire()
        # What another thread of the parent had handed over is not ours to send.
        del inherited

    def call(self, ctx: Any, method: Method, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
        if method.__name__ == "close":
            # args is (fd, linger): no linger here, the child never sends
            # what its parent scheduled (a bad one is refused all the same).
            if args[1] is not None:
                check_linger(args[1])
            return ctx._close_in_child(args[0])
        if method.__name__ == "close_all":
            return ctx._close_in_child(None)
        raise IPCError(FORK_TEXT)

    def schedule(self, ctx: Any, direct: Direct, fd: int, payload: Payload) -> None:
        raise IPCError(FORK_TEXT)
