"""The public ``Context`` class: argument checks shared by both backends.

``pyipc.Context(...)`` returns an instance of the chosen backend's subclass
(``_pure.PureContext`` or ``_native.NativeContext``); everything that does not
depend on the backend lives here so both behave the same.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Tuple

from . import _threads
from ._framing import is_too_large_text
from ._rundir import PathLike, resolve_rundir
from ._types import (DEFAULT_LINGER, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_SIZE,
                     DEFAULT_MAX_QUEUE_SIZE, DEFAULT_READ_MANY, MAX_BUSY_POLL, MAX_MESSAGE_SIZE_LIMIT,
                     MAX_READ_MANY, READ_MANY_BYTES, CBEvent, ConnectionClosedError, Event, EventType,
                     IPCError, MessageTooLargeError)

if TYPE_CHECKING:
    from .typed import Registry

OnIn = Callable[[int], Tuple[CBEvent, Optional[bytes]]]
OnOut = Callable[[int, bytes], CBEvent]


def as_payload(payload: object) -> bytes | memoryview:
    """A payload as something the socket layer takes: str is sent as UTF-8."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"payload must be bytes-like or str, not {type(payload).__name__}") from None
    if not view.c_contiguous:
        return view.tobytes()       # e.g. a strided slice: sent as its bytes, in order
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def as_payload_list(payloads: object) -> list:
    """write_many()'s payloads as a list of bytes-like objects of byte format
    (str as UTF-8), in order; TypeError names the first one that is neither."""
    if isinstance(payloads, (str, bytes, bytearray, memoryview)):
        raise TypeError("payloads must be an iterable of payloads, not one "
                        f"{type(payloads).__name__}")
    try:
        items = payloads if type(payloads) is list else list(payloads)  # type: ignore
    except TypeError:
        raise TypeError("payloads must be an iterable of payloads, not "
                        f"{type(payloads).__name__}") from None
    # The common case, checked at C speed (list.count compares by identity
    # first: about 15 ns a payload, where a set of the types took 38).
    if list(map(type, items)).count(bytes) == len(items):
        return items
    return [as_payload(p) for p in items]


def writable_view(buffer: object) -> memoryview:
    """read_into()'s buffer as a writable, contiguous memoryview of bytes."""
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError("buffer must be a writable bytes-like object, not "
                        f"{type(buffer).__name__}") from None
    if view.readonly or not view.c_contiguous:
        raise TypeError("buffer must be a writable, contiguous bytes-like object")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def buffer_too_small_text(size: int, message: int) -> str:
    """read_into()'s MessageTooLargeError text: the message stays queued."""
    return f"buffer of {size} bytes is too small for a message of {message} bytes"


def check_timeout(timeout: Optional[float]) -> Optional[float]:
    """A blocking call's ``timeout=``: None (no limit) or seconds from 0 to
    threading.TIMEOUT_MAX, as Python's own blocking calls take them."""
    if timeout is None:
        return None
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    if not timeout >= 0 or timeout == math.inf:   # NaN fails >= 0
        raise ValueError("timeout must be None or a finite number of seconds >= 0")
    if timeout > threading.TIMEOUT_MAX:
        # Python's own bound for blocking calls (Lock.acquire, socket): a
        # larger one overflows the clocks of both backends (int too: 10**400).
        raise ValueError("timeout must be at most threading.TIMEOUT_MAX "
                         f"({threading.TIMEOUT_MAX} s)")
    return float(timeout)


def check_linger(linger: float) -> float:
    """``Context(linger=)``: seconds >= 0 that closing waits for scheduled messages."""
    if not isinstance(linger, (int, float)) or isinstance(linger, bool):
        raise TypeError(f"linger must be a number of seconds, not {type(linger).__name__}")
    if not linger >= 0 or math.isinf(linger):
        raise ValueError("linger must be a finite number of seconds >= 0")
    return float(linger)


