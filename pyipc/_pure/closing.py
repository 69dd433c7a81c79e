"""Closing in the pure backend: close() and close_all() after the linger,
a connection that ends (ERROR, DISCONNECTION), a forked child's copies, and
the finalizer of a context dropped without close_all().
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Iterable, Optional

from .. import _rundir
from .._checks import DISCARD_TEXT
from .._types import Event, EventType
from .conn_table import EXTERNAL, Conn, close_io
from .poller import Poller
from .syscalls import SpareFd

if TYPE_CHECKING:
    from .state import PureState

log = logging.getLogger("pyipc")


class Closing:
    """PureContext's close(), close_all() and ending connections."""

    __slots__ = ()

    def close(self: PureState, fd: int, linger: Optional[float] = None) -> None:
        linger = self._linger_of(linger)
        if self._close_ended(fd):
            return
        conn = self._lookup(fd)
        pair = [c for c in (conn, conn.peer) if c is not None]
        try:
            self._linger(pair, linger)
        finally:    # closed even when a signal's handler raised during the linger
            # fd ended during the linger (its peer hung up): nothing more could
            # go out; closed as any ended fd is, with no warning (as native).
            self._close_ended(fd)
            for c in pair:
                if not c.alive:
                    continue
                if c.queue:
                    log.warning(DISCARD_TEXT, c.fd, len(c.queue))
                self._pending.drop(c.fd)
                self._forget(c)

    def _close_ended(self: PureState, fd: int) -> bool:
        """close() of a connection that ended (its events dropped, its fd
        closed); False when fd is not one."""
        io = self._ended.pop(fd, None) if isinstance(fd, int) else None
        if io is None:
            return False
        self._pending.drop(fd)
        close_io(io)
        heapq.heappush(self._free, self._ended_slots.pop(fd))
        return True

    def close_all(self: PureState) -> None:
        try:
            self._linger(list(self._dirty), self.linger)
        finally:
            for conn in list(self._by_fd.values()):
                if conn.alive:
                    if conn.queue:
                        log.warning(DISCARD_TEXT, conn.fd, len(conn.queue))
                    self._forget(conn)
            self._release_ended()
            self._pending.clear()
            self._free.clear()
            self._slots.clear()
            self._mark_closed()

    def _linger(self: PureState, conns: list[Conn], linger: float) -> None:
        """Send what is scheduled for `conns` for at most `linger` seconds,
        in event-loop rounds: what they read or accept waits as events.
        Inside a switch callback it only writes (_linger_writing), as native:
        rounds there would read other fds and run their callbacks under the
        loop that called this one."""
        def scheduled() -> bool:
            # (a queue whose write failed is never sent: nothing to wait for)
            return any(c.alive and c.queue and not c.write_closed for c in conns)

        if not linger:
            return
        # A write in progress (a signal handler's close, inside it), or one a
        # second exception stopped, has its frame's rest queued first, so the
        # linger sends it: its record alone is sent by nobody.
        for conn in conns:
            if conn.stopped is not None:
                self._keep_framed(conn)
        if not scheduled():
            return
        deadline = time.monotonic() + linger
        if self._callback_depth:
            return self._linger_writing(conns, deadline)
        self._linger_depth += 1
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._flush_dirty()
                # Only wait while something is left: the flush may have sent it
                # all, or ended the connection (its peer hung up).
                if not scheduled():
                    return
                self._round(left, wait=True)
        finally:
            self._linger_depth -= 1
            if not self._linger_depth:
                self._unmute_all()

    def _linger_writing(self: PureState, conns: list[Conn], deadline: float) -> None:
        """_linger inside a switch callback: the queues of `conns` are
        written, with poll(2) for room on their fds only; nothing is read or
        accepted and no other callback runs (the core's lingerWriting). A
        queue whose write fails is left as it is for the loop's next flush
        (_flush: its EPIPE path reads the peer's last input, which cannot
        happen here); the linger no longer waits for it."""
        left = list(conns)
        while True:
            still: list[Conn] = []
            for conn in left:
                if not conn.alive or conn.write_closed or not conn.queue:
                    continue
                try:
                    self._send_queued(conn)
                except OSError:
                    continue
                if conn.closing and not conn.queue:
                    self._drop(conn, None)
                if conn.alive and conn.queue:
                    still.append(conn)
            left = still
            wait = deadline - time.monotonic()
            if not left or wait <= 0:
                return
            poller = select.poll()
            for conn in left:
                poller.register(conn.fd, select.POLLOUT)
            poller.poll(math.ceil(wait * 1000))

    def _unmute_all(self: PureState) -> None:
        """The last linger ended: the external fds it muted are watched again."""
        muted = list(self._muted)
        self._muted.clear()
        for conn in muted:
            conn.muted = False
            if conn.alive:
                self._set_interest(conn)

    def _close_in_child(self: PureState, fd: Optional[int]) -> None:
        # This process's copies only: the parent's socket files, lock and
        # epoll instance (shared through fork) are left alone.
        if fd is None:
            conns = list(self._by_fd.values())
        elif self._close_ended(fd):
            return
        else:                       # with its switch peer, as close() and native
            conn = self._lookup(fd)
            conns = [c for c in (conn, conn.peer) if c is not None and c.alive]
        for conn in conns:
            conn.alive = False
            self._by_fd.pop(conn.fd, None)
            if conn.lock_fd >= 0:
                os.close(conn.lock_fd)
            close_io(conn.io)
        if fd is None:
            self._release_ended()
            self._pending.clear()
            self._mark_closed()

    def _drop(self: PureState, conn: Conn, error: Optional[str]) -> None:
        """End a connection: ERROR (if any reason), DISCONNECTION, then its switch peer."""
        if not conn.alive:
            return
        if error is None and conn.queue:
            error = (f"peer closed the connection with {len(conn.queue)} "
                     f"scheduled message(s) unsent")
        if error is not None:
            self._pending.append(Event(EventType.ERROR, conn.fd, conn.index, None, error))
        self._pending.append(Event(EventType.DISCONNECTION, conn.fd, conn.index))
        self._forget(conn, keep_fd=True)
        peer = conn.peer
        if peer is not None and peer.alive:
            self._close_after_flush(peer)


