"""The native backend: the Zig core (libipc) through cffi in ABI mode.

The declarations come from the one header, `libipc.h` (between its CFFI
markers), so there is no second copy of the C ABI here: event types, error
codes and callback results are read from it too. Where the library and the
header are looked up: pyipc._libpath.

The events this backend has not returned yet wait in the core's queue, the
one queue of a native context: wait_event() takes one at a time, and the
reads take their fd's messages from it (the core does).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import struct
import sys
import time
import weakref
from array import array
from itertools import accumulate
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, Collection, Iterable, NoReturn, Optional,
                    Protocol, Tuple,
                    TypeVar)

from . import _libpath
from ._checks import (DISCARD_TEXT, Bytes, OnIn, OnOut, as_payload, as_payload_list,
                      buffer_too_small_text, check_callbacks, check_fd, check_max_messages,
                      check_name, check_paused, check_timeout, too_large_text, writable_view)
from ._checks import check_reason, check_switch_data      # the switching extension
from ._context import Context, named_as_context
from ._events import EventQueue
from ._threads import _thread_count, guarded_schedule
from ._native_events import EventDecoder
from ._pure.fdpass import adopt_connection, ask_ipcd
from ._types import Buffer, Payload
from ._types import (DEFAULT_READ_MANY, ERRORS_BY_NAME, READ_MANY_BYTES, BackendError, CBEvent,
                     Event, EventType, InvalidNameError, IPCError, MessageTooLargeError)

log = logging.getLogger("pyipc")

# cffi ships no types: the FFI, the library and the C values it makes are Any
# here, except where this module says what they are: the pointers and arrays
# it reads and writes item by item (_Cell), _MEMORY, and the library's
# functions it calls on the hot paths (each returns an int code).
if TYPE_CHECKING:
    T = TypeVar("T")

    class _Cell(Protocol[T]):
        """A cffi pointer or array of T: `p[i]` reads and writes an item."""

        def __getitem__(self, i: int) -> T: ...
        def __setitem__(self, i: int, value: T) -> None: ...

    from ._native_events import Memory as _Memory

#: close_all() first asks the core for this many fds with scheduled messages
#: left (for its warnings; when more have some, it asks again with room for all).
SCHEDULED_FDS = 64
#: Events fetched from the core per call (more stay queued in the core).
EVENT_BATCH = 1024
#: read()/read_many() copy messages into this buffer (kept by the context),
#: so a read_many batch holds READ_MANY_BYTES at most; a larger message is
#: copied once, straight from the core's buffer (lent).
READ_BUFFER = READ_MANY_BYTES
#: write_many() sends payloads of this average size and more from where they
#: are (one pointer each); smaller ones are joined first (cheaper per message).
WRITE_FROM_PLACE = 4096
#: schedule() keeps payloads of up to this many bytes (bytes objects) in the
#: context and hands them to the core in one call (ipc_schedule_many) when the
#: context next enters the core: a wait, a read, a write, a close (issue 21).
#: Larger ones are queued by the core at once (one copy either way).
SCHEDULE_BUFFERED = 4096
#: schedule() hands a bytes payload of at least this many bytes to the core
#: pinned (ipc_schedule_pinned): the core writes it from the object itself,
#: which the context keeps until the core hands its token back (_unpin), so
#: the kernel's copy is the only one. bytes only: it cannot change meanwhile.
#: CPython only: there cffi passes a bytes object as a pointer to its own
#: data, which stays where it is while the object lives (an interpreter with a
#: moving GC may hand C a temporary copy).
SCHEDULE_PINNED = 16 * 1024 if sys.implementation.name == "cpython" else 1 << 62
#: Released pin tokens taken from the core per call.
UNPIN_BATCH = 256


def _load() -> Tuple[Any, Any, Path, Path]:
    try:
        import cffi
    except ImportError as e:
        raise BackendError(f"native backend needs cffi: {e}") from None
    header = _libpath.header_path()
    if header is None:
        raise BackendError("native backend: libipc.h not found next to the package")
    ffi = cffi.FFI()
    ffi.cdef(_libpath.declarations(header))
    tried = []
    for path in _libpath.library_candidates():
        if path.exists():
            try:
                return ffi, ffi.dlopen(str(path)), path, header
            except OSError as e:
                tried.append(f"{path}: {e}")
        else:
            tried.append(f"{path}: not found")
    raise BackendError("native backend: cannot load libipc (" + "; ".join(tried) + ")")


ffi, lib, LIBRARY_PATH, HEADER_PATH = _load()

# The C ABI's numbers, from the header (libipc.h is the contract).
_E_BUFFER_TOO_SMALL: int = lib.IPC_E_BUFFER_TOO_SMALL
_E_NO_MEMORY: int = lib.IPC_E_NO_MEMORY
#: A signal ended a blocking call (the context is interruptible): its Python
#: handler runs as the call returns; if it returns, the call is made again.
_E_INTERRUPTED: int = lib.IPC_E_INTERRUPTED
#: The error class of each code the core returns.
_ERRORS = {getattr(lib, name): cls for name, cls in ERRORS_BY_NAME.items()}
#: The EventType of each event type number of the core.
_TYPES = {code: EventType[name]
          for code, name in ffi.typeof("enum event_types").elements.items()}
#: The core's number of each callback result (pyipc.CBEvent).
_CB_CODES: dict[CBEvent, int] = {CBEvent[name[len("CB_"):]]: code
             for code, name in ffi.typeof("enum cb_event_types").elements.items()}
_CB_ERROR = _CB_CODES[CBEvent.ERROR]

# Hot functions, looked up once.
_ipc_write: Callable[..., int]
_ipc_schedule: Callable[..., int]
_ipc_read_fd: Callable[..., int]
_ipc_wait_events: Callable[..., int]
_ipc_pending_events: Callable[..., int]
_ipc_write_many: Callable[..., int]
_ipc_read_many: Callable[..., int]
_ipc_write_many_ptrs: Callable[..., int]
_ipc_read_lent: Callable[..., int]
_ipc_read_into: Callable[..., int]
_ipc_write, _ipc_schedule, _ipc_read_fd = lib.ipc_write, lib.ipc_schedule, lib.ipc_read_fd
_ipc_wait_events, _ipc_pending_events = lib.ipc_wait_events, lib.ipc_pending_events
_ipc_write_many, _ipc_read_many = lib.ipc_write_many, lib.ipc_read_many
_ipc_write_many_ptrs, _ipc_read_lent = lib.ipc_write_many_ptrs, lib.ipc_read_lent
_ipc_read_into = lib.ipc_read_into
_ipc_schedule_many: Callable[..., int] = lib.ipc_schedule_many
_ipc_schedule_room: Callable[..., int] = lib.ipc_schedule_room
_ipc_schedule_pinned: Callable[..., int] = lib.ipc_schedule_pinned
_ipc_unpinned: Callable[..., int] = lib.ipc_unpinned
_from_buffer = ffi.from_buffer
# The C types _flush makes, resolved once: from a type's name cffi parses it
# in Python on each call, where a signal's handler can run, and that handler
# flushing in its turn parses again (endlessly, with a fast timer).
_INT_ARRAY, _U32_ARRAY, _SIZE_P = ffi.typeof("int[]"), ffi.typeof("uint32_t[]"), \
    ffi.typeof("size_t *")
_join = b"".join
_unpack = ffi.unpack
#: A bytes-slicing view of this process's memory from address 1: a payload at
#: address A with length L (lent by the core, or in read()'s buffer) is copied
#: out as _MEMORY[A-1:A-1+L], one C-level slice instead of several cffi calls.
#: Only the slices taken are read, and only while the memory is valid (a lent
#: payload until the core's next wait).
_MEMORY: _Memory = ffi.buffer(ffi.cast("char *", 1), sys.maxsize - 1)
#: The range of a C int (an fd argument).
_INT_MIN, _INT_MAX = -0x80000000, 0x7FFFFFFF


@named_as_context
class NativeContext(Context):
    """The native (Zig) backend of `pyipc.Context`."""

    __slots__ = ("_handle", "_ctx", "_events", "_decoder", "_ecount", "_sizes", "_count", "_lent",
                 "_rbuf", "_rbuf_at", "_rlen", "_core_timeout", "_handed",
                 "_close_info", "_pending", "_room", "_room_out", "_handovers", "_in_round",
                 "_buffer_max", "_alone", "_pins", "_unpinned", "_unpinning",
                 "_callbacks", "_cb_in", "_cb_out", "_finalizer", "_reading")

    backend = "native"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._handle = ffi.new("void **")
        if lib.ipc_context_init(self._handle) != 0:
            _init_failed(ffi.errno)
        self._ctx = self._handle[0]
        #: id(payload) -> [payload, times pinned] for each payload the core
        #: writes from (see SCHEDULE_PINNED); the finalizer holds it too, so
        #: no pinned payload is freed before the core is.
        self._pins: dict[int, list[Any]] = {}
        self._unpinned: _Cell[int] = ffi.new("uint64_t[]", UNPIN_BATCH)
        self._unpinning = False
        self._finalizer = weakref.finalize(self, _free_context, self._handle, self._pins)
        # Blocking calls return on a signal, so that its Python handler runs
        # (PEP 475); each call then goes on, or raises what the handler raised.
        lib.ipc_context_interruptible(self._ctx, 1)
        #: The call timeout last given to the core (us), None for no limit.
        self._core_timeout: Optional[int] = None
        rundir = os.fsencode(self.rundir)
        self._check(lib.ipc_context_set_rundir(self._ctx, rundir, len(rundir)))
        self._check(lib.ipc_context_set_limits(self._ctx, self._max_message_size,
                                               self._max_queue_size, self._max_connections))
        self._events = ffi.new("struct ipc_event[]", EVENT_BATCH)
        self._decoder = EventDecoder(ffi, self._events, _MEMORY, _TYPES)
        self._sizes: _Cell[int] = ffi.new("uint32_t[]", DEFAULT_READ_MANY)
        self._count: _Cell[int] = ffi.new("size_t *")
        #: Events of the batch in _events not converted yet (see _keep_handed).
        self._ecount: _Cell[int] = ffi.new("size_t *")
        #: Events the core handed over that a signal's handler kept from
        #: being returned (see _keep_handed); empty otherwise.
        self._handed = EventQueue()
        self._rbuf = ffi.new("char[]", READ_BUFFER)
        # Where read() copies a message out from: _MEMORY[at:at + size] (see _MEMORY).
        self._rbuf_at = int(ffi.cast("uintptr_t", self._rbuf)) - 1
        self._lent: Tuple[_Cell[Any], _Cell[int]] = (ffi.new("char **"), ffi.new("size_t *"))
        self._rlen: _Cell[int] = ffi.new("size_t *")
        #: A read is between its C call and copying out what it got (see
        #: _read_nested): the cells above hold its result meanwhile.
        self._reading = False
        self._close_info: Tuple[_Cell[int], _Cell[int], _Cell[int]] = (
            ffi.new("size_t *"), ffi.new("int *"), ffi.new("size_t *"))
        self._callbacks: dict[int, Tuple[Optional[OnIn], Optional[OnOut]]] = {}
        # schedule()'s buffer (see SCHEDULE_BUFFERED and _flush): the fd and the
        # payload of each message not handed to the core yet, in order, flat
        # (fd, payload, fd, payload...: one list, grown two items at a time).
        self._pending: list[Any] = []
        #: fd -> bytes its core queue still takes, learnt (ipc_schedule_room)
        #: since the last call into the core, minus what was buffered since.
        #: An fd with buffered messages always has its entry.
        self._room: dict[int, int] = {}
        self._room_out: _Cell[int] = ffi.new("uint64_t *")
        #: How many times _flush handed the buffer over (see _flush).
        self._handovers = 0
        #: The core is running a round (switch callbacks may call schedule()).
        self._in_round = False
        #: Payloads up to this size are buffered; -1 once fileno() was asked
        #: for (another loop waits on that fd: it must see every schedule()).
        self._buffer_max = min(SCHEDULE_BUFFERED, self._max_message_size)
        #: The core was told that this process has one thread (see _reads_wait).
        self._alone = False
        self._cb_in = ffi.callback("enum cb_event_types(int, char *, uint32_t *)",
                                   _trampoline_in(weakref.ref(self)))
        self._cb_out = ffi.callback("enum cb_event_types(int, const char *, uint32_t)",
                                    _trampoline_out(weakref.ref(self)))
        self._track_unclosed()

    def _check(self, rc: int, *fds: int, passed: Tuple[int, ...] = ()) -> int:
        """Raise the error class of a negative return code, with the core's text.

        `fds` are the Python fd arguments of the call: one out of C's int
        range was passed as -1 (or as `passed` gives, fd by fd), and is
        named as given in the message.
        """
        if rc >= 0:
            return rc
        if rc == _E_NO_MEMORY:
            raise MemoryError(ffi.string(lib.ipc_last_error(self._ctx)).decode())
        cls = _ERRORS.get(rc, IPCError)
        # surrogateescape: a name or run dir with an undecodable byte is shown
        # as the pure backend shows it (the str given, os.fsdecode's escape).
        text = ffi.string(lib.ipc_last_error(self._ctx)).decode("utf-8", "surrogateescape")
        for fd, c_fd in zip(fds, passed or map(_fd_arg, fds)):
            prefix = f"fd {c_fd} "
            if c_fd != fd and text.startswith(prefix):
                text = f"fd {fd} " + text[len(prefix):]
                break
        raise cls(text, lib.ipc_last_errno(self._ctx) or None)

    def _timer_changed(self, value: Optional[int]) -> None:
        lib.ipc_context_timer(self._ctx, -1 if value is None else value)

    def _busy_poll_changed(self, value: int) -> None:
        self._check(lib.ipc_context_busy_poll(self._ctx, value))

    # -- timeouts and signals ------------------------------------------------------
    def _start_timeout(self, timeout: Optional[float]) -> Optional[float]:
        """Give the core the timeout of the blocking call starting now (it
        keeps the last one given: a call without timeout clears it); return
        the call's deadline on the monotonic clock, or None."""
        timeout = check_timeout(timeout)
        if timeout is None:
            self._set_core_timeout(None)
            return None
        # Rounded up: a positive timeout under 1 us must not become 0, the
        # core's zero-timeout mode (its timer counted from when it last
        # started, no "nothing to wait for"); pure tells them apart as 0 or not.
        self._set_core_timeout(math.ceil(timeout * 1e6))
        return time.monotonic() + timeout

    def _set_core_timeout(self, us: Optional[int]) -> None:
        if us != self._core_timeout:
            lib.ipc_context_call_timeout(self._ctx, -1 if us is None else us)
            self._core_timeout = us

    def _resume(self, deadline: Optional[float]) -> None:
        """A blocking call came back with _E_INTERRUPTED and the signal's
        handler returned: the call goes on, with what is left of its timeout."""
        if deadline is not None:
            # (rounded up as _start_timeout does: a zero-timeout call's
            # deadline has passed, it is given 0 again)
            self._set_core_timeout(max(0, math.ceil((deadline - time.monotonic()) * 1e6)))

    def _read_again(self, deadline: Optional[float]) -> None:
        """A blocking read came back with _E_INTERRUPTED, nothing consumed: a
        signal whose handler returned, or another thread's wake-up. Make the
        calls other threads handed over (_threads), then read on. (A wake-up
        that kept fileno() readable for events waiting in _handed may be the
        one this read took: the reads give it back once they return.)"""
        self._guard.apply(self)
        self._resume_after_handover(deadline)
        # A signal's handler (run by _resume) may have started a thread: its
        # hand-overs need the read to watch the wake-up pipe (_reads_wait).
        if (not _thread_count()) is not self._alone:
            self._reads_wait()

    def _resume_after_handover(self, deadline: Optional[float]) -> None:
        """_resume, after calls handed over were made: they gave the core
        their own timeouts (a write's), so the call's own is given again."""
        if deadline is None:
            self._set_core_timeout(None)
        self._resume(deadline)

    # -- services and connections ---------------------------------------------------
    def service_init(self, name: str) -> int:
        fd: _Cell[int] = ffi.new("int *")
        raw = _name_bytes(name)
        self._check(lib.ipc_service_init(self._ctx, fd, raw, len(raw)))
        return fd[0]

    def connect_service(self, name: str) -> int:
        return self._connect_direct(name, None)

    def _connect_direct(self, name: str, timeout: Optional[float]) -> int:
        # The core waits for a service whose listen backlog is full as for
        # any blocking call: the call timeout bounds it, and a signal stops
        # it (nothing made): once its handler returned, it is made again.
        fd: _Cell[int] = ffi.new("int *")
        raw = _name_bytes(name)
        deadline = self._start_timeout(timeout)
        while True:
            rc = lib.ipc_connect_service(self._ctx, fd, raw, len(raw))
            if rc != _E_INTERRUPTED:
                break
            # The call's own timeout again: the handler's calls gave the core theirs.
            self._resume_after_handover(deadline)
        self._check(rc)
        return fd[0]

    def _connect_ipcd(self, name: str, network: str, timeout: Optional[float]) -> int:
        # The exchange is made here, as the pure backend makes it: the core's
        # (ipc_connect, for C) starts over after a signal; this one resumes.
        return adopt_connection(self, ask_ipcd(self, name, network, timeout))

    def add_external(self, fd: int) -> None:
        self._check(lib.ipc_add_external(self._ctx, _fd_arg(fd)), fd)

    def add_connection(self, fd: int) -> None:
        self._check(lib.ipc_add_connection(self._ctx, _fd_arg(fd)), fd)

    def pause_reading(self, fd: int, paused: bool = True) -> None:
        c_fd = _fd_arg(fd)
        on = 1 if check_paused(paused) else 0
        self._check(lib.ipc_pause_reading(self._ctx, c_fd, on), fd)

    def add_switch(self, fd1: int, fd2: int) -> None:
        if self._pending:
            self._flush()
        c1, c2 = _fd_arg(fd1), _fd_arg(fd2)
        if c1 == c2 and fd1 != fd2:
            # Two fds the core would take for one: one out of C's int range
            # and the other -1 or out of it too. The out-of-range one is
            # passed as -2 (unknown too), so the core names the first of
            # them that is not managed, as pure does.
            if c1 != fd1:
                c1 = -2
            else:
                c2 = -2
        elif c1 != fd1 and fd1 == fd2:
            raise IPCError(f"cannot switch fd {fd1} with itself")
        self._check(lib.ipc_add_switch(self._ctx, c1, c2), fd1, fd2, passed=(c1, c2))

    def set_switch_callbacks(self, fd: int, on_in: Optional[OnIn],
                             on_out: Optional[OnOut]) -> None:
        check_callbacks(on_in, on_out)
        if self._pending:
            self._flush()
        self._check(lib.ipc_set_switch_callbacks(
            self._ctx, _fd_arg(fd),
            self._cb_in if on_in is not None else ffi.NULL,
            self._cb_out if on_out is not None else ffi.NULL), fd)
        self._callbacks[fd] = (on_in, on_out)

    # -- the switching extension (switching.zig) ------------------------------------
    def _switch_events_changed(self, value: bool) -> None:
        lib.ipc_context_switch_events(self._ctx, int(value))

    def switch_send(self, fd: int, data: Buffer) -> None:
        raw = check_switch_data(data)
        if self._pending:      # in order: what schedule() buffered goes first
            self._flush()
        self._handovers += 1
        self._check(lib.ipc_switch_send(self._ctx, _fd_arg(fd), ffi.from_buffer(raw),
                                        len(raw)), fd)

    def switch_end(self, fd: int, reason: Optional[str] = None) -> None:
        text = check_reason(reason)
        if self._pending:      # what schedule() buffered is written before the end
            self._flush()
        self._check(lib.ipc_switch_end(self._ctx, _fd_arg(fd),
                                       ffi.NULL if text is None else text,
                                       0 if text is None else len(text)), fd)

    def peer_credentials(self, fd: int) -> Tuple[int, int, int]:
        pid, uid, gid = ffi.new("int32_t *"), ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self._check(lib.ipc_peer_credentials(self._ctx, _fd_arg(fd), pid, uid, gid), fd)
        return pid[0], uid[0], gid[0]

    # -- closing -----------------------------------------------------------------
    def close(self, fd: int, linger: Optional[float] = None) -> None:
        # What is scheduled for fd (and its switch peer, closed with it) goes
        # out first, for `linger` seconds at most; what is left is logged as a
        # warning with its count (docs/reference.md, "close").
        linger = self._linger_of(linger)
        peer = self._close_info[1]          # the switch peer's fd, set by _queued/_unsent
        peer[0] = -1
        try:
            if self._pending:   # inside: fd is closed even if this raises
                self._flush()
            if self._queued(fd):
                self._linger(fd, linger)
        finally:    # closed even when a signal's handler raised during the linger
            # What is left is dropped with its WARNING, also when the handler
            # raised (as pure; docs/reference.md, "Signals, timeouts and fork").
            for f, n in self._unsent(fd):
                log.warning(DISCARD_TEXT, f, n)
            rc = lib.ipc_close_fd(self._ctx, _fd_arg(fd))
            if self._pins:
                self._unpin()
        self._check(rc, fd)
        for f in (fd, peer[0]):
            if f >= 0:
                self._callbacks.pop(f, None)
                self._handed.drop(f)

    def _queued(self, fd: int) -> bool:
        """Whether messages are scheduled for fd or its switch peer (their
        counts and the peer's fd are left in _close_info). False for an fd
        that ended (its peer hung up, maybe during the linger): nothing more
        could go out, so it is closed with no warning (as pure)."""
        count, peer, peer_count = self._close_info
        return lib.ipc_queued_messages(self._ctx, _fd_arg(fd), count, peer, peer_count) == 0 \
            and bool(count[0] or peer_count[0])

    def _unsent(self, fd: int) -> list[Tuple[int, int]]:
        """(fd, count) for what close(fd) drops, of fd and of its switch peer:
        what the core still holds, and what schedule() buffered that a
        signal handler's exception kept from reaching the core (taken out of
        the buffer now). None for an fd that ended (its peer hung up, maybe
        during the linger): closed with no warning, as pure."""
        count, peer, peer_count = self._close_info
        if lib.ipc_queued_messages(self._ctx, _fd_arg(fd), count, peer, peer_count) != 0:
            self._unbuffer({fd})
            return []
        buffered = self._unbuffer({fd, peer[0]})
        unsent = ((fd, count[0] + buffered.get(fd, 0)),
                  (peer[0], peer_count[0] + buffered.get(peer[0], 0)))
        return [(f, n) for f, n in unsent if f >= 0 and n]

    def _unbuffer(self, fds: Collection[int]) -> dict[int, int]:
        """Take the messages buffered for `fds` out of schedule()'s buffer
        (a flush a handler's exception cut short left them); their count per fd."""
        pending = self._pending
        dropped: dict[int, int] = {}
        if not any(pending[i] in fds for i in range(0, len(pending), 2)):
            return dropped
        kept: list[Any] = []
        for i in range(0, len(pending), 2):
            if pending[i] in fds:
                dropped[pending[i]] = dropped.get(pending[i], 0) + 1
            else:
                kept += pending[i:i + 2]
        pending[:] = kept
        self._room = {}
        return dropped

    def close_all(self) -> None:
        try:
            if self._pending:
                self._flush()
            self._linger(-1, self.linger)
        finally:
            self._warn_unsent()     # also when a signal's handler raised (as close)
            rc = lib.ipc_close_all(self._ctx)
            if self._pins:
                self._unpin()
            self._callbacks.clear()
            self._handed.clear()
            self._mark_closed()
        self._check(rc)

    def _linger(self, fd: int, linger: float) -> None:
        """Send what is scheduled for fd (every fd when -1) for at most
        `linger` seconds; a signal whose handler returns does not shorten it."""
        if not linger:
            return
        deadline = time.monotonic() + linger
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1e6))
            in_round, self._in_round = self._in_round, True     # (see _take_events)
            try:
                rc = lib.ipc_linger(self._ctx, fd, left)
            finally:
                self._in_round = in_round
            if rc != _E_INTERRUPTED:
                return      # all sent, or time ran out: the caller warns

    def _warn_unsent(self) -> None:
        """One WARNING per fd whose scheduled messages close_all() drops
        (those the core holds, and those a flush cut short left buffered)."""
        buffered = self._unbuffer(set(self._pending[0::2]))
        room = SCHEDULED_FDS
        while True:         # (the core says how many; asked again with room for all)
            fds, counts = ffi.new("int[]", room), ffi.new("size_t[]", room)
            total = lib.ipc_scheduled_fds(self._ctx, fds, counts, room)
            if total <= room:
                break
            room = total
        for i in range(total):
            log.warning(DISCARD_TEXT, fds[i], counts[i] + buffered.pop(fds[i], 0))
        for fd, n in buffered.items():
            log.warning(DISCARD_TEXT, fd, n)

    def _close_in_child(self, fd: Optional[int]) -> None:
        # The core sees it is in a forked child: it closes its copies of the
        # fds and leaves the parent's socket files and poller alone. What was
        # buffered before the fork is the parent's to send: dropped here.
        self._drop_buffered()
        if fd is None:
            lib.ipc_close_all(self._ctx)
            self._callbacks.clear()
            self._handed.clear()
            self._mark_closed()
        else:
            self._check(lib.ipc_close_fd(self._ctx, _fd_arg(fd)), fd)
        if self._pins:
            self._unpin()

    # -- sending and receiving -----------------------------------------------------
    def _payload(self, fd: int, payload: object) -> Tuple[Any, int]:
        """The C buffer and size of a payload. Use the buffer in a `with`
        block, which releases it before any exception leaves the caller:
        a memoryview still exported by it when the caller's frame is freed
        by the garbage collector (an exception kept in a reference cycle)
        makes the collector raise BufferError or crash (CPython's memoryview
        tp_clear)."""
        data = as_payload(payload)
        if len(data) > 0xFFFFFFFF:
            self._too_large_for_c(fd, len(data))
        return ffi.from_buffer(data), len(data)

    def _too_large_for_c(self, fd: int, size: int) -> NoReturn:
        """A payload of 4 GiB or more, which the C calls' uint32_t sizes cannot
        carry: the core makes write()'s checks (an unknown fd is reported
        before the size, as the pure backend does) and fails."""
        self._check(lib.ipc_check_write(self._ctx, _fd_arg(fd), size), fd)
        raise AssertionError("unreachable: no max_message_size allows 4 GiB")

    def write(self, fd: int, payload: Payload, timeout: Optional[float] = None) -> None:
        if self._pending:      # what schedule() buffered goes first
            self._flush()
        if timeout is None and self._core_timeout is None and type(payload) is bytes \
                and type(fd) is int:     # fast path: no conversion
            try:
                rc = _ipc_write(self._ctx, fd, payload, len(payload))
            except OverflowError:       # fd or size out of C's range: the slow path says why
                pass
            else:
                if rc:
                    self._write_failed(rc, fd, payload, None)
                if self._pins:      # the write sent what was scheduled first
                    self._unpin()
                return
        deadline = self._start_timeout(timeout)     # first, as the pure backend
        data = as_payload(payload)
        buf, size = self._payload(fd, data)
        with buf:       # released before an exception leaves (see _payload)
            rc = lib.ipc_write(self._ctx, _fd_arg(fd), buf, size)
        if rc:
            self._write_failed(rc, fd, data, deadline)
        if self._pins:
            self._unpin()

    def _write_failed(self, rc: int, fd: int, payload: Bytes,
                      deadline: Optional[float]) -> None:
        """write() came back with `rc`: after a signal whose handler
        returned, the write goes on; anything else is raised."""
        if rc == _E_INTERRUPTED:
            rc = self._write_on([payload], fd, deadline)
        if rc:
            self._check(rc, fd)

    def _write_on(self, items: list[Bytes], fd: int, deadline: Optional[float]) -> int:
        """Go on with a write or write_many of `items` that a signal
        stopped: the messages it wrote or began are not sent again (a begun
        one's rest is queued and goes out first), the others are."""
        rc = _E_INTERRUPTED
        while rc == _E_INTERRUPTED:
            # The call's own timeout again: the handler's calls gave the core theirs.
            self._resume_after_handover(deadline)
            # (The handler's calls kept the count: see _nested_call.)
            items = items[lib.ipc_write_count(self._ctx):]
            rc = self._write_items(fd, items)
        return rc

    def _nested_call(self, method: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
        """A call made inside one of this thread's (a signal handler's, run
        as a stopped write returned, before it asked the core how far it got:
        _write_on). The call may write and so reset the core's count of the
        stopped write's messages (the write then sent them again): it is
        given back afterwards. Not inside the core's round (a switch
        callback's call): no write of this thread is stopped there, and a
        relaying callback would pay two C calls a message."""
        if self._in_round:
            return method(self, *args, **kwargs)
        count = lib.ipc_write_count(self._ctx)
        try:
            return method(self, *args, **kwargs)
        finally:
            lib.ipc_set_write_count(self._ctx, count)

    def _write_items(self, fd: int, items: list[Bytes]) -> int:
        """One ipc_write_many of `items` (bytes-like, checked); its code.
        None of them: fd's queue is flushed, blocking, and nothing more."""
        # A list of ints, then the array: quicker than an array from map() and
        # summing the array (each of its items boxed again).
        lengths = list(map(len, items))
        try:
            sizes = ffi.from_buffer("uint32_t[]", array("I", lengths))
        except OverflowError:       # one is 4 GiB or more: too large for any limit
            sizes = None
        if sizes is None:
            self._too_large_for_c(fd, max(lengths))
        if sum(lengths) < len(items) * WRITE_FROM_PLACE:
            # Small payloads: copied together (one C call), written from there.
            return _ipc_write_many(self._ctx, _fd_arg(fd), _join(items), sizes, len(items))
        # Large ones: written from where they are, no copy. `pins` keeps
        # every payload alive (and a bytearray unresizable) for the whole
        # call: the GIL is released while it blocks, and the caller's list
        # may be changed by another thread meanwhile.
        pins = [ffi.from_buffer(p) for p in items]
        try:
            pointers = ffi.new("char *[]", pins)
            return _ipc_write_many_ptrs(self._ctx, _fd_arg(fd), pointers, sizes, len(items))
        finally:        # before a signal handler's exception leaves (see _payload)
            for pin in pins:
                ffi.release(pin)

    def schedule(self, fd: int, payload: Payload) -> None:
        """Queue one message for fd; the event loop sends it (MESSAGE_TX).

        The per-message call of a sending loop (issue 21). While this process
        has one thread, a small bytes payload for an fd whose room is known
        this round is buffered here, in one frame and with no lock: no other
        thread can be inside the context (only this one could have started
        one), and a signal handler that calls in between is a nested call of
        the owner, which the guard lets in anyway. The buffer is one flat list
        grown by one C call, so a handler sees it whole. Everything else goes
        through the thread guard (pyipc._threads) to _schedule_direct."""
        if type(payload) is bytes and type(fd) is int and not _thread_count():
            size = len(payload)
            # No call from reading the room to storing it: a signal's handler
            # (which runs only after a call) that schedules would otherwise
            # have its bytes counted over (see _flush).
            rooms = self._room
            if fd in rooms and size <= self._buffer_max:
                room = rooms[fd] - size - 4
                if room >= 0:
                    rooms[fd] = room
                    self._pending += (fd, payload)
                    return None
        return self._schedule_guarded(fd, payload)

    schedule._guarded = True  # type: ignore[attr-defined]

    def _schedule_direct(self, fd: int, payload: Payload) -> None:
        """schedule() inside the guard: buffered (see SCHEDULE_BUFFERED) or
        queued by the core at once."""
        if type(payload) is bytes and type(fd) is int:     # fast path: no conversion
            size = len(payload)
            if size <= self._buffer_max and not self._in_round:
                # Buffered while fd's queue has room (learnt from the core
                # once per round, so every error is still raised here). Not
                # from a switch callback: the core's round goes on with it.
                if fd not in self._room:
                    self._learn_room(fd, size)
                rooms = self._room          # no call from here to the store (see schedule)
                if fd in rooms:
                    room = rooms[fd] - size - 4
                    if room >= 0:
                        rooms[fd] = room
                        self._pending += (fd, payload)
                        return
            if self._pending:      # in order: what was buffered goes first
                self._flush()
            self._handovers += 1   # the core's queue changes (see _learn_room)
            try:
                if size >= SCHEDULE_PINNED:
                    return self._schedule_pinned(fd, payload)
                rc = _ipc_schedule(self._ctx, fd, payload, len(payload))
            except OverflowError:
                pass
            else:
                if rc:
                    self._check(rc, fd)
                return
        if self._pending:
            self._flush()
        self._handovers += 1
        buf, size = self._payload(fd, payload)
        with buf:       # released before an exception leaves (see _payload)
            rc = lib.ipc_schedule(self._ctx, _fd_arg(fd), buf, size)
        self._check(rc, fd)

    def _schedule_pinned(self, fd: int, payload: bytes) -> None:
        """schedule() of a large bytes payload without a copy: the core
        writes from the object, kept in _pins until the core lets it go.

        The pin is registered before the call and let go only when the core
        refused the payload (a non-zero code) or cffi refused the arguments
        (OverflowError, raised before any C code runs). A signal's handler
        that raises right after the call returns, before its code is seen,
        leaves the pin in place: a payload kept until the context is freed,
        never one freed while the core writes from it."""
        if self._pins:
            self._unpin()
        pins = self._pins
        token = id(payload)
        pin = pins.get(token)
        if pin is None:
            pins[token] = pin = [payload, 0]
        pin[1] += 1
        try:
            rc = _ipc_schedule_pinned(self._ctx, fd, payload, len(payload), token)
        except OverflowError:
            self._release_pin(token)
            raise
        if rc:
            self._release_pin(token)
            self._check(rc, fd)

    def _unpin(self) -> None:
        """Let go of the pinned payloads the core no longer reads.

        Not re-entered: a signal's handler that schedules a large payload
        while this loop runs would take the next tokens into the same buffer
        (released twice, others never); its call returns at once and those
        tokens wait in the core for the next call. A handler that raises in
        here leaves the tokens already taken pinned until the context is
        freed: memory kept, never memory freed too early."""
        if self._unpinning:
            return
        self._unpinning = True
        try:
            tokens = self._unpinned
            while True:
                n = _ipc_unpinned(self._ctx, tokens, UNPIN_BATCH)
                for i in range(n):
                    self._release_pin(tokens[i])
                if n < UNPIN_BATCH:
                    return
        finally:
            self._unpinning = False

    def _release_pin(self, token: int) -> None:
        pin = self._pins[token]
        pin[1] -= 1
        if not pin[1]:
            del self._pins[token]

    #: schedule() through the thread guard (the slow path of schedule()).
    _schedule_guarded = guarded_schedule(_schedule_direct)

    def _learn_room(self, fd: int, size: int) -> None:
        """Learn what fd's core queue takes now, into _room, schedule()'s
        checks of fd and of a `size`-byte payload made (raising what
        schedule() would); nothing for an fd out of C's range (schedule()'s
        slow path then says why). Nothing is buffered for an fd with no
        room entry, so the core's figure is the whole of it."""
        if not _INT_MIN <= fd <= _INT_MAX:
            return
        queued = self._handovers
        self._check(_ipc_schedule_room(self._ctx, fd, size, self._room_out), fd)
        room = int(self._room_out[0])
        # Kept unless a signal's handler scheduled meanwhile (its room, or the
        # core's queue, changed since): then learnt again at the next call.
        if self._handovers == queued and fd not in self._room:
            self._room[fd] = room

    def _flush(self) -> None:
        """Hand what schedule() buffered to the core, in one call, in order,
        before a call into the core (whose round may change what fds take,
        so the room learnt is forgotten). Every message was checked when it
        was scheduled; only running out of memory can fail here, and then
        what was not queued stays buffered for the next call.

        Safe when a signal's handler calls in (a nested flush): handlers run
        only after a call returns, so from the check of _handovers to the C
        call nothing can run. A handler that flushed while the arguments
        were made has handed this batch over (it was still buffered), and
        this call starts again from what is buffered now; one that runs
        after the C call finds the batch gone from the buffer. Each message
        goes to the core once, in order."""
        pending = self._pending
        while pending:
            batch = pending[:]
            queued = self._handovers
            fds, data = batch[0::2], batch[1::2]
            count, items = len(fds), len(batch)
            fd_array = _from_buffer(_INT_ARRAY, array("i", fds))
            joined = _join(data)
            sizes = _from_buffer(_U32_ARRAY, array("I", map(len, data)))
            done: _Cell[int] = ffi.new(_SIZE_P)
            ctx = self._ctx
            if self._handovers != queued:
                continue        # a handler's flush took this batch: start again
            # From here to the C call: no call (see above).
            self._handovers = queued + 1
            del pending[:items]
            self._room = {}
            try:
                rc = _ipc_schedule_many(ctx, fd_array, joined, sizes, count, done)
            finally:        # a signal's exception included: what was queued is not sent again
                taken = done[0]
                if taken < count:
                    pending[:0] = batch[2 * taken:]     # first again, in order
            if rc:
                if rc != _E_NO_MEMORY:      # not expected (checked): reported, not retried
                    del pending[:2]
                self._check(rc, fds[taken])

    def _forked(self, settled: bool) -> None:
        # What the parent buffered is the parent's to send; and with no room
        # known, the child's schedule() takes the guarded path, which raises.
        self._drop_buffered()
        # The child's copies of the lock fds and sockets become /dev/null
        # (see drop_shared_in_child in _pure/closing.py).
        if settled:
            lib.ipc_after_fork_in_child(self._ctx)

    def _drop_buffered(self) -> None:
        """Forget what schedule() buffered (a forked child's copy)."""
        self._pending.clear()
        self._room.clear()

    def read(self, fd: int, timeout: Optional[float] = None) -> bytes:
        # The timeout first: a bad one is refused even when a message is there.
        deadline = self._start_timeout(timeout) \
            if timeout is not None or self._core_timeout is not None else None
        if self._handed:
            message = self._handed.take_message(fd)
            if message is not None:
                return message
        if self._reading:
            nested: bytes = self._read_nested(NativeContext.read, fd, timeout)
            return nested
        if (not _thread_count()) is not self._alone:
            self._reads_wait()
        buf, rlen, at = self._rbuf, self._rlen, self._rbuf_at
        # A plain int goes straight in (no _fd_arg call: it is a hot path).
        c_fd = fd if type(fd) is int and _INT_MIN <= fd <= _INT_MAX else _fd_arg(fd)
        self._reading = True
        try:
            while True:
                if self._pending:      # also after a hand-over (_read_again)
                    self._flush()
                rlen[0] = READ_BUFFER
                rc = _ipc_read_fd(self._ctx, c_fd, buf, rlen)
                if rc != _E_INTERRUPTED:
                    break
                self._read_again(deadline)
            if self._handed:        # the read may have taken their wake-up
                self._wakeup()
            if rc == _E_BUFFER_TOO_SMALL:
                return self._read_large(fd)
            if rc:
                self._check(rc, fd)
            return _MEMORY[at:at + rlen[0]]
        finally:
            self._reading = False

    def write_many(self, fd: int, payloads: Iterable[Payload],
                   timeout: Optional[float] = None) -> None:
        items = as_payload_list(payloads)
        deadline = self._start_timeout(timeout) \
            if timeout is not None or self._core_timeout is not None else None
        if self._pending:
            self._flush()
        rc = self._write_items(fd, items)
        if rc == _E_INTERRUPTED:
            rc = self._write_on(items, fd, deadline)
        if rc:
            self._check(rc, fd)
        if self._pins:      # what was scheduled went out first
            self._unpin()

    def read_many(self, fd: int, max_messages: int = DEFAULT_READ_MANY,
                  timeout: Optional[float] = None) -> list[bytes]:
        check_max_messages(max_messages)
        deadline = self._start_timeout(timeout) \
            if timeout is not None or self._core_timeout is not None else None
        if self._handed:
            taken = self._handed.take_messages(fd, max_messages)
            if taken:
                return taken
        if self._reading:
            batch: list[bytes] = self._read_nested(NativeContext.read_many, fd, max_messages,
                                                   timeout)
            return batch
        if (not _thread_count()) is not self._alone:
            self._reads_wait()
        sizes = self._sizes if max_messages <= DEFAULT_READ_MANY else \
            ffi.new("uint32_t[]", max_messages)
        buf, rlen, count = self._rbuf, self._rlen, self._count
        self._reading = True
        try:
            while True:
                if self._pending:
                    self._flush()
                rlen[0] = READ_BUFFER
                rc = _ipc_read_many(self._ctx, _fd_arg(fd), buf, rlen, sizes, max_messages,
                                    count)
                if rc != _E_INTERRUPTED:
                    break
                self._read_again(deadline)
            if self._handed:        # the read may have taken their wake-up
                self._wakeup()
            if rc == _E_BUFFER_TOO_SMALL:
                return [self._read_large(fd)]
            if rc:
                self._check(rc, fd)
            return split_payloads(ffi.buffer(buf), _unpack(sizes, count[0]))
        finally:
            self._reading = False

    def read_into(self, fd: int, buffer: Buffer, timeout: Optional[float] = None) -> int:
        view = writable_view(buffer)
        deadline = self._start_timeout(timeout) \
            if timeout is not None or self._core_timeout is not None else None
        if self._handed:
            size = self._handed.take_into(fd, view)
            if size is not None:
                return size
        if self._reading:
            nested_size: int = self._read_nested(NativeContext.read_into, fd, buffer, timeout)
            return nested_size
        if (not _thread_count()) is not self._alone:
            self._reads_wait()
        rlen = self._rlen
        self._reading = True
        try:
            # Released before an exception leaves, a signal handler's included
            # (see _payload).
            with ffi.from_buffer(view) as target:
                while True:
                    if self._pending:
                        self._flush()
                    rlen[0] = len(view)
                    rc = _ipc_read_into(self._ctx, _fd_arg(fd), target, rlen)
                    if rc != _E_INTERRUPTED:
                        break
                    self._read_again(deadline)
                if self._handed:        # the read may have taken their wake-up
                    self._wakeup()
            if rc == _E_BUFFER_TOO_SMALL:
                raise MessageTooLargeError(buffer_too_small_text(len(view), rlen[0]))
            if rc:
                self._check(rc, fd)
            return rlen[0]
        finally:
            self._reading = False

    def _read_nested(self, method: Callable[..., Any], *args: Any) -> Any:
        """A read made while another read of this context is between its C
        call and copying out its result (a signal handler's, run as that C
        call returned): it gets cells of its own for the core's results, so
        that it neither overwrites the other's message and size nor reads
        them. (It used the same: the outer read returned the handler's
        message, and its own was lost.)"""
        saved = (self._rbuf, self._rbuf_at, self._rlen, self._count, self._sizes,
                 self._lent)
        self._rbuf = ffi.new("char[]", READ_BUFFER)
        self._rbuf_at = int(ffi.cast("uintptr_t", self._rbuf)) - 1
        self._rlen, self._count = ffi.new("size_t *"), ffi.new("size_t *")
        self._sizes = ffi.new("uint32_t[]", DEFAULT_READ_MANY)
        self._lent = (ffi.new("char **"), ffi.new("size_t *"))
        self._reading = False
        try:
            return method(self, *args)
        finally:
            (self._rbuf, self._rbuf_at, self._rlen, self._count, self._sizes,
             self._lent) = saved
            self._reading = True

    def _reads_wait(self) -> None:
        """Tell the core how the blocking reads wait: in the kernel while
        this process has one thread (quicker: one system call where polling
        takes three), else polling the wake-up pipe too, so that another
        thread's hand-over (_threads) ends the wait. Checked at each read:
        a thread can only be started by another thread, which would have been
        counted, or by a signal's handler during the read, which _read_again
        checks for. (_thread._count(): every thread started from Python, in C
        and so quicker than threading.active_count(); threads started from C
        are not counted: see docs/reference.md.)"""
        self._alone = not _thread_count()
        lib.ipc_context_read_wakeup(self._ctx, 0 if self._alone else 1)

    def _read_large(self, fd: int) -> bytes:
        """fd's next message, larger than the read buffer: lent by the core and
        copied once, into the bytes returned."""
        ptr, size = self._lent
        self._check(_ipc_read_lent(self._ctx, fd, ptr, size), fd)
        message: bytes = _unpack(ptr[0], size[0])
        return message

    # -- the event loop ----------------------------------------------------------
    def wait_event(self, timeout: Optional[float] = None) -> Event:
        if self._handed:
            check_timeout(timeout)      # even when an event is there to return
            return self._handed.popleft()
        return self._wait(timeout, 1)[0]

    def wait_events(self, timeout: Optional[float] = None) -> list[Event]:
        if self._handed:
            check_timeout(timeout)      # even when events are there to return
            events = list(self._handed)
            self._handed.clear()
            return events
        return self._wait(timeout, EVENT_BATCH) if timeout != 0 else self._poll_events(timeout)

    def _poll_events(self, timeout: Optional[float]) -> list[Event]:
        """wait_events(timeout=0): one round in the core that does not wait;
        [] when nothing is ready (a loop driven by fileno() drains with it)."""
        check_timeout(timeout)      # False is refused (False == 0)
        self._set_core_timeout(0)
        try:
            events = self._take_events(EVENT_BATCH)
        except TimeoutError:
            return []
        if not events:              # another thread's wake-up: its schedule() now
            self._guard.apply(self)
        return events

    def fileno(self) -> int:
        # Another loop waits on this fd, not in the core: schedule() must
        # reach the core at once from now on, so that the fd turns readable.
        self._buffer_max = -1
        if self._pending:
            self._flush()
        return self._check(lib.ipc_context_fd(self._ctx))

    def _wait(self, timeout: Optional[float], capacity: int) -> list[Event]:
        """Wait in the core for events, then take up to `capacity` of them
        (EVENT_BATCH: every one it has); TimeoutError after `timeout` s."""
        deadline = self._start_timeout(timeout) \
            if timeout is not None or self._core_timeout is not None else None
        start = time.monotonic() if self._timer is not None else 0.0
        return self._take_events(capacity) or self._wait_on(start, deadline, capacity)

    def _wakeup(self) -> None:
        lib.ipc_wakeup(self._ctx)

    def _wait_on(self, since: float, deadline: Optional[float], capacity: int) -> list[Event]:
        """The core's wait returned with no event: another thread handed over
        messages (schedule), or a signal came and its handler returned.
        Schedule what was handed over, then wait again for what is left of
        the timer, counted from `since` (when the wait began), and of the
        call's timeout."""
        while True:
            self._guard.apply(self)
            self._resume_after_handover(deadline)
            if self._timer is None:
                events = self._take_events(capacity)
            else:
                left = self._timer - int((time.monotonic() - since) * 1000)
                lib.ipc_context_timer(self._ctx, max(0, left))
                try:
                    events = self._take_events(capacity)
                finally:
                    lib.ipc_context_timer(self._ctx, self._timer)
            if events:
                return events

    def _take_events(self, capacity: int) -> list[Event]:
        """One wait in the core, then up to `capacity` of the events it has
        queued (EVENT_BATCH: every one), converted; none when a wake-up or a
        signal ended the wait."""
        if self._pending:
            self._flush()
        ctx, events, count = self._ctx, self._events, self._ecount
        out: list[Event] = []
        # A switch callback's schedule() reaches the core at once, not the
        # buffer: the round goes on with it (a hang-up in the same round
        # then reports it unsent, as the pure backend does).
        in_round, self._in_round = self._in_round, True
        try:
            rc = _ipc_wait_events(ctx, events, capacity, count)
            if rc:
                if rc == _E_INTERRUPTED:
                    return []
                self._check(rc)
            n = count[0]
            out = self._decoder.decode(n)
            count[0] = 0        # converted (see _keep_handed)
            if self._pins:
                self._unpin()
            while n == EVENT_BATCH and _ipc_pending_events(ctx):
                rc = _ipc_wait_events(ctx, events, EVENT_BATCH, count)
                if rc:
                    self._check(rc)
                n = count[0]
                out += self._decoder.decode(n)
                count[0] = 0
        except BaseException:
            self._keep_handed(out)
            raise
        finally:
            self._in_round = in_round
        return out

    def _keep_handed(self, converted: list[Event]) -> None:
        """A signal's handler raised while the core was handing events over
        (its exception comes at the first Python line after the C call, or
        inside the conversion): those events, and the ones converted before,
        wait in _handed for the next call instead of being lost. The core
        zeroes the count at the start of each wait and _take_events once a
        batch is converted, so a non-zero count is a batch not converted yet;
        its payloads stay valid until the next wait."""
        count = self._ecount
        n = count[0]
        self._handed.extend(converted)
        if n:
            self._handed.extend(self._decoder.decode(n))
            count[0] = 0
        if self._handed:            # fileno() readable while they wait here
            lib.ipc_wakeup(self._ctx)


def split_payloads(buffer: Buffer, sizes: list[int]) -> list[bytes]:
    """Payloads lying back to back at the start of `buffer` (anything with
    the buffer protocol), cut into bytes by their `sizes`. Equal sizes (the
    common batch) are cut by one struct call; others by slicing one copy."""
    n = len(sizes)
    if n and sizes.count(sizes[0]) == n:
        return list(struct.unpack_from(f"{sizes[0]}s" * n, buffer))
    data = bytes(memoryview(buffer)[:sum(sizes)])
    starts = accumulate(sizes, initial=0)
    return [data[start:start + size] for start, size in zip(starts, sizes)]


def _free_context(handle: Any, pins: dict[int, list[Any]]) -> None:
    """The context's finalizer: free the core, then let go of the payloads
    it could still have written from (they outlive it: see _pins)."""
    lib.ipc_context_deinit(handle)
    pins.clear()


def _init_failed(errno_: int) -> NoReturn:
    """ipc_context_init failed: there is no context to ask, errno says why
    (out of fds: the pure backend's IPCError, with errno; out of memory:
    MemoryError)."""
    if errno_ in (0, errno.ENOMEM):
        raise MemoryError("cannot create context: out of memory")
    raise IPCError(f"cannot create context: {os.strerror(errno_)}", errno_)


def _name_bytes(name: str) -> bytes:
    """A service name as the core takes it (the core checks the rest)."""
    check_name(name)
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 0xFFFF:
        raise InvalidNameError("invalid service name: socket path is longer than 107 bytes")
    return raw


def _fd_arg(fd: int) -> int:
    """An fd as a C int; out-of-range numbers become -1 (an unknown fd)."""
    check_fd(fd)
    return fd if _INT_MIN <= fd <= _INT_MAX else -1


def _trampoline_in(ref: weakref.ref[NativeContext]) -> Callable[[int, Any, _Cell[int]], int]:
    """The C `in` callback: calls the Python on_in of the fd, copies its payload."""

    def on_in(fd: int, buf: Any, mlen: _Cell[int]) -> int:
        ctx = ref()
        try:
            cb = ctx._callbacks[fd][0] if ctx is not None else None
            if cb is None:
                return _CB_ERROR
            result, payload = cb(fd)
            result = CBEvent(result)
            if result == CBEvent.NO_ERROR or result == CBEvent.MORE:
                data = bytes(as_payload(payload))
                if len(data) > mlen[0]:
                    raise MessageTooLargeError(too_large_text(len(data), mlen[0]))
                ffi.memmove(buf, data, len(data))
                mlen[0] = len(data)
            return _CB_CODES[result]
        except Exception:
            log.exception("switch input callback of fd %d failed", fd)
            return _CB_ERROR

    return on_in


def _trampoline_out(ref: weakref.ref[NativeContext]) -> Callable[[int, Any, int], int]:
    """The C `out` callback: calls the Python on_out of the fd with the payload."""

    def on_out(fd: int, payload: Any, mlen: int) -> int:
        ctx = ref()
        try:
            cb = ctx._callbacks[fd][1] if ctx is not None else None
            if cb is None:
                return _CB_ERROR
            return _CB_CODES[CBEvent(cb(fd, ffi.buffer(payload, mlen)[:]))]
        except Exception:
            log.exception("switch output callback of fd %d failed", fd)
            return _CB_ERROR

    return on_out