#: Every Context alive in this process: a forked child marks them (see
#: _threads.ForkedGuard) so that they never touch the parent's service.
_LIVE: "weakref.WeakSet[Context]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ctx in list(_LIVE):
        ctx._guard = _threads.ForkedGuard(ctx._guard)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_max_messages(max_messages: int) -> None:
    """read_many()'s bound: an int from 1 to MAX_READ_MANY."""
    if not isinstance(max_messages, int) or isinstance(max_messages, bool):
        raise TypeError(f"max_messages must be int, not {type(max_messages).__name__}")
    if not 1 <= max_messages <= MAX_READ_MANY:
        raise ValueError(f"max_messages must be between 1 and {MAX_READ_MANY}")


class Context:
    """An event loop over services, connections and foreign fds.

    ``Context(rundir=None, max_message_size=16 MiB, backend=None,
    max_queue_size=64 MiB, max_connections=65536, linger=1.0)``. ``backend``
    is "native", "pure" or None (env PYIPC_BACKEND, else native when it loads,
    else pure). ``linger``: seconds closing waits for scheduled messages to go
    out (0: they are dropped at once). See the README for every method's
    behaviour, and for signals, timeouts and fork.
    """

    __slots__ = ("rundir", "max_message_size", "max_queue_size", "max_connections",
                 "_linger_s", "_timer", "_busy_poll", "_pending", "_guard", "_unclosed",
                 "__weakref__")

    backend: str = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each backend's public methods hold the thread guard (see _threads)."""
        super().__init_subclass__(**kwargs)
        _threads.guard_methods(cls)

    def __new__(cls, *args: object, **kwargs: object) -> "Context":
        if cls is Context:
            from ._backend import select
            # backend is __init__'s third parameter, by keyword or by position.
            backend = args[2] if len(args) > 2 else kwargs.get("backend")
            cls = select(backend)  # type: ignore[arg-type]
        return object.__new__(cls)

    def __init__(self, rundir: Optional[PathLike] = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 backend: Optional[str] = None,
                 max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 linger: float = DEFAULT_LINGER) -> None:
        _check_limits(max_message_size, max_queue_size, max_connections)
        self._linger_s = check_linger(linger)
        self.rundir: str = resolve_rundir(rundir)
        self.max_message_size = max_message_size
        self.max_queue_size = max_queue_size
        self.max_connections = max_connections
        self._timer: Optional[int] = None
        self._busy_poll = 0
        self._pending: deque[Event] = deque()   # events not yet returned, in order
        self._guard: _threads.ThreadGuard = _threads.ThreadGuard()
        _LIVE.add(self)
        self._unclosed: Optional[weakref.finalize] = None

    def _track_unclosed(self) -> None:
        """The end of a backend's __init__: from now on, the context warns
        (ResourceWarning) if it is garbage-collected before close_all() or
        the end of its ``with`` block, as an unclosed file or socket does."""
        self._unclosed = weakref.finalize(self, _warn_unclosed, repr(self))

    def _mark_closed(self) -> None:
        """close_all() ran: no ResourceWarning when the context is collected."""
        if self._unclosed is not None:
            self._unclosed.detach()

    # -- timer -----------------------------------------------------------------
    @property
    def timer(self) -> Optional[int]:
        """Milliseconds wait_event waits before a TIMER event, or None (forever)."""
        return self._timer

    @timer.setter
    def timer(self, value: Optional[int]) -> None:
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"timer must be None or int, not {type(value).__name__}")
            if value < 0:
                raise ValueError("timer must be None or >= 0 ms")
            if value > 0x7FFFFFFF:
                raise ValueError("timer must be at most 2147483647 ms")
        self._timer = value
        self._timer_changed(value)

    def _timer_changed(self, value: Optional[int]) -> None:
        """Hook for backends that keep the timer elsewhere."""

    # -- linger ------------------------------------------------------------------
    @property
    def linger(self) -> float:
        """Seconds close(), close_all() and leaving a ``with`` block wait for
        scheduled messages to go out before they drop the rest with a WARNING
        (0: dropped at once). Default DEFAULT_LINGER (1 s)."""
        return self._linger_s

    @linger.setter
    def linger(self, value: float) -> None:
        self._linger_s = check_linger(value)

    def _linger_of(self, linger: Optional[float]) -> float:
        """close()'s ``linger=``: checked, or the context's when None."""
        return self.linger if linger is None else check_linger(linger)

    # -- busy polling ------------------------------------------------------------
    @property
    def busy_poll(self) -> int:
        """Microseconds a wait polls without sleeping before it sleeps (0,
        the default: it sleeps at once), from 0 to MAX_BUSY_POLL: the event
        loop's wait (wait_event, wait_events) and each read, read_many or
        read_into call. It burns up to that much CPU per wait to answer a
        message that comes in the meantime sooner; the timer still ends the
        wait on time. Set it from the thread that owns the context."""
        return self._busy_poll

    @busy_poll.setter
    def busy_poll(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"busy_poll must be int, not {type(value).__name__}")
        if not 0 <= value <= MAX_BUSY_POLL:
            raise ValueError(f"busy_poll must be between 0 and {MAX_BUSY_POLL} us")
        self._busy_poll_changed(value)      # first: if it fails, nothing changed
        self._busy_poll = value

    def _busy_poll_changed(self, value: int) -> None:
        """Hook for backends that keep busy_poll elsewhere."""

    def _wakeup(self) -> None:
        """Any thread: make a wait in progress return (schedule() hand-over)."""
        raise NotImplementedError

    # -- conveniences ------------------------------------------------------------
    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def __iter__(self) -> Iterator[Event]:
        """Yield events forever (wait_event in a loop)."""
        while True:
            yield self.wait_event()

    def connect(self, name: str, timeout: Optional[float] = None) -> int:
        """Connect to service ``name``: through ipcd when IPC_NETWORK is set
        (``timeout`` bounds the wait for ipcd's answer)."""
        timeout = check_timeout(timeout)
        raw = os.environb.get(b"IPC_NETWORK")
        if not raw:
            return self.connect_service(name)
        try:
            network = raw.decode("utf-8")
        except UnicodeDecodeError:      # sent to ipcd as text: refused as native does
            raise IPCError("IPC_NETWORK is not valid UTF-8") from None
        return self._connect_ipcd(name, network, timeout)

    def _first_pending_message(self, fd: int) -> Optional[int]:
        """Where fd's first MESSAGE_RX waits in _pending, if one does.

        Raises ConnectionClosedError when fd's DISCONNECTION comes first.
        """
        for i, ev in enumerate(self._pending):
            if ev.fd != fd:
                continue
            if ev.type == EventType.MESSAGE_RX:
                return i
            _raise_if_ended(ev)
        return None

    def _take_pending_message(self, fd: int) -> Optional[bytes]:
        """read()'s first source: a MESSAGE_RX of fd still waiting in _pending."""
        i = self._first_pending_message(fd)
        if i is None:
            return None
        message = self._pending[i].message
        del self._pending[i]
        return message

    def _take_pending_into(self, fd: int, view: memoryview) -> Optional[int]:
        """read_into()'s first source: fd's first MESSAGE_RX still in _pending,
        copied into ``view``; its size, or None when there is none. A message
        that does not fit stays (MessageTooLargeError)."""
        i = self._first_pending_message(fd)
        if i is None:
            return None
        message = self._pending[i].message
        size = len(message)  # type: ignore[arg-type]
        if size > len(view):
            raise MessageTooLargeError(buffer_too_small_text(len(view), size))
        view[:size] = message  # type: ignore[index]
        del self._pending[i]
        return size

    def _take_pending_messages(self, fd: int, max_messages: int) -> list:
        """read_many()'s first source: fd's MESSAGE_RX events still waiting in
        _pending (at most max_messages and READ_MANY_BYTES together, a larger
        first one alone; up to fd's DISCONNECTION).

        Raises ConnectionClosedError when fd's DISCONNECTION comes first.
        """
        taken: list = []
        keep: deque[Event] = deque()
        done = False
        room = READ_MANY_BYTES
        for ev in self._pending:
            if not done and ev.fd == fd:
                if ev.type == EventType.MESSAGE_RX:
                    size = len(ev.message)  # type: ignore[arg-type]
                    if taken and size > room:
                        done = True          # the batch is full: this one waits
                        keep.append(ev)
                        continue
                    taken.append(ev.message)
                    room -= size
                    done = len(taken) == max_messages
                    continue
                if ev.type in (EventType.ERROR, EventType.DISCONNECTION):
                    if not taken:
                        _raise_if_ended(ev)
                    done = ev.type == EventType.DISCONNECTION
            keep.append(ev)
        if taken:
            self._pending = keep
        return taken

    def _drop_pending(self, fd: int) -> None:
        """Forget the events of fd that were not returned yet (after close)."""
        if any(ev.fd == fd for ev in self._pending):
            self._pending = deque(ev for ev in self._pending if ev.fd != fd)

    def __repr__(self) -> str:
        return f"<pyipc.Context backend={self.backend} rundir={self.rundir!r}>"

    # -- the backend's part (documented in the README) ---------------------------
    def service_init(self, name: str) -> int:
        """Listen as service ``name``; return the listening fd."""
        raise NotImplementedError

    def connect_service(self, name: str) -> int:
        """Connect straight to service ``name``; return the connection fd."""
        raise NotImplementedError

    def _connect_ipcd(self, name: str, network: str, timeout: Optional[float]) -> int:
        raise NotImplementedError

    def write(self, fd: int, payload: object, timeout: Optional[float] = None) -> None:
        """Flush fd's queue, then write one message, blocking until it is
        written (at most ``timeout`` seconds: then pyipc.TimeoutError)."""
        raise NotImplementedError

    def schedule(self, fd: int, payload: object) -> None:
        """Queue one message for fd; the event loop sends it (MESSAGE_TX)."""
        raise NotImplementedError

    def read(self, fd: int, timeout: Optional[float] = None) -> bytes:
        """Return the next message from fd, blocking until one is whole (at
        most ``timeout`` seconds: then pyipc.TimeoutError, nothing consumed)."""
        raise NotImplementedError

    def read_into(self, fd: int, buffer: object, timeout: Optional[float] = None) -> int:
        """Copy fd's next message into ``buffer`` (writable bytes-like, e.g. a
        bytearray); return its size. Blocks like read(). A message of 64 KiB
        or more that fits is read from the socket straight into the buffer
        (no copy in between); one that does not fit raises
        MessageTooLargeError and stays queued for the next read."""
        raise NotImplementedError

    def write_many(self, fd: int, payloads: object, timeout: Optional[float] = None) -> None:
        """write() every payload of an iterable to fd, in order, gathered into
        as few system calls as possible; blocks until all are written. Every
        payload is checked (type, size) before anything is sent."""
        raise NotImplementedError

    def read_many(self, fd: int, max_messages: int = DEFAULT_READ_MANY,
                  timeout: Optional[float] = None) -> list[bytes]:
        """Return fd's next messages: at least one (blocking for it, as read()
        does), at most ``max_messages`` (1 to MAX_READ_MANY): every whole
        message of fd already received, in order. No Event per message."""
        raise NotImplementedError

    def wait_event(self, timeout: Optional[float] = None) -> Event:
        """Return one event, waiting at most ``timer`` ms (then TIMER); with
        ``timeout`` (seconds), pyipc.TimeoutError when it passes first."""
        timeout = check_timeout(timeout)    # even when an event is there to return
        if not self._pending:
            self._fetch(timeout)
        return self._pending.popleft()

    def wait_events(self, timeout: Optional[float] = None) -> list[Event]:
        """Return every event ready now (at least one), in order (waiting as
        wait_event does)."""
        timeout = check_timeout(timeout)    # even when events are there to return
        if not self._pending:
            self._fetch(timeout)
        events = list(self._pending)
        self._pending.clear()
        return events

    def _fetch(self, timeout: Optional[float]) -> None:
        """Run the backend's event loop until _pending holds at least one
        event; TimeoutError when ``timeout`` seconds pass first."""
        raise NotImplementedError

    def add_external(self, fd: int) -> None:
        """Watch a foreign fd: EXTERNAL events while it is readable."""
        raise NotImplementedError

    def add_switch(self, fd1: int, fd2: int) -> None:
        """Forward messages between fd1 and fd2, both ways."""
        raise NotImplementedError

    def set_switch_callbacks(self, fd: int, on_in: Optional[OnIn],
                             on_out: Optional[OnOut]) -> None:
        """Read (on_in) and write (on_out) fd's foreign protocol when switched."""
        raise NotImplementedError

    def peer_credentials(self, fd: int) -> Tuple[int, int, int]:
        """(pid, uid, gid) of the process at the other end of connection fd."""
        raise NotImplementedError

    def close(self, fd: int, linger: Optional[float] = None) -> None:
        """Close and forget fd (no event); a service's socket file is removed.
        What is still scheduled for fd is sent first, for ``linger`` seconds
        at most (None: the context's linger; 0 to drop a peer that does not
        read); the rest is dropped with a WARNING."""
        raise NotImplementedError

    def close_all(self) -> None:
        """Close every fd of the context, after sending what is scheduled
        (for ``linger`` seconds at most, as close does)."""
        raise NotImplementedError

    def _close_in_child(self, fd: Optional[int]) -> None:
        """In a forked child: close this process's copies of fd (every fd
        when None) and nothing else (see _threads.ForkedGuard)."""
        raise NotImplementedError

    # -- typed messages (pyipc.typed; the same on both backends) -----------------
    def write_typed(self, fd: int, obj: object, registry: "Registry",
                    timeout: Optional[float] = None) -> None:
        """write() the typed message ``registry.encode(obj)`` to fd."""
        self.write(fd, registry.encode(obj), timeout)

    def schedule_typed(self, fd: int, obj: object, registry: "Registry") -> None:
        """schedule() the typed message ``registry.encode(obj)`` for fd."""
        self.schedule(fd, registry.encode(obj))

    def read_typed(self, fd: int, registry: "Registry", timeout: Optional[float] = None) -> Any:
        """read() the next message of fd and return ``registry.decode()`` of it.

        A message that does not decode is consumed all the same: the
        TypedMessageError is raised and the connection stays open.
        """
        return registry.decode(self.read(fd, timeout))