def drop_shared_in_child(conns: Iterable[Conn], ended: Iterable[int]) -> None:
    """In a forked child, at fork: put /dev/null on this process's copies
    of the services' lock fds and of the listening and connected sockets
    (those that ended too). Else a child that never calls in would keep a
    closed (or crashed) parent's service name locked (flock ends with the
    last reference) and its closed connections open for their peers. The
    numbers stay taken (a later close in the child closes them, as
    before); external fds (the caller's), the poller and fileno()'s fds are
    left alone. The native core does the same (dropSharedInChild)."""
    fds = [fd for conn in conns
           for fd in ((conn.lock_fd, conn.fd) if conn.kind != EXTERNAL else (conn.lock_fd,))
           if fd >= 0]
    fds.extend(ended)
    try:
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return                  # out of fds: the references stay, as before
    try:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def release(pid: int, by_fd: dict[int, Conn], ended: dict[int, socket.socket], r: int, w: int,
             poller: Poller, spare: "SpareFd") -> None:
    """Finalizer of a collected context: close every fd it holds (its
    connections, services, their lock files, the wake-up pipe, the poller,
    the spare fd). Its services' sockets are removed only in the process that
    made it: a forked child that drops its copy closes its own fds and
    nothing else (the parent's lock stays, held by the parent's fd)."""
    owner = os.getpid() == pid
    for conn in list(by_fd.values()):
        if conn.path is not None and owner:
            with contextlib.suppress(OSError):
                _rundir.remove_own_socket(conn.path, conn.path_id)
        if conn.lock_fd >= 0:
            os.close(conn.lock_fd)
        with contextlib.suppress(OSError):  # an external fd its owner closed already
            conn.io.close()
    by_fd.clear()
    for io in ended.values():
        close_io(io)
    ended.clear()
    poller.close()
    os.close(r)
    os.close(w)
    spare.close()
