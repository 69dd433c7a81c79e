"""The pure backend's send queues (the core's send_queue.zig): what
schedule() queues per connection, sent by the event loop without blocking,
each frame reported (MESSAGE_TX, SWITCH_TX) once it is written whole.
"""

from __future__ import annotations

import math
import os
from collections import deque
from typing import TYPE_CHECKING, Optional, Tuple

from .._checks import Bytes, as_payload, closed_by_peer, too_large_text
from .._types import Event, EventType, MessageTooLargeError, Payload, QueueFullError
from .conn_table import CONNECTION, Conn
from .framing import HEADER, encode
from .syscalls import SEND_NOW, sending

if TYPE_CHECKING:
    from .state import PureState

#: Frames handed to one sendmsg() call at most (coalescing without huge iovecs).
MAX_IOV = 64
#: Frames smaller than this at the head of a queue are joined into one buffer
#: for one send() (one copy of a small frame costs less than an iovec, and a
#: system call per MAX_IOV frames): up to JOIN_FRAMES of them (issue 21).
JOIN_BELOW = 4096
JOIN_FRAMES = 1024

_TX = EventType.MESSAGE_TX
_pack = HEADER.pack


class SendQueue:
    """PureContext's schedule() and the flushing of its queues."""

    __slots__ = ()

    def _prepare(self: PureState, fd: int, payload: object) -> Tuple[Conn, bytes | memoryview]:
        """Checks shared by write and schedule, in the documented order."""
        # bytes is as_payload's first case: taken here without the call (hot path).
        data = payload if type(payload) is bytes else as_payload(payload)
        conn = self._connection(fd)
        if len(data) > self._max_message_size:
            raise MessageTooLargeError(too_large_text(len(data), self._max_message_size))
        if conn.write_closed or conn.closing:
            raise closed_by_peer(fd)
        return conn, data

    def schedule(self: PureState, fd: int, payload: Payload) -> None:
        # The common call (bytes to a plain connection with room): the checks
        # of _prepare and of the queue bound inline, no call but the frame's
        # (issue 21: per-message cost). Anything else takes the path below,
        # which raises what is wrong in the documented order.
        conn = self._by_fd.get(fd) if type(fd) is int else None
        if conn is not None and conn.kind == CONNECTION and type(payload) is bytes \
                and not (conn.write_closed or conn.closing):
            size = len(payload) + 4
            if size <= self._max_message_size + 4:
                frame = _pack(size - 4) + payload
                bound = self._max_queue_size
                # No call from reading the count to storing it: a signal's
                # handler (which runs only after a call) that schedules
                # would otherwise have its bytes counted over.
                queued = conn.queued_bytes + size
                if queued <= bound:
                    # Marked dirty before the append (a call: a handler's
                    # exception can come after it): a queued frame is
                    # always on a connection the loop flushes.
                    newly = conn not in self._dirty
                    if newly:
                        self._dirty[conn] = None
                    conn.queued_bytes = queued
                    conn.queue.append((frame, _TX))
                    if newly:
                        self._set_interest(conn)
                    return
        conn, data = self._prepare(fd, payload)
        size = len(data) + HEADER.size
        if conn.queued_bytes + size > self._max_queue_size:
            raise QueueFullError(
                f"send queue of fd {fd} is full ({conn.queued_bytes} bytes queued, "
                f"max_queue_size {self._max_queue_size})")
        self._enqueue(conn, encode(data), _TX)

    def _enqueue(self: PureState, conn: Conn, frame: bytes, kind: Optional[EventType]) -> None:
        if conn.stopped is not None:        # the rest of a stopped write goes first
            self._keep_framed(conn)
        size = len(frame)
        # A write already failed (EPIPE): the queue goes with the connection;
        # flushed again it would fail again (and drain again). Else marked
        # dirty first, as schedule() does.
        newly = conn not in self._dirty and not conn.write_closed
        if newly:
            self._dirty[conn] = None
        conn.queued_bytes += size           # no call in between (see schedule)
        conn.queue.append((frame, kind))
        if newly:
            self._set_interest(conn)

    def _keep_framed(self: PureState, conn: Conn) -> None:
        """A write stopped midway (conn.stopped: its buffers, frames of
        payload sizes `lens`, `sent` bytes out): the rest of the frame in
        progress is queued ahead of anything else (a signal handler may have
        scheduled meanwhile), reported as no event, so the peer never finds
        another frame inside it. Frames not begun are not sent.

        The stopped write records conn.stopped before any call, and calls
        this; a second handler's exception as this is entered leaves it to
        the next send or schedule on conn, which calls it first."""
        stopped = conn.stopped
        if stopped is None:
            return
        frame, lens, sent = stopped
        rest = frame_rest(lens, sent)
        if not rest or not conn.alive:
            conn.stopped = None
            return
        data = b"".join(bytes(b) for b in advance(frame, sent))[:rest]
        size = len(data)
        newly = conn not in self._dirty and not conn.write_closed
        # From here to the appendleft no call: a handler's exception cannot
        # leave the rest queued twice (conn.stopped still set), nor not at
        # all, nor on a connection the loop does not flush. (Nothing of
        # queue[0] went out since the write began: conn.sent is 0, so the
        # rest can go first.)
        if newly:
            self._dirty[conn] = None
        conn.stopped = None
        conn.queued_bytes += size
        conn.queue.appendleft((data, None))
        if newly:
            self._set_interest(conn)

    def _send_queued(self: PureState, conn: Conn) -> bool:
        """Write queued frames without waiting; True when the queue is empty.
        (A blocking write() polls for room between calls: see _write_blocking.)

        Reports MESSAGE_TX/SWITCH_TX per frame written; lets EPIPE through.
        """
        queue = conn.queue
        if conn.stopped is not None:        # (see _keep_framed)
            self._keep_framed(conn)
        # Bytes a stopped call counted but did not account for (see _sending).
        self._account_sent(conn)
        while queue:
            bufs = _next_buffers(queue, conn.sent)
            try:
                for n in sending(conn.io, bufs, SEND_NOW):
                    conn.sent += n      # counted at once; frames accounted next
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            self._account_sent(conn)
        if not queue:
            self._dirty.pop(conn, None)
        self._set_interest(conn)
        if conn.peer is not None:
            self._set_interest(conn.peer)    # back-pressure may be over
        return not queue

    def _account_sent(self: PureState, conn: Conn) -> None:
        """Frames written whole (conn.sent counts the bytes written from the
        first one on) leave the queue, each reported by its event. Events
        are immutable: the MESSAGE_TX of one call are one Event repeated, as
        the native backend reports them (no Event made per message)."""
        queue = conn.queue
        if not queue or conn.sent < len(queue[0][0]):
            return
        append, fd, index = self._pending.append, conn.fd, conn.index
        tx = Event(_TX, fd, index)
        # Each next() of it is a popleft() (a frame is never None).
        pop_one = iter(queue.popleft, None)
        while queue:
            frame, kind = queue[0]
            size = len(frame)
            if conn.sent < size:
                break
            # None: the rest of a stopped write(), reported by no event.
            event = tx if kind is _TX else None if kind is None else Event(kind, fd, index)
            # One frame's accounting with no handler in between: its bytes
            # off conn.sent (else the next frame, not sent, would be taken
            # for sent and the stream torn) and queued_bytes, the frame off
            # the queue (a for loop's step, in C), its event appended (the
            # call; a handler's exception comes only after it returns).
            conn.sent -= size
            conn.queued_bytes -= size
            for _ in pop_one:
                break
            if event is not None:
                append(event)

    def _flush(self: PureState, conn: Conn) -> None:
        """Event-loop flush: a peer that is gone is read to the end, then dropped."""
        try:
            self._send_queued(conn)
        except (BrokenPipeError, ConnectionResetError):
            conn.write_closed = True
            self._dirty.pop(conn, None)     # nothing more to write (see _enqueue)
            # A paused fd is not read: what the peer sent, and its end, are
            # seen once it is resumed (pause_reading; the core's flushConn).
            if conn.read_paused and not conn.closing and conn.peer is None:
                self._set_interest(conn)
                return
            # What the peer sent before it went is read to the end (a closing
            # side's input has nowhere to go): pyipc frames all at once (no
            # budget: nothing follows them), a foreign protocol's by its
            # on_in, which meets the end itself (see the core's flushConn).
            if not conn.closing:
                if conn.on_in is None:
                    self._read_conn(conn, budget=math.inf)
                elif conn.peer is not None:
                    self._drain_in(conn)
            if conn.alive:
                self._drop(conn, None)
        except OSError as e:
            self._drop(conn, f"write failed: {os.strerror(e.errno or 0)}")
        else:
            if conn.closing and not conn.queue:
                self._drop(conn, None)

    def _flush_dirty(self: PureState) -> None:
        """Send what is queued, without blocking (a round's first step)."""
        if self._dirty:
            for conn in list(self._dirty):
                if conn.alive:
                    self._flush(conn)