def _warn_unclosed(description: str) -> None:
    """Finalizer of a context collected without close_all()."""
    warnings.warn(f"unclosed {description}", ResourceWarning, stacklevel=2)


def _raise_if_ended(ev: Event) -> None:
    """A read meeting ``ev``, an event of its fd that comes before any message
    of it: the ERROR of a frame over max_message_size raises
    MessageTooLargeError (that header came after messages in one read: they
    were returned first), the DISCONNECTION ConnectionClosedError."""
    if ev.type == EventType.ERROR and ev.error is not None and is_too_large_text(ev.error):
        raise MessageTooLargeError(ev.error)
    if ev.type == EventType.DISCONNECTION:
        raise ConnectionClosedError(f"connection on fd {ev.fd} is closed by the peer")


def _check_limits(max_message_size: int, max_queue_size: int, max_connections: int) -> None:
    for name, value in (("max_message_size", max_message_size),
                        ("max_queue_size", max_queue_size),
                        ("max_connections", max_connections)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be int, not {type(value).__name__}")
    if not 1 <= max_message_size <= MAX_MESSAGE_SIZE_LIMIT:
        raise ValueError(f"max_message_size must be between 1 and {MAX_MESSAGE_SIZE_LIMIT}")
    if not max_message_size + 4 <= max_queue_size < 1 << 63:
        raise ValueError("max_queue_size must be at least max_message_size + 4")
    if not 1 <= max_connections <= 0x7FFFFFFF:
        raise ValueError("max_connections must be between 1 and 2147483647")
