"""The native backend's events: the core's `struct ipc_event` array decoded
into `Event`s in bulk (issue 21).

A wait fills an array of structs; turning it into Python objects used to
cost more than the wait itself (about 300 ns an event, one Python step per
field). The two batches a busy loop sees are decoded with no Python step per
event:

- a batch of MESSAGE_TX on one connection (a sender's loop): one `Event`,
  repeated (events are immutable, so a repeated object is the same value);
- a batch of MESSAGE_RX (a receiver's loop): each field read as a column of
  the array (a strided memoryview, `tolist()` in C), the payloads cut by
  struct from the one piece of memory they usually lie in (else one slice
  each), the Events made by `map(tuple.__new__)`, with the cyclic GC
  paused (see decode()).

Anything else (errors, connections, mixed batches) goes event by event.
"""

from __future__ import annotations

import gc
import struct
from itertools import chain, repeat
from operator import add, sub
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, Optional

from ._types import Event, EventType

if TYPE_CHECKING:
    from typing import Protocol

    class Memory(Protocol):
        """A cffi buffer: a slice of it is bytes."""

        def __getitem__(self, s: slice) -> bytes: ...

_RX, _TX = EventType.MESSAGE_RX, EventType.MESSAGE_TX
_gc_isenabled, _gc_disable, _gc_enable = gc.isenabled, gc.disable, gc.enable
#: A round of equal-sized payloads in more pieces of memory than this is cut
#: one payload at a time (a piece is usually a 64 KiB chunk of the core's).
MAX_PIECES = 4
#: Payloads of up to this many bytes are cut from pieces of memory (a piece
#: is copied twice before struct cuts it; a larger payload is sliced alone).
PIECE_MAX_SIZE = 1024
#: The struct format letters of the fields read as columns.
_Format = Literal["i", "I", "q", "P"]
#: tuple.__new__(Event, fields): an Event from a 5-tuple of its fields, in C
#: (what namedtuple's _make does).
_tuple_new: Callable[[type[Event], Any], Event] = tuple.__new__


