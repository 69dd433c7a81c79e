"""The pure backend's connection table (the core's conn_table.zig): every
managed fd, its slot (the lowest free one, as the index events report), and
what the poller watches it for.
"""

from __future__ import annotations

import heapq
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Optional, Tuple

from .. import _rundir
from .._checks import OnIn, OnOut, check_fd, closed_by_peer
from .._types import ConnectionLimitError, EventType, UnknownFdError
from .framing import FrameDecoder
from .syscalls import os_error
from .poller import READ, WRITE

if TYPE_CHECKING:
    from .state import PureState

SERVICE, CONNECTION, EXTERNAL = "service", "connection", "external"


class Conn:
    """One managed fd: its kind, slot, decoder, send queue and switch state."""

    __slots__ = ("fd", "io", "kind", "index", "alive", "decoder", "queue", "sent",
                 "queued_bytes", "write_closed", "closing", "peer", "on_in", "on_out",
                 "mask", "path", "path_id", "lock_fd", "more_round", "read_paused", "muted",
                 "draining", "stopped")

    def __init__(self, fd: int, io: socket.socket, kind: str, limit: int) -> None:
        self.fd = fd
        self.io = io
        self.kind = kind
        self.index = -1
        self.alive = True
        self.decoder = FrameDecoder(limit)
        # (frame bytes, event type to report when sent; None: no event)
        self.queue: deque[Tuple[bytes, Optional[EventType]]] = deque()
        self.sent = 0                   # bytes of queue[0] already written
        self.queued_bytes = 0
        # A write() stopped midway (buffers, payload sizes, bytes sent) whose
        # rest is not queued yet (see _keep_framed); None: none.
        self.stopped: Optional[Tuple[list[Any], list[int], int]] = None
        self.write_closed = False
        # Its switch peer ended: not read any more, closed (DISCONNECTION)
        # once what was forwarded to it is written.
        self.closing = False
        self.peer: Optional[Conn] = None
        self.on_in: Optional[OnIn] = None
        self.on_out: Optional[OnOut] = None
        self.mask = 0
        self.path: Optional[str] = None
        # The socket file bound at path (a service's): removed on close
        # only while path still names it (_rundir.remove_own_socket).
        self.path_id: _rundir.FileId = (0, 0)
        self.lock_fd = -1
        # The round its on_in was last called in (MORE: one batch a round).
        self.more_round = -1
        # Reads paused by the caller (pause_reading): not watched for input.
        self.read_paused = False
        # An external fd reported readable (EXTERNAL) during a linger: not
        # watched for input until the linger ends. A linger never reads it, so
        # it would stay readable and each pass of the linger's loop would
        # report it again at once (a spinning CPU, an EXTERNAL per pass).
        self.muted = False
        # Its on_in is being called to the end after a failed write
        # (Switching._drain_in): not started again from inside.
        self.draining = False


def close_io(io: socket.socket) -> None:
    """Close a managed fd's object. An fd its owner closed behind the
    context's back (EBADF) is closed all the same: as the core's close(),
    close() and close_all() go on (close_all used to stop half way, leaving
    the services after it listening)."""
    try:
        io.close()
    except OSError:
        pass


class ConnTable:
    """PureContext's table of managed fds (slots, lookup, poller interest)."""

    __slots__ = ()

    def _check_room(self: PureState) -> None:
        if len(self._by_fd) >= self._max_connections:
            raise ConnectionLimitError(
                f"too many connections (max_connections {self._max_connections})")

    def _add(self: PureState, conn: Conn) -> Conn:
        """Start watching conn and give it the lowest free slot. An fd the
        poller refuses (epoll: a regular file) is not kept: IPCError
        "cannot watch fd N: REASON", as the core's."""
        try:
            self._set_interest(conn)
        except OSError as e:
            raise os_error(f"cannot watch fd {conn.fd}", e.errno) from None
        conn.index = heapq.heappop(self._free) if self._free else len(self._slots)
        if conn.index == len(self._slots):
            self._slots.append(conn)
        else:
            self._slots[conn.index] = conn
        self._by_fd[conn.fd] = conn
        return conn

    def _forget(self: PureState, conn: Conn, keep_fd: bool = False) -> None:
        """Stop watching conn, close its fd and free its slot (or keep both
        reserved until the next round: _release_ended)."""
        conn.alive = False
        if conn.mask:
            self._poller.unregister(conn.fd)
        del self._by_fd[conn.fd]
        self._slots[conn.index] = None
        if keep_fd:
            self._ended_slots[conn.fd] = conn.index
        else:
            heapq.heappush(self._free, conn.index)
        self._dirty.pop(conn, None)
        if conn.path is not None:
            _rundir.remove_own_socket(conn.path, conn.path_id)
        if conn.lock_fd >= 0:
            os.close(conn.lock_fd)
        if keep_fd:
            # The peer sees the end now (EOF, EPIPE); only the number stays taken.
            # (Not for an external fd: it may be shared, shutdown would end it for all.)
            if conn.kind == CONNECTION:
                try:
                    conn.io.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._ended[conn.fd] = conn.io
        else:
            close_io(conn.io)

    def _release_ended(self: PureState) -> None:
        """Close the fds of ended connections: all their events were handed out."""
        for io in self._ended.values():
            close_io(io)
        self._ended.clear()
        for index in self._ended_slots.values():
            heapq.heappush(self._free, index)
        self._ended_slots.clear()

    def _lookup(self: PureState, fd: int) -> Conn:
        if type(fd) is not int:         # the check costs a call: a plain int needs none
            check_fd(fd)
        conn = self._by_fd.get(fd)
        if conn is None:
            if fd in self._ended:
                raise closed_by_peer(fd)
            raise UnknownFdError(f"fd {fd} is not managed by this context")
        return conn

    def _connection(self: PureState, fd: int) -> Conn:
        """A managed connection (not a service, not a plain external fd)."""
        conn = self._lookup(fd)
        if conn.kind == SERVICE or (conn.kind == EXTERNAL and conn.peer is None):
            raise UnknownFdError(f"fd {fd} is not a connection")
        return conn

    def _set_interest(self: PureState, conn: Conn) -> None:
        """Watch reads (unless back-pressure or the caller pauses them) and
        writes while queued."""
        mask = 0 if conn.closing or conn.read_paused or conn.muted or (
            conn.peer is not None and conn.peer.queued_bytes > self._max_queue_size) else READ
        if conn.queue and not conn.write_closed:    # (a failed queue is never sent)
            mask |= WRITE
        if mask == conn.mask:
            return
        if conn.mask == 0:
            self._poller.register(conn.fd, mask, conn)
        elif mask == 0:
            self._poller.unregister(conn.fd)
        else:
            self._poller.modify(conn.fd, mask, conn)
        conn.mask = mask
