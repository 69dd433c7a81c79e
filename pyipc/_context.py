"""The public `Context` class: the base of both backends' classes.

`pyipc.Context(...)` returns an instance of the chosen backend's subclass
(`_pure.context.PureContext` or `_native.NativeContext`; pyipc._backend
chooses). Everything that does not depend on the backend lives here, so both
behave the same. This module imports no backend: they import it.
"""

from __future__ import annotations

import inspect
import os
import threading
import warnings
import weakref
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Iterator, NoReturn, Optional, Tuple,
                    Type, TypeVar, overload)

from . import _threads
from ._checks import (OnIn, OnOut, check_busy_poll, check_limits, check_linger,
                      check_switch_events, check_timeout, check_timer)
from ._rundir import PathLike, resolve_rundir
from ._types import (DEFAULT_LINGER, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_MESSAGE_SIZE,
                     DEFAULT_MAX_QUEUE_SIZE, DEFAULT_READ_MANY, Buffer, Event, IPCError,
                     Payload)

if TYPE_CHECKING:
    from .typed import Registry

#: The message class a caller of read_typed(..., cls=) expects.
M = TypeVar("M")
#: A backend's class (see named_as_context).
_Class = TypeVar("_Class", bound=type)

#: Context()'s choice of backend: its `backend` argument in, the subclass
#: to make out. pyipc._backend plugs it in (set_chooser) as pyipc is
#: imported: the base class imports no backend, the backends import it.
_chooser: Optional[Callable[[Optional[str]], type]] = None


def set_chooser(chooser: Callable[[Optional[str]], type]) -> None:
    """Make `chooser` the function Context() asks for the backend's class."""
    global _chooser
    _chooser = chooser


#: Every Context alive in this process: a forked child marks them (see
#: _threads.ForkedGuard) so that they never touch the parent's service.
_LIVE: "weakref.WeakSet[Context]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for ctx in list(_LIVE):
        inherited = ctx._guard
        ctx._guard = _threads.ForkedGuard(inherited)
        # A thread was inside at the fork: the context's state (its table
        # of fds) may have been half changed, so it is not walked.
        ctx._forked(settled=not inherited._lock.locked())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


#: The TypeError of pickling or copying a context (its class's name in {}).
NOT_COPIED = ("a {} cannot be pickled or copied: it owns this process's sockets and "
              "poller; make a new one where it is needed")