class EventDecoder:
    """Decodes the first n structs of one `struct ipc_event[]` into Events.

    `ffi` is the backend's cffi FFI, `events` the array the core fills and
    `memory` a bytes-slicing view of the process's memory from address 1
    (pyipc._native._MEMORY): a payload at address A, L bytes long, is
    memory[A-1:A-1+L]. Payloads are lent by the core until its next wait, so
    decode() copies them at once.
    """

    __slots__ = ("_ffi", "_bytes", "_size", "_memory", "_struct", "_columns", "_types")

    def __init__(self, ffi: Any, events: Any, memory: "Memory", codes: dict[int, EventType]) -> None:
        self._ffi = ffi
        self._bytes = memoryview(ffi.buffer(events)).cast("B")
        self._size = ffi.sizeof("struct ipc_event")
        self._memory = memory
        #: The EventType of each of the core's type numbers.
        self._types = codes
        self._struct = struct.Struct("@iiqPIP")
        assert self._struct.size == self._size, "struct ipc_event layout does not match"
        #: (format, first item, step) of each field, as a cast of the array's bytes.
        fields: tuple[tuple[str, _Format], ...] = (
            ("type", "i"), ("fd", "i"), ("index", "q"), ("message", "P"), ("message_len", "I"))
        self._columns = {name: _column(ffi, name, fmt, self._size) for name, fmt in fields}

    def decode(self, n: int) -> list[Event]:
        """The first `n` events of the array, as Events (payloads copied)."""
        if n <= 1:
            if n == 0:
                return []
            return [self._one(self._struct.unpack_from(self._bytes))]
        # The cyclic GC is paused while a batch is made: an Event holds an
        # EventType, ints, bytes and None, so it can never be part of a cycle,
        # yet each one made counts toward the next collection, which would
        # then examine the whole batch while it is being made (about 140 ns
        # an event). Paused, a batch that the caller drops before allocating
        # again (the usual `for ev in wait_events()` loop) is never examined.
        enabled = _gc_isenabled()
        if enabled:
            _gc_disable()
        try:
            return self._decode_many(n)
        finally:
            if enabled:
                _gc_enable()

    def _decode_many(self, n: int) -> list[Event]:
        """decode() of two events or more."""
        view = self._bytes[:n * self._size]
        types = self._column(view, "type")
        kind = types[0]
        if types.count(kind) == n:
            if kind == _TX:
                fds, indexes = self._column(view, "fd"), self._column(view, "index")
                if fds.count(fds[0]) == n and indexes.count(indexes[0]) == n:
                    return [Event(_TX, fds[0], indexes[0])] * n
            elif kind == _RX:
                return list(map(_tuple_new, repeat(Event, n),
                                zip(repeat(_RX, n), self._column(view, "fd"),
                                    self._column(view, "index"),
                                    self._payloads(view), repeat(None, n))))
        return list(map(self._one, self._struct.iter_unpack(view)))

    def _column(self, view: memoryview, name: str) -> list[int]:
        """One field of every struct in `view`, as a list (one C call)."""
        fmt, first, step = self._columns[name]
        column: list[int] = view.cast(fmt)[first::step].tolist()
        return column

    def _payloads(self, view: memoryview) -> Iterator[bytes]:
        """The payload of every struct in `view` (MESSAGE_RX), with no Python
        step per payload. The core copies small payloads back to back into
        64 KiB chunks, each followed by a NUL (for C callers), so a round of
        equal sizes lies in a few pieces of memory (one per chunk): each piece
        is copied once and cut by struct (one bytes a payload, made in C).
        Otherwise each payload is one slice of memory: empty payloads (their
        addresses mean nothing), and payloads over PIECE_MAX_SIZE, for which
        the piece's two extra copies cost more than a slice's Python step."""
        addresses, sizes = self._column(view, "message"), self._column(view, "message_len")
        size = sizes[0]
        if 0 < size <= PIECE_MAX_SIZE and sizes.count(size) == len(sizes):
            pieces = _pieces(addresses, size + 1)
            if pieces is not None:
                # Only the payloads' bytes are read (a piece's last NUL is
                # not): each piece gets a NUL of ours, so that struct cuts it
                # evenly.
                fmt, memory = f"{size}sx", self._memory
                return chain.from_iterable(
                    chain.from_iterable(struct.iter_unpack(
                        fmt, memory[at - 1:at - 1 + count * (size + 1) - 1] + b"\0"))
                    for at, count in pieces)
        starts = list(map(sub, addresses, repeat(1)))
        ends = map(add, starts, sizes)
        return map(self._memory.__getitem__, map(slice, starts, ends))

    def _one(self, fields: tuple[int, int, int, int, int, int]) -> Event:
        """One struct, as unpacked by struct: (type, fd, index, message,
        message_len, error)."""
        code, fd, index, msg, mlen, err = fields
        etype = self._types[code]
        payload = self._memory[msg - 1:msg - 1 + mlen] \
            if etype is _RX or etype is EventType.SWITCH_RX else None
        error = self._ffi.string(self._ffi.cast("char *", err)).decode("utf-8", "replace") \
            if err else None
        return _tuple_new(Event, (etype, fd, index, payload, error))


def _pieces(addresses: list[int], stride: int) -> Optional[list[tuple[int, int]]]:
    """`addresses` as runs of evenly spaced ones, `stride` apart: [(first
    address, count)], or None when there are more than MAX_PIECES runs. Each
    run is found with C-level calls: its addresses minus the progression it
    would follow are zeros up to where it breaks (the next chunk lies
    elsewhere)."""
    pieces: list[tuple[int, int]] = []
    start, n = 0, len(addresses)
    while start < n:
        if len(pieces) == MAX_PIECES:
            return None
        first = addresses[start]
        offsets = list(map(sub, addresses[start:],
                           range(first, first + (n - start) * stride, stride)))
        off = next(filter(None, offsets), None)        # where the run breaks
        count = len(offsets) if off is None else offsets.index(off)
        pieces.append((first, count))
        start += count
    return pieces


def _column(ffi: Any, name: str, fmt: _Format, size: int) -> tuple[_Format, int, int]:
    """Where field `name` (C type `fmt`, a struct format letter) of struct
    ipc_event is in the array's bytes cast to `fmt`: (fmt, first item, step).
    The layout of every target keeps each field aligned to its own size."""
    width = struct.calcsize(fmt)
    offset = ffi.offsetof("struct ipc_event", name)
    assert offset % width == 0 and size % width == 0, f"{name} is not aligned"
    return fmt, offset // width, size // width