def _next_buffers(queue: deque[Tuple[bytes, Optional[EventType]]], sent: int) -> list[Bytes]:
    """What one send takes from the head of `queue` (`sent` bytes of its
    first frame are gone): small frames joined into one buffer, else up to
    MAX_IOV frames as they are (large ones are not copied). The head is
    read by index, not with an iterator of the deque: a signal handler that
    schedules (it runs between Python steps, even between making an
    iterator and using it) appends to the deque, which would break the
    iteration ("deque mutated during iteration")."""
    if len(queue) > 1 and len(queue[0][0]) < JOIN_BELOW:
        small: list[bytes] = []
        for frame, _ in _head(queue, JOIN_FRAMES):
            if len(frame) >= JOIN_BELOW:
                break
            small.append(frame)
        if len(small) > 1:
            return [memoryview(b"".join(small))[sent:]]
    head = _head(queue, MAX_IOV)
    bufs: list[Bytes] = [memoryview(head[0][0])[sent:]]
    bufs.extend(frame for frame, _ in head[1:])
    return bufs


def _head(queue: deque[Tuple[bytes, Optional[EventType]]],
          n: int) -> list[Tuple[bytes, Optional[EventType]]]:
    """The first `n` entries of `queue` (fewer if it is shorter), by index."""
    return list(map(queue.__getitem__, range(min(n, len(queue)))))


def frame_rest(lens: list[int], written: int) -> int:
    """Bytes left of the frame in progress once `written` bytes of frames of
    payload sizes `lens` went out (0 on a frame boundary): the core's progress()."""
    start = 0
    for size in lens:
        end = start + HEADER.size + size
        if written < end:
            return end - written if written > start else 0
        start = end
    return 0


def advance(buffers: list[Bytes], n: int) -> list[Bytes]:
    """The part of `buffers` left after `n` bytes were written."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and n:
        head: list[Bytes] = [memoryview(buffers[0])[n:]]
        buffers = head + buffers[1:]
    return buffers
