"""One connection of a pyipc.aio.Context: send with back-pressure, receive,
iterate, close.

Messages arrive as MESSAGE_RX events of the context and wait in the
connection's inbox until recv() takes them: a recv() that is cancelled while
it waits has taken nothing. send() schedules whole frames on the context
(schedule()), counts them as unsent until their MESSAGE_TX, and waits before
scheduling while that count is over the high-water mark (as asyncio's
StreamWriter.drain does): a cancelled send() has queued nothing, one that
returned has queued its whole message.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Optional, Tuple, Type, TypeVar, overload

from .._checks import as_payload, check_high_water, closed_by_peer
from .._types import ConnectionClosedError, IPCError, Payload
from ._flavor import get_running_loop

if TYPE_CHECKING:
    from ..typed import Registry
    from ._context import Context

log = logging.getLogger("pyipc.aio")

M = TypeVar("M")

#: Bytes of a message on the wire besides its payload (the length header).
HEADER = 4


def closed_here(fd: int) -> str:
    """The error text of a call on a connection that this side closed."""
    return f"connection on fd {fd} is closed"


def failed_text(fd: int, error: str) -> str:
    """The error text of a call on a connection that failed (an ERROR event)."""
    return f"connection on fd {fd} failed: {error}"


class Connection:
    """A connection of a `pyipc.aio.Context`, made by `ctx.connect(name)` or
    handed to a service's handler. `await send(payload)`, `await recv()`,
    `async for message in conn`, `await close()`; typed messages with
    `send_typed`/`recv_typed`. See docs/asyncio.md."""

    def __init__(self, ctx: "Context", fd: int, high_water: int) -> None:
        self.ctx = ctx
        #: The connection's fd in the underlying pyipc.Context (ctx.sync).
        self.fd = fd
        # The context's max_queue_size (fixed for its life), read per send().
        self._queue_max = ctx.sync.max_queue_size
        #: The reason the connection failed (an ERROR event's text), if it did.
        self.error: Optional[str] = None
        self._inbox: deque[bytes] = deque()
        # Receiving back-pressure: while more than `high_water` bytes wait
        # in the inbox, the context does not read the fd (pause_reading), so
        # the peer's sends wait; it reads again once recv() took it down to
        # a quarter. The inbox holds at most high_water plus what one round
        # of the loop read. Each message counts its header too (as send()
        # does): a flood of empty messages costs memory all the same.
        self._inbox_bytes = 0
        self._read_high, self._read_low = high_water, high_water // 4
        self._read_paused = False
        self._sizes: deque[int] = deque()     # frame sizes scheduled, not yet written
        self._unsent = 0
        self._high = high_water
        self._low = high_water // 4
        self._ended: Optional[str] = None     # the text of ConnectionClosedError
        self._rx_waiters: list[Any] = []
        self._tx_waiters: list[Any] = []

    def __repr__(self) -> str:
        state = "closed" if self._ended is not None else "open"
        return f"<pyipc.aio.Connection fd={self.fd} {state}>"

    # -- state -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether the connection has ended (closed here, or by the peer)."""
        return self._ended is not None

    def get_write_buffer_size(self) -> int:
        """Bytes scheduled on this connection and not yet written (headers included)."""
        return self._unsent

    def get_write_buffer_limits(self) -> Tuple[int, int]:
        """(low, high): send() waits while more than `high` bytes are unsent,
        until at most `low` are."""
        return self._low, self._high

    def set_write_buffer_limits(self, high: Optional[int] = None,
                                low: Optional[int] = None) -> None:
        """Set the high-water mark (default the context's `high_water`) and the
        low-water mark (default high // 4), as asyncio's transports do."""
        self.ctx._check_loop()          # before anything changes
        high = self._high if high is None else high
        check_high_water(high, "high")
        low = high // 4 if low is None else low
        check_high_water(low, "low")
        if not low <= high:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self.ctx._flavor_wake(self._tx_waiters)

    def peer_credentials(self) -> Tuple[int, int, int]:
        """(pid, uid, gid) of the process at the other end."""
        self._check_open()
        return self.ctx.sync.peer_credentials(self.fd)

    def _check_open(self) -> None:
        if self._ended is not None:
            raise ConnectionClosedError(self._ended)

    # -- sending ---------------------------------------------------------------------
    async def send(self, payload: Payload) -> None:
        """Queue one message (bytes-like, or str as UTF-8). Waits first while
        more than the high-water mark is unsent, until the low-water mark is
        reached (and, with a context's max_queue_size below the high-water
        mark, while the message would not fit in the fd's send queue).
        Cancelled, it has queued nothing; returned, its whole
        message is queued and goes out in order. ConnectionClosedError once
        the connection has ended."""
        if get_running_loop() is not self.ctx._loop:      # (see Context._check_loop)
            self.ctx._check_loop()
        if self._unsent > self._high:
            await self._wait_for_room(self._low)
        self._check_open()
        data = as_payload(payload)
        size = HEADER + len(data)
        # What the fd's send queue may hold besides this frame: past
        # max_queue_size schedule() refuses it (QueueFullError), so with a
        # max_queue_size below the high-water mark send() waits here too.
        room = self._queue_max - size
        if 0 <= room < self._unsent:
            await self._wait_for_room(min(room, self._low))
            self._check_open()
        self._schedule(data)

    def _schedule(self, data: bytes | memoryview) -> None:
        """Queue one frame of `data` now and count it as unsent: every frame
        queued on this fd must be counted (send()'s and the context's
        schedule()'s), as each MESSAGE_TX takes the oldest count off."""
        self.ctx.sync.schedule(self.fd, data)    # whole frame, or nothing and an error
        size = HEADER + len(data)
        self._sizes.append(size)
        self._unsent += size

    async def _wait_for_room(self, level: int) -> None:
        """Wait until at most `level` bytes are unsent (woken at each
        MESSAGE_TX once at most the low-water mark is), or the end."""
        while self._unsent > level and self._ended is None:
            await self.ctx._wait(self._tx_waiters)

    async def drain(self) -> None:
        """Wait until everything scheduled on this connection is written
        (or the connection ends)."""
        if get_running_loop() is not self.ctx._loop:      # (see Context._check_loop)
            self.ctx._check_loop()
        while self._unsent and self._ended is None:
            await self.ctx._wait(self._tx_waiters)

    async def send_typed(self, obj: object, registry: "Registry") -> None:
        """send() the typed message `registry.encode(obj)`."""
        from ..typed import check_typed_arguments
        check_typed_arguments(registry)
        await self.send(registry.encode(obj))

    # -- receiving -------------------------------------------------------------------
    async def recv(self) -> bytes:
        """The next message. Messages that arrived before the peer left are
        all returned first; then ConnectionClosedError."""
        if get_running_loop() is not self.ctx._loop:      # (see Context._check_loop)
            self.ctx._check_loop()
        while not self._inbox:
            self._check_open()
            await self.ctx._wait(self._rx_waiters)
        message = self._inbox.popleft()
        self._inbox_bytes -= HEADER + len(message)
        if self._read_paused and self._inbox_bytes <= self._read_low:
            self._pause_reading(False)
        return message

    def _pause_reading(self, paused: bool) -> None:
        self._read_paused = paused
        if self._ended is None:
            try:
                self.ctx.sync.pause_reading(self.fd, paused)
            except IPCError:
                pass                        # ended meanwhile: its events say so

    @overload
    async def recv_typed(self, registry: "Registry") -> Any: ...

    @overload
    async def recv_typed(self, registry: "Registry", *, cls: Type[M]) -> M: ...

    async def recv_typed(self, registry: "Registry", *, cls: Optional[Type[M]] = None) -> Any:
        """recv() and `registry.decode()` the message (with `cls`: it must be
        of that class). A message that does not decode is consumed all the same;
        a wrong `registry` or `cls` (TypeError) is refused before receiving."""
        from ..typed import check_typed_arguments
        check_typed_arguments(registry, cls)
        payload = await self.recv()
        return registry.decode(payload) if cls is None else registry.decode(payload, cls)

    def __aiter__(self) -> "Connection":
        return self

    async def __anext__(self) -> bytes:
        """The next message; the iteration ends when the connection does."""
        try:
            return await self.recv()
        except ConnectionClosedError:
            raise StopAsyncIteration from None

    # -- closing ---------------------------------------------------------------------
    async def close(self) -> None:
        """Wait until what is scheduled is written (at most the context's
        `linger` seconds), then close. Idempotent."""
        if self._ended is not None:
            return
        self.ctx._check_loop()
        try:
            if self._unsent:
                await self.ctx._within(self.drain, self.ctx.sync.linger)
        finally:        # cancelled while draining: closed all the same, not left open
            self.abort()

    def abort(self) -> None:
        """Close now: what is still unsent is dropped (pyipc logs a WARNING
        with its count). From another thread:
        `loop.call_soon_threadsafe(conn.abort)` (it raises RuntimeError
        there: the waiters it wakes are the loop's)."""
        if self._ended is not None:
            return
        self.ctx._check_loop()
        self.ctx._forget(self.fd)
        try:
            self.ctx.sync.close(self.fd, linger=0)
        except IPCError:        # already ended in the context; its DISCONNECTION is dropped
            pass
        self._end(closed_here(self.fd))

    async def __aenter__(self) -> "Connection":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- what the context's events say (called by Context._dispatch) -------------------
    def _received(self, message: bytes) -> None:
        self._inbox.append(message)
        self._inbox_bytes += HEADER + len(message)
        if not self._read_paused and self._inbox_bytes > self._read_high:
            self._pause_reading(True)
        if self._rx_waiters:
            self.ctx._flavor_wake(self._rx_waiters)

    def _written(self) -> None:
        if self._sizes:             # one MESSAGE_TX per scheduled message, in order
            self._unsent -= self._sizes.popleft()
            if self._unsent <= self._low and self._tx_waiters:
                self.ctx._flavor_wake(self._tx_waiters)

    def _disconnected(self) -> None:
        """The connection ended: closed by the peer, or dropped by the context
        after an ERROR (a frame over max_message_size, a failed read...),
        whose reason the error's text then gives: 'closed by the peer' would
        blame the peer for what this side did."""
        if self.error is not None:
            log.debug("connection on fd %d failed: %s", self.fd, self.error)
            self._end(failed_text(self.fd, self.error))
        else:
            self._end(str(closed_by_peer(self.fd)))

    def _end(self, error: str) -> None:
        self._ended = error
        self._sizes.clear()
        self._unsent = 0
        self.ctx._flavor_wake(self._rx_waiters)
        self.ctx._flavor_wake(self._tx_waiters)