class Context:
    """An event loop over services, connections and foreign fds.

    `Context(rundir=None, max_message_size=16 MiB, backend=None,
    max_queue_size=64 MiB, max_connections=65536, linger=1.0)`. `backend`
    is "native", "pure" or None (env PYIPC_BACKEND, else native when it loads,
    else pure). `linger`: seconds closing waits for scheduled messages to go
    out (0: they are dropped at once). Every method's behaviour, and
    signals, timeouts and fork, are in the
    [behaviour reference](reference.md) (docs/reference.md).
    """

    __slots__ = ("rundir", "_max_message_size", "_max_queue_size", "_max_connections",
                 "_linger_s", "_timer", "_busy_poll", "_switch_events", "_guard", "_unclosed",
                 "__weakref__")

    backend: str = "abstract"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each backend's public methods hold the thread guard (see _threads)."""
        super().__init_subclass__(**kwargs)
        _threads.guard_methods(cls)

    def __new__(cls, *args: object, **kwargs: object) -> "Context":
        if cls is Context:
            assert _chooser is not None, "pyipc/__init__.py plugs in pyipc._backend's"
            # backend is __init__'s third parameter, by keyword or by position.
            backend = args[2] if len(args) > 2 else kwargs.get("backend")
            cls = _chooser(backend)  # type: ignore[arg-type]
        return object.__new__(cls)

    def __init__(self, rundir: Optional[PathLike] = None,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 backend: Optional[str] = None,
                 max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 linger: float = DEFAULT_LINGER) -> None:
        check_limits(max_message_size, max_queue_size, max_connections)
        self._linger_s = check_linger(linger)
        self.rundir: str = resolve_rundir(rundir)
        self._max_message_size = max_message_size
        self._max_queue_size = max_queue_size
        self._max_connections = max_connections
        self._timer: Optional[int] = None
        self._busy_poll = 0
        self._switch_events = True
        self._guard: _threads.ThreadGuard = _threads.ThreadGuard()
        _LIVE.add(self)
        self._unclosed: Optional[weakref.finalize[[str], Context]] = None

    # The limits are the context's for its whole life: the core and every
    # connection's decoder took them when it was made (assigning one later
    # used to change a plain attribute that one backend applied in part and
    # the other not at all).
    @property
    def max_message_size(self) -> int:
        """Largest message sent or accepted, in bytes (set by the constructor)."""
        return self._max_message_size

    @max_message_size.setter
    def max_message_size(self, value: int) -> None:
        _limit_is_fixed("max_message_size")

    @property
    def max_queue_size(self) -> int:
        """Bytes queued per connection at most (set by the constructor)."""
        return self._max_queue_size

    @max_queue_size.setter
    def max_queue_size(self, value: int) -> None:
        _limit_is_fixed("max_queue_size")

    @property
    def max_connections(self) -> int:
        """Fds this context manages at most (set by the constructor)."""
        return self._max_connections

    @max_connections.setter
    def max_connections(self, value: int) -> None:
        _limit_is_fixed("max_connections")

    def _track_unclosed(self) -> None:
        """The end of a backend's __init__: from now on, the context warns
        (ResourceWarning) if it is garbage-collected before close_all() or
        the end of its `with` block, as an unclosed file or socket does."""
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
        check_timer(value)
        if self._guard.forked:          # the timer is the parent's (fileno()'s timerfd)
            raise IPCError(_threads.FORK_TEXT)
        self._check_settable()
        self._timer = value
        self._timer_changed(value)

    def _check_settable(self) -> None:
        """timer, busy_poll and switch_events are set by the owner's thread,
        or while no thread is inside: another thread's wait reads them (the
        native core's, with the GIL released). IPCError as for any call but
        the four handed over (a short call of another thread is not a wait)."""
        guard = self._guard
        owner = guard._owner
        if owner is not None and owner != threading.get_ident() and not guard._short:
            raise IPCError(_threads.BUSY_TEXT)

    def _timer_changed(self, value: Optional[int]) -> None:
        """Hook for backends that keep the timer elsewhere."""

    # -- linger ------------------------------------------------------------------
    @property
    def linger(self) -> float:
        """Seconds close(), close_all() and leaving a `with` block wait for
        scheduled messages to go out before they drop the rest with a WARNING
        (0: dropped at once). Default DEFAULT_LINGER (1 s)."""
        return self._linger_s

    @linger.setter
    def linger(self, value: float) -> None:
        self._linger_s = check_linger(value)

    def _linger_of(self, linger: Optional[float]) -> float:
        """close()'s `linger=`: checked, or the context's when None."""
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
        check_busy_poll(value)
        self._check_settable()
        self._busy_poll_changed(value)      # first: if it fails, nothing changed
        self._busy_poll = value

    def _busy_poll_changed(self, value: int) -> None:
        """Hook for backends that keep busy_poll elsewhere."""

    # -- switching events ---------------------------------------------------------
    @property
    def switch_events(self) -> bool:
        """Whether SWITCH_RX and SWITCH_TX events of switched pairs are
        reported (True, the default). False: relayed messages make no event
        (on the native backend no Python runs per relayed message); ERROR and
        DISCONNECTION of a switched fd are still reported. Set it from the
        thread that owns the context (or a callback)."""
        return self._switch_events

    @switch_events.setter
    def switch_events(self, value: bool) -> None:
        value = check_switch_events(value)
        self._check_settable()
        self._switch_events_changed(value)
        self._switch_events = value

    def _switch_events_changed(self, value: bool) -> None:
        """Hook: the backend stops or starts reporting SWITCH_RX/SWITCH_TX."""
        raise NotImplementedError

    def _wakeup(self) -> None:
        """Any thread: make a wait in progress return (schedule() hand-over)."""
        raise NotImplementedError

    # -- conveniences ------------------------------------------------------------
    def __reduce_ex__(self, protocol: object) -> NoReturn:
        """A Context is not pickled, copied or deep-copied: it owns this
        process's sockets and poller, which no copy could share or rebuild."""
        raise TypeError(NOT_COPIED.format("pyipc.Context"))

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_all()

    def __iter__(self) -> Iterator[Event]:
        """Yield events forever (wait_event in a loop)."""
        while True:
            yield self.wait_event()

    def connect(self, name: str, timeout: Optional[float] = None) -> int:
        """Connect to service `name`: through ipcd when IPC_NETWORK is set
        (`timeout` bounds the whole exchange with ipcd: connecting to it,
        sending the request, waiting for its answer); else straight, with
        `timeout` bounding the wait of a service whose listen backlog is full."""
        timeout = check_timeout(timeout)
        raw = os.environb.get(b"IPC_NETWORK")
        if not raw:
            return self._connect_direct(name, timeout)
        try:
            network = raw.decode("utf-8")
        except UnicodeDecodeError:      # sent to ipcd as text: refused as native does
            raise IPCError("IPC_NETWORK is not valid UTF-8") from None
        return self._connect_ipcd(name, network, timeout)

    def __repr__(self) -> str:
        return f"<pyipc.Context backend={self.backend} rundir={self.rundir!r}>"

    # -- the backend's part (documented in docs/reference.md) --------------------
    def service_init(self, name: str) -> int:
        """Listen as service `name`; return the listening fd."""
        raise NotImplementedError

    def connect_service(self, name: str) -> int:
        """Connect straight to service `name`; return the connection fd."""
        raise NotImplementedError

    def _connect_direct(self, name: str, timeout: Optional[float]) -> int:
        """connect_service() bounded by `timeout` (connect() without IPC_NETWORK)."""
        raise NotImplementedError

    def _connect_ipcd(self, name: str, network: str, timeout: Optional[float]) -> int:
        raise NotImplementedError

    def write(self, fd: int, payload: Payload, timeout: Optional[float] = None) -> None:
        """Flush fd's queue, then write one message, blocking until it is
        written (at most `timeout` seconds: then pyipc.TimeoutError)."""
        raise NotImplementedError

    def schedule(self, fd: int, payload: Payload) -> None:
        """Queue one message for fd; the event loop sends it (MESSAGE_TX)."""
        raise NotImplementedError

    def read(self, fd: int, timeout: Optional[float] = None) -> bytes:
        """Return the next message from fd, blocking until one is whole (at
        most `timeout` seconds: then pyipc.TimeoutError, nothing consumed)."""
        raise NotImplementedError

    def read_into(self, fd: int, buffer: Buffer, timeout: Optional[float] = None) -> int:
        """Copy fd's next message into `buffer` (writable bytes-like, e.g. a
        bytearray); return its size. Blocks like read(). A message of 64 KiB
        or more that fits is read from the socket straight into the buffer
        (no copy in between); one that does not fit raises
        MessageTooLargeError and stays queued for the next read."""
        raise NotImplementedError

    def write_many(self, fd: int, payloads: Iterable[Payload],
                   timeout: Optional[float] = None) -> None:
        """write() every payload of an iterable to fd, in order, gathered into
        as few system calls as possible; blocks until all are written. Every
        payload is checked (type, size) before anything is sent."""
        raise NotImplementedError

    def read_many(self, fd: int, max_messages: int = DEFAULT_READ_MANY,
                  timeout: Optional[float] = None) -> list[bytes]:
        """Return fd's next messages: at least one (blocking for it, as read()
        does), at most `max_messages` (1 to MAX_READ_MANY): every whole
        message of fd already received, in order. No Event per message."""
        raise NotImplementedError

    def wait_event(self, timeout: Optional[float] = None) -> Event:
        """Return one event, waiting at most `timer` ms (then TIMER); with
        `timeout` (seconds), pyipc.TimeoutError when it passes first."""
        raise NotImplementedError

    def wait_events(self, timeout: Optional[float] = None) -> list[Event]:
        """Return every event ready now (at least one), in order (waiting as
        wait_event does)."""
        raise NotImplementedError

    def fileno(self) -> int:
        """One fd, readable (level-triggered) while ``wait_events(timeout=0)``
        would return something, so that another event loop (selectors,
        asyncio's add_reader, GLib...) can drive the context: watch it, and
        when it is readable call wait_events(timeout=0) until it returns [].
        The context owns it (do not close it); close_all() closes it. See
        "Driving a context from another event loop" in docs/guide.md."""
        raise NotImplementedError

    def add_external(self, fd: int) -> None:
        """Watch a foreign fd: EXTERNAL events while it is readable."""
        raise NotImplementedError

    def add_connection(self, fd: int) -> None:
        """Manage fd, a connected Unix or TCP stream socket made elsewhere (received
        by SCM_RIGHTS, one end of a socketpair), as a connection of this
        context: from now on the context owns it (reads, writes and closes
        it) as if connect() had made it."""
        raise NotImplementedError

    def pause_reading(self, fd: int, paused: bool = True) -> None:
        """Stop (or, `paused=False`, resume) reading connection or external
        fd in the event loop: no MESSAGE_RX or EXTERNAL comes for it, and
        what its peer sends waits in the kernel, so the peer's writes block
        (back-pressure), as asyncio's transport.pause_reading(). A hang-up
        while paused is seen once resumed; read() of fd still reads it.
        `paused` must be a bool (TypeError otherwise)."""
        raise NotImplementedError

    def add_switch(self, fd1: int, fd2: int) -> None:
        """Forward messages between fd1 and fd2, both ways."""
        raise NotImplementedError

    def set_switch_callbacks(self, fd: int, on_in: Optional[OnIn],
                             on_out: Optional[OnOut]) -> None:
        """Read (on_in) and write (on_out) fd's foreign protocol when switched."""
        raise NotImplementedError

    def switch_send(self, fd: int, data: Buffer) -> None:
        """Queue raw bytes (not framed) for switched fd `fd`, written in order
        with the rest of its output: for a foreign protocol's own replies
        from a callback (a WebSocket pong, TLS handshake records), or fd's
        on_out output. QueueFullError when fd's queue is over max_queue_size
        (or data alone is larger), except from fd's own on_out (back-pressure
        holds the other side instead)."""
        raise NotImplementedError

    def switch_end(self, fd: int, reason: Optional[str] = None) -> None:
        """End the switch of fd: stop reading both sides, write what is
        queued for each (e.g. a close frame switch_send queued), then close
        each; ERROR with `reason` (if any) for fd, then DISCONNECTION of both."""
        raise NotImplementedError

    def peer_credentials(self, fd: int) -> Tuple[int, int, int]:
        """(pid, uid, gid) of the process at the other end of connection fd;
        IPCError for a connection that is not a Unix socket (TCP has none)."""
        raise NotImplementedError

    def close(self, fd: int, linger: Optional[float] = None) -> None:
        """Close and forget fd (no event); a service's socket file is removed.
        What is still scheduled for fd is sent first, for `linger` seconds
        at most (None: the context's linger; 0 to drop a peer that does not
        read); the rest is dropped with a WARNING."""
        raise NotImplementedError

    def close_all(self) -> None:
        """Close every fd of the context, after sending what is scheduled
        (for `linger` seconds at most, as close does)."""
        raise NotImplementedError

    def _close_in_child(self, fd: Optional[int]) -> None:
        """In a forked child: close this process's copies of fd (every fd
        when None) and nothing else (see _threads.ForkedGuard)."""
        raise NotImplementedError

    def _nested_call(self, method: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        """`method` called inside another call of this thread (a signal
        handler's, a switch callback's; see _threads.ThreadGuard.call): the
        native backend keeps the core's state of the outer call across it."""
        return method(self, *args, **kwargs)

    def _forked(self, settled: bool) -> None:
        """In a forked child, at once (the at-fork hook): forget what this
        process's copy holds that a call could use without the guard (the
        native backend's schedule() buffer); when `settled` (no thread was
        inside at the fork), put /dev/null on the child's copies of the
        lock fds and sockets (docs/reference.md, "Signals, timeouts and
        fork"). Nothing by default."""

    # -- typed messages (pyipc.typed; the same on both backends) -----------------
    def write_typed(self, fd: int, obj: object, registry: "Registry",
                    timeout: Optional[float] = None) -> None:
        """write() the typed message `registry.encode(obj)` to fd."""
        _check_typed(registry)
        self.write(fd, registry.encode(obj), timeout)

    def schedule_typed(self, fd: int, obj: object, registry: "Registry") -> None:
        """schedule() the typed message `registry.encode(obj)` for fd."""
        _check_typed(registry)
        self.schedule(fd, registry.encode(obj))

    @overload
    def read_typed(self, fd: int, registry: "Registry",
                   timeout: Optional[float] = None) -> Any: ...

    @overload
    def read_typed(self, fd: int, registry: "Registry", timeout: Optional[float] = None, *,
                   cls: Type[M]) -> M: ...

    def read_typed(self, fd: int, registry: "Registry", timeout: Optional[float] = None, *,
                   cls: Optional[Type[M]] = None) -> Any:
        """read() the next message of fd and return `registry.decode()` of it;
        with `cls`, `registry.decode(payload, cls)`: the message must be of
        that class (else pyipc.typed.UnexpectedTypeError), and a type checker
        knows it is.

        A message that does not decode is consumed all the same: the
        TypedMessageError is raised and the connection stays open. A wrong
        `registry` or `cls` (TypeError) is refused before reading: the message
        stays queued.
        """
        _check_typed(registry, cls)
        payload = self.read(fd, timeout)
        return registry.decode(payload) if cls is None else registry.decode(payload, cls)


def _constructor_signature() -> inspect.Signature:
    """Context(...)'s signature: __init__'s without self. inspect.signature
    (help(), IDEs) reads __new__ first, whose (*args, **kwargs) hid it."""
    init = inspect.signature(Context.__init__)
    return init.replace(parameters=list(init.parameters.values())[1:])


# Inherited by the backends' classes, whose __init__ has the same parameters.
setattr(Context, "__signature__", _constructor_signature())


def _check_typed(registry: object, cls: object = None) -> None:
    """pyipc.typed.check_typed_arguments(), imported when first needed (a
    context that sends no typed message does not import typed and cbor2)."""
    from .typed import check_typed_arguments
    check_typed_arguments(registry, cls)


def _warn_unclosed(description: str) -> None:
    """Finalizer of a context collected without close_all()."""
    warnings.warn(f"unclosed {description}", ResourceWarning, stacklevel=2)


def _limit_is_fixed(name: str) -> None:
    raise AttributeError(f"{name} is fixed for the context's life: give it to the "
                         f"constructor, Context({name}=...)")


def named_as_context(cls: _Class) -> _Class:
    """Name every public method of backend class `cls` (and its properties'
    accessors) `Context.NAME`, as the caller knows it: Python's own
    TypeError for a call with wrong arguments names the function's
    `__qualname__`, which was the backend's class or mixin
    (`NativeContext.read()`, `Reading.read()`), so the two backends' texts
    differed for the same mistake. A class decorator: returns cls."""
    for name in dir(Context):
        if name.startswith("_"):
            continue
        member = inspect.getattr_static(cls, name)
        parts = (member.fget, member.fset, member.fdel) if isinstance(member, property) \
            else (getattr(member, "__func__", member),)
        for part in parts:
            if inspect.isfunction(part):
                part.__qualname__ = f"Context.{name}"
    return cls

