"""The pure-Python backend: sockets, a poller (epoll or ``selectors``) and the
rules of the README.

This is the reference the native backend is tested against, so it follows the
README's "Behaviour in detail" literally: one round = flush queues, wait for
readiness, handle every ready fd; a connection that ends reports its last
messages, then ERROR when there is a reason, then DISCONNECTION.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import math
import os
import select
import signal
import socket
import stat
import struct
import time
import weakref
from collections import deque
from typing import Callable, Optional, Tuple

from . import _poller, _rundir
from ._context import (Context, OnIn, OnOut, as_payload, as_payload_list,
                       buffer_too_small_text, check_max_messages, check_timeout, writable_view)
from ._framing import (DIRECT_READ_MIN, HEADER, FrameDecoder, FrameTooLarge, encode,
                       too_large_text)
from ._types import (DEFAULT_READ_MANY, IPCD_SERVICE, READ_MANY_BYTES, CBEvent, ConnectionClosedError, ConnectionLimitError,
                     Event, EventType, IPCError, MessageTooLargeError, QueueFullError,
                     ServiceNotFoundError, TimeoutError, UnknownFdError)

log = logging.getLogger("pyipc")

#: Bytes read from one fd in one round at most, so one busy peer cannot starve others.
READ_BUDGET = 256 * 1024
#: Frames handed to one sendmsg() call at most (coalescing without huge iovecs).
MAX_IOV = 64
#: Messages write_many() gathers into one buffer (and one system call).
WRITE_MANY_BATCH = 512
#: Fds received with ipcd's answer at most (the first is used, the others
#: closed; the kernel discards any beyond these).
MAX_RECEIVED_FDS = 8
#: Size of the context's receive scratch buffer.
SCRATCH_SIZE = 64 * 1024
#: write() joins header and payload up to this payload size into one buffer
#: (a copy this small is cheaper than a two-part sendmsg); larger ones are
#: sent from where they are.
WRITE_JOINED_MAX = 4096

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
#: Our own sockets are in blocking mode (the blocking calls wait in the kernel,
#: no fcntl per call); the event loop's transfers pass MSG_DONTWAIT, as native's.
_DONTWAIT = socket.MSG_DONTWAIT
_SEND_NOW = _SEND_FLAGS | _DONTWAIT
#: Received fds are close-on-exec from the start, where the system can.
_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
_PEERCRED = struct.Struct("3i")

_RX = EventType.MESSAGE_RX
_TX = EventType.MESSAGE_TX
_SWITCH_RX = EventType.SWITCH_RX
_SWITCH_TX = EventType.SWITCH_TX
_READ = _poller.READ
#: The poller data of the wake-up pipe (another thread's schedule()).
_WAKE = object()
_WRITE = _poller.WRITE

SERVICE, CONNECTION, EXTERNAL = "service", "connection", "external"


class _RawFd:
    """A non-socket fd (a pipe, a tty) with the few socket methods we use."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def recv_into(self, buf: memoryview, *_: object) -> int:
        return os.readv(self._fd, [buf])     # non-blocking mode: never waits

    def sendmsg(self, buffers: list, *_: object) -> int:
        return _writev_quiet(self._fd, buffers)

    def send(self, buffer: bytes | memoryview, *_: object) -> int:
        return _writev_quiet(self._fd, [buffer])

    def close(self) -> None:
        os.close(self._fd)


def _sending(io: object, buffers: list, flags: int) -> map:
    """One write of ``buffers``, made when the result is iterated: it yields
    the bytes written. Iterate it with ``for n in _sending(...): x += n``:
    CPython runs signal handlers at calls and backward jumps, not inside a
    for loop's step, so a handler's exception cannot come between the bytes
    leaving and their being counted (a plain ``n = io.send(...)`` loses n to
    an exception raised as the call returns: the bytes would be sent again,
    or a frame left half-sent). One buffer goes through send(): no list for
    sendmsg to parse, and the kernel's single-buffer path (a 68-byte frame:
    0.3-0.7 us cheaper than sendmsg, measured)."""
    if len(buffers) == 1:
        return map(io.send, buffers, (flags,))          # type: ignore[attr-defined]
    return map(io.sendmsg, (buffers,), ((),), (flags,))  # type: ignore[attr-defined]


class _Conn:
    """One managed fd: its kind, slot, decoder, send queue and switch state."""

    __slots__ = ("fd", "io", "kind", "index", "alive", "decoder", "queue", "sent",
                 "queued_bytes", "write_closed", "closing", "peer", "on_in", "on_out",
                 "mask", "path", "lock_fd")

    def __init__(self, fd: int, io: object, kind: str, limit: int) -> None:
        self.fd = fd
        self.io = io
        self.kind = kind
        self.index = -1
        self.alive = True
        self.decoder = FrameDecoder(limit)
        self.queue: deque = deque()     # [frame bytes, event type to report when sent]
        self.sent = 0                   # bytes of queue[0] already written
        self.queued_bytes = 0
        self.write_closed = False
        # Its switch peer ended: not read any more, closed (DISCONNECTION)
        # once what was forwarded to it is written.
        self.closing = False
        self.peer: Optional[_Conn] = None
        self.on_in: Optional[OnIn] = None
        self.on_out: Optional[OnOut] = None
        self.mask = 0
        self.path: Optional[str] = None
        self.lock_fd = -1


class PureContext(Context):
    """The pure-Python backend of :class:`pyipc.Context`."""

    __slots__ = ("_by_fd", "_slots", "_free", "_dirty", "_poller",
                 "_scratch", "_scratch_view", "_ended", "_wake_r", "_wake_w",
                 "_spare_fd")

    backend = "pure"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._by_fd: dict[int, _Conn] = {}
        self._slots: list[Optional[_Conn]] = []
        self._free: list[int] = []                 # heap of free slot numbers
        self._dirty: dict[_Conn, None] = {}        # connections with queued frames
        # Connections that ended (DISCONNECTION reported) keep their fd open until
        # the next round, so a new connection cannot get the same number while
        # the old one's events are handled (a reply would reach the wrong peer).
        self._ended: dict[int, object] = {}
        self._poller, self._wake_r, self._wake_w = _context_fds()
        self._scratch = bytearray(SCRATCH_SIZE)
        self._scratch_view = memoryview(self._scratch)
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, _READ, _WAKE)
        # A fd on /dev/null for refusing a client when out of fds (_refuse_with_spare).
        self._spare_fd = _SpareFd()
        # Dropped without close_all(): its fds are closed, and its services'
        # sockets removed and locks released, as native's finalizer does.
        weakref.finalize(self, _release, os.getpid(), self._by_fd, self._ended,
                         self._wake_r, self._wake_w, self._poller, self._spare_fd)
        self._track_unclosed()

    # -- table -----------------------------------------------------------------
    def _check_room(self) -> None:
        if len(self._by_fd) >= self.max_connections:
            raise ConnectionLimitError(
                f"too many connections (max_connections {self.max_connections})")

    def _add(self, conn: _Conn) -> _Conn:
        """Give conn the lowest free slot and start watching it."""
        conn.index = heapq.heappop(self._free) if self._free else len(self._slots)
        if conn.index == len(self._slots):
            self._slots.append(conn)
        else:
            self._slots[conn.index] = conn
        self._by_fd[conn.fd] = conn
        self._set_interest(conn)
        return conn

    def _forget(self, conn: _Conn, keep_fd: bool = False) -> None:
        """Stop watching conn, close its fd (or keep it reserved), free its slot."""
        conn.alive = False
        if conn.mask:
            self._poller.unregister(conn.fd)
        del self._by_fd[conn.fd]
        self._slots[conn.index] = None
        heapq.heappush(self._free, conn.index)
        self._dirty.pop(conn, None)
        if conn.path is not None:
            _rundir.remove_stale_socket(conn.path)
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
            conn.io.close()  # type: ignore[attr-defined]

    def _release_ended(self) -> None:
        """Close the fds of ended connections: all their events were handed out."""
        for io in self._ended.values():
            io.close()  # type: ignore[attr-defined]
        self._ended.clear()

    def _lookup(self, fd: int) -> _Conn:
        if type(fd) is not int:         # the check costs a call: a plain int needs none
            _check_fd_type(fd)
        conn = self._by_fd.get(fd)
        if conn is None:
            if fd in self._ended:
                raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer")
            raise UnknownFdError(f"fd {fd} is not managed by this context")
        return conn

    def _connection(self, fd: int) -> _Conn:
        """A managed connection (not a service, not a plain external fd)."""
        conn = self._lookup(fd)
        if conn.kind == SERVICE or (conn.kind == EXTERNAL and conn.peer is None):
            raise UnknownFdError(f"fd {fd} is not a connection")
        return conn

    def _set_interest(self, conn: _Conn) -> None:
        """Watch reads (unless back-pressure pauses them) and writes while queued."""
        mask = 0 if conn.closing or (
            conn.peer is not None and conn.peer.queued_bytes > self.max_queue_size) else _READ
        if conn.queue:
            mask |= _WRITE
        if mask == conn.mask:
            return
        if conn.mask == 0:
            self._poller.register(conn.fd, mask, conn)
        elif mask == 0:
            self._poller.unregister(conn.fd)
        else:
            self._poller.modify(conn.fd, mask, conn)
        conn.mask = mask

    # -- services and connections --------------------------------------------------
    def service_init(self, name: str) -> int:
        path = _rundir.service_path(self.rundir, name)
        self._check_room()
        _rundir.check_rundir(self.rundir, create=True)
        lock_fd = _rundir.lock_service(self.rundir, name, path)
        sock = None
        try:
            _rundir.remove_stale_socket(path, name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.bind(path)
            os.chmod(path, 0o660)
            sock.listen(socket.SOMAXCONN)
            sock.setblocking(False)
        except OSError as e:
            if sock is not None:
                sock.close()
            os.close(lock_fd)
            if isinstance(e, IPCError):
                raise
            raise _os_error(f"cannot start service {name}", e.errno) from None
        conn = _Conn(sock.fileno(), sock, SERVICE, self.max_message_size)
        conn.path, conn.lock_fd = path, lock_fd
        self._spare_fd.open()
        return self._add(conn).fd

    def connect_service(self, name: str) -> int:
        path = _rundir.service_path(self.rundir, name)
        self._check_room()
        if not _rundir.check_rundir(self.rundir, create=False):
            raise ServiceNotFoundError(f"no service {name} in {self.rundir}", errno.ENOENT)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:        # out of fds: native's text, with errno
            raise _os_error(f"cannot connect to service {name}", e.errno) from None
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise ServiceNotFoundError(f"no service {name} in {self.rundir}", e.errno) from None
        except OSError as e:
            sock.close()
            raise _os_error(f"cannot connect to service {name}", e.errno) from None
        return self._add(_Conn(sock.fileno(), sock, CONNECTION, self.max_message_size)).fd

    def _connect_ipcd(self, name: str, network: str, timeout: Optional[float]) -> int:
        _rundir.service_path(self.rundir, name)
        try:
            ipcd = self.connect_service(IPCD_SERVICE)
        except ServiceNotFoundError as e:
            raise ServiceNotFoundError(
                f"IPC_NETWORK is set but ipcd is not running "
                f"(no service {IPCD_SERVICE} in {self.rundir})", e.errno) from None
        sock = self._by_fd[ipcd].io
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.write(ipcd, f"{name};{network}", timeout)
            # An ipcd that accepted but does not answer must not hang us.
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _wait_fd(ipcd, select.POLLIN, left):
                raise TimeoutError(f"connect to service {name} timed out")
            answer, fds, _, _ = socket.recv_fds(  # type: ignore[arg-type]
                sock, 2000, MAX_RECEIVED_FDS, _CMSG_CLOEXEC)
        except TimeoutError as e:
            raise TimeoutError(f"connect to service {name} timed out") from e.__cause__
        except OSError:
            answer, fds = b"", []
        finally:
            self.close(ipcd)
        for extra in fds[1:]:        # only the first is used: the others are not leaked
            os.close(extra)
        if answer != b"ok" or not fds:
            if fds:
                os.close(fds[0])
            raise IPCError(f"ipcd could not connect to service {name}")
        sock = _connected_unix_stream(fds[0])
        if sock is None:
            raise IPCError("ipcd sent a file descriptor that is not a connected "
                           "Unix stream socket")
        sock.setblocking(True)
        return self._add(_Conn(sock.fileno(), sock, CONNECTION, self.max_message_size)).fd

    def add_external(self, fd: int) -> None:
        _check_fd_type(fd)
        if fd in self._ended:
            raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer")
        if fd in self._by_fd:
            raise IPCError(f"fd {fd} is already managed by this context")
        try:
            mode = os.fstat(fd).st_mode
        except (OSError, OverflowError, TypeError):
            raise UnknownFdError(f"fd {fd} is not an open file descriptor") from None
        self._check_room()
        io = socket.socket(fileno=fd) if stat.S_ISSOCK(mode) else _RawFd(fd)
        self._add(_Conn(fd, io, EXTERNAL, self.max_message_size))

    def peer_credentials(self, fd: int) -> Tuple[int, int, int]:
        conn = self._connection(fd)
        if not hasattr(socket, "SO_PEERCRED"):
            raise IPCError("peer credentials are not supported on this platform")
        try:
            raw = conn.io.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,  # type: ignore
                                     _PEERCRED.size)
        except AttributeError:      # not a socket (a pipe switched in)
            raise _os_error(f"cannot read peer credentials of fd {fd}", errno.ENOTSOCK) \
                from None
        except OSError as e:
            raise _os_error(f"cannot read peer credentials of fd {fd}", e.errno) from None
        return _PEERCRED.unpack(raw)

    # -- closing ---------------------------------------------------------------
    def close(self, fd: int, linger: Optional[float] = None) -> None:
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
                    log.warning("closing fd %d discards %d scheduled message(s)",
                                c.fd, len(c.queue))
                self._drop_pending(c.fd)
                self._forget(c)

    def _close_ended(self, fd: int) -> bool:
        """close() of a connection that ended (its events dropped, its fd
        closed); False when fd is not one."""
        io = self._ended.pop(fd, None) if isinstance(fd, int) else None
        if io is None:
            return False
        self._drop_pending(fd)
        io.close()  # type: ignore[attr-defined]
        return True

    def close_all(self) -> None:
        try:
            self._linger(list(self._dirty), self.linger)
        finally:
            for conn in list(self._by_fd.values()):
                if conn.alive:
                    if conn.queue:
                        log.warning("closing fd %d discards %d scheduled message(s)",
                                    conn.fd, len(conn.queue))
                    self._forget(conn)
            self._release_ended()
            self._pending.clear()
            self._free.clear()
            self._slots.clear()
            self._mark_closed()

    def _linger(self, conns: list, linger: float) -> None:
        """Send what is scheduled for ``conns`` for at most ``linger`` seconds,
        in event-loop rounds: what they read or accept waits as events."""
        def scheduled() -> bool:
            return any(c.alive and c.queue for c in conns)

        if not linger or not scheduled():
            return
        deadline = time.monotonic() + linger
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

    def _close_in_child(self, fd: Optional[int]) -> None:
        # This process's copies only: the parent's socket files, lock and
        # epoll instance (shared through fork) are left alone.
        conns = list(self._by_fd.values()) if fd is None else [self._lookup(fd)]
        for conn in conns:
            conn.alive = False
            self._by_fd.pop(conn.fd, None)
            if conn.lock_fd >= 0:
                os.close(conn.lock_fd)
            conn.io.close()  # type: ignore[attr-defined]
        if fd is None:
            self._release_ended()
            self._pending.clear()
            self._mark_closed()

    def _drop(self, conn: _Conn, error: Optional[str]) -> None:
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

    def _close_after_flush(self, conn: _Conn) -> None:
        """The other side of a switch whose peer ended: closed too, but only once
        what was forwarded to it is written, so the ended side's last messages
        are not lost. Meanwhile it is not read (its input has nowhere to go)."""
        conn.peer = None
        if not conn.queue:
            self._drop(conn, None)
            return
        conn.closing = True
        self._set_interest(conn)

    # -- sending ---------------------------------------------------------------
    def _prepare(self, fd: int, payload: object) -> Tuple[_Conn, bytes | memoryview]:
        """Checks shared by write and schedule, in the documented order."""
        # bytes is as_payload's first case: taken here without the call (hot path).
        data = payload if type(payload) is bytes else as_payload(payload)
        conn = self._connection(fd)
        if len(data) > self.max_message_size:
            raise MessageTooLargeError(too_large_text(len(data), self.max_message_size))
        if conn.write_closed or conn.closing:
            raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer")
        return conn, data

    def schedule(self, fd: int, payload: object) -> None:
        conn, data = self._prepare(fd, payload)
        size = len(data) + HEADER.size
        if conn.queued_bytes + size > self.max_queue_size:
            raise QueueFullError(
                f"send queue of fd {fd} is full ({conn.queued_bytes} bytes queued, "
                f"max_queue_size {self.max_queue_size})")
        self._enqueue(conn, encode(data), _TX)

    def _enqueue(self, conn: _Conn, frame: bytes, kind: Optional[EventType]) -> None:
        conn.queue.append((frame, kind))
        conn.queued_bytes += len(frame)
        if conn not in self._dirty:
            self._dirty[conn] = None
            self._set_interest(conn)

    def write(self, fd: int, payload: object, timeout: Optional[float] = None) -> None:
        block = self._blocking(fd, timeout, "write", spin=False)    # first, as native
        conn, data = self._prepare(fd, payload)
        self._write_blocking(conn, [encode(data)] if len(data) <= WRITE_JOINED_MAX
                             else [HEADER.pack(len(data)), data], [len(data)], block)

    def write_many(self, fd: int, payloads: object, timeout: Optional[float] = None) -> None:
        items = as_payload_list(payloads)
        block = self._blocking(fd, timeout, "write", spin=False)
        conn = self._connection(fd)
        largest = max(map(len, items), default=0)
        if largest > self.max_message_size:
            raise MessageTooLargeError(too_large_text(largest, self.max_message_size))
        if conn.write_closed or conn.closing:
            raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer")
        pack = HEADER.pack
        # Frames gathered into one buffer per batch (one copy, one system call
        # for many small messages), as native copies small frames into one buffer.
        batches = [b"".join([part for p in items[i:i + WRITE_MANY_BATCH]
                             for part in (pack(len(p)), p)])
                   for i in range(0, len(items), WRITE_MANY_BATCH)]
        if not batches:
            self._write_blocking(conn, [], [], block)   # still flushes the queue, as native does
        for k, batch in enumerate(batches):
            self._write_blocking(conn, [batch], list(map(
                len, items[k * WRITE_MANY_BATCH:(k + 1) * WRITE_MANY_BATCH])), block)

    def _write_blocking(self, conn: _Conn, frame: list, lens: list, block: "_Blocking") -> None:
        """Flush conn's queue, then write every byte of ``frame`` (buffers:
        frames of payload sizes ``lens``), waiting as ``block`` says while the
        socket is full. Stopped midway (an exception of a signal's handler,
        the timeout), the rest of the frame in progress is queued (_keep_framed)."""
        fd = conn.fd
        # MSG_DONTWAIT, then poll() for room: a send that waits in the kernel
        # returns a partial count when a signal comes, and a handler that
        # raises right after it would leave those bytes unaccounted (the
        # stream then corrupt). poll() moves no bytes: an exception there is
        # harmless (_keep_framed).
        sent = 0
        rest = frame
        try:
            while conn.queue:
                if not self._send_queued(conn):
                    block.idle(fd, select.POLLOUT)
            while rest:
                try:
                    for n in _sending(conn.io, rest, _SEND_NOW):
                        sent += n       # counted at once (see _sending)
                except BlockingIOError:
                    block.idle(fd, select.POLLOUT)
                    continue
                except InterruptedError:
                    continue
                rest = _advance(frame, sent)
        except (BrokenPipeError, ConnectionResetError):
            conn.write_closed = True
            raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer") \
                from None
        except OSError as e:
            if isinstance(e, IPCError) or e.errno is None:  # the timeout, a handler's
                self._keep_framed(conn, frame, lens, sent)
                raise
            raise _os_error("write failed", e.errno) from None      # native's text
        except BaseException:
            self._keep_framed(conn, frame, lens, sent)
            raise

    def _keep_framed(self, conn: _Conn, frame: list, lens: list, sent: int) -> None:
        """A write of ``frame`` (buffers: frames of payload sizes ``lens``)
        stopped after ``sent`` bytes: the rest of the frame in progress is
        queued ahead of anything scheduled later, reported as no event, so the
        peer never finds a later frame inside it. Frames not begun are not sent."""
        rest = _frame_rest(lens, sent)
        if rest and conn.alive:
            left = _advance(frame, sent)
            self._enqueue(conn, b"".join(bytes(b) for b in left)[:rest], None)

    def _send_queued(self, conn: _Conn) -> bool:
        """Write queued frames without waiting; True when the queue is empty.
        (A blocking write() polls for room between calls: see _write_blocking.)

        Reports MESSAGE_TX/SWITCH_TX per frame written; lets EPIPE through.
        """
        queue = conn.queue
        # Bytes a stopped call counted but did not account for (see _sending).
        self._account_sent(conn)
        while queue:
            bufs = [memoryview(queue[0][0])[conn.sent:]]
            bufs.extend(queue[i][0] for i in range(1, min(len(queue), MAX_IOV)))
            try:
                for n in _sending(conn.io, bufs, _SEND_NOW):
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

    def _account_sent(self, conn: _Conn) -> None:
        """Frames written whole (conn.sent counts the bytes written from the
        first one on) leave the queue, each reported by its event."""
        queue, pending = conn.queue, self._pending
        n = conn.sent
        while queue and n >= len(queue[0][0]):
            frame, kind = queue.popleft()
            n -= len(frame)
            conn.queued_bytes -= len(frame)
            if kind is not None:        # None: the rest of a stopped write()
                pending.append(Event(kind, conn.fd, conn.index))
        conn.sent = n

    def _flush(self, conn: _Conn) -> None:
        """Event-loop flush: a peer that is gone is read to the end, then dropped."""
        try:
            self._send_queued(conn)
        except (BrokenPipeError, ConnectionResetError):
            conn.write_closed = True
            if not conn.closing:        # a closing side's input has nowhere to go
                self._read_conn(conn)
            self._drop(conn, None)
        except OSError as e:
            self._drop(conn, f"write failed: {os.strerror(e.errno or 0)}")
        else:
            if conn.closing and not conn.queue:
                self._drop(conn, None)

    # -- receiving -----------------------------------------------------------------
    def read(self, fd: int, timeout: Optional[float] = None) -> bytes:
        # The timeout first: a bad one is refused even when a message is there.
        block = self._blocking(fd, timeout, "read")
        if self._pending:
            message = self._take_pending_message(fd)
            if message is not None:
                return message
        return self._receive(fd, 1, block)[0]

    def read_many(self, fd: int, max_messages: int = DEFAULT_READ_MANY,
                  timeout: Optional[float] = None) -> list[bytes]:
        check_max_messages(max_messages)
        block = self._blocking(fd, timeout, "read")
        taken = self._take_pending_messages(fd, max_messages)
        return taken or self._receive(fd, max_messages, block, READ_MANY_BYTES)

    def read_into(self, fd: int, buffer: object, timeout: Optional[float] = None) -> int:
        view = writable_view(buffer)
        spin = self._blocking(fd, timeout, "read")   # one busy_poll for the whole call
        size = self._take_pending_into(fd, view)
        if size is not None:
            return size
        conn = self._connection(fd)
        if len(view) >= DIRECT_READ_MIN and conn.kind == CONNECTION:
            size = self._read_frame_into(conn, view, spin)
            if size is None:
                size = self._take_pending_into(fd, view)
            if size is not None:
                return size
        self._receive(fd, 0, spin)      # every new message waits as an event...
        size = self._take_pending_into(fd, view)   # ...and the first is taken
        assert size is not None
        return size

    def _blocking(self, fd: int, timeout: Optional[float], what: str,
                  spin: bool = True) -> "_Blocking":
        """How one blocking call on fd waits: busy_poll (with ``spin``) and
        its ``timeout`` (no object made when there is neither)."""
        busy = self._busy_poll if spin else 0
        if timeout is None:
            return _Blocking(busy, None, what, fd) if busy else _NO_SPIN
        return _Blocking(busy, time.monotonic() + check_timeout(timeout), what, fd)

    def _read_frame_into(self, conn: _Conn, view: memoryview, spin: _Blocking) -> Optional[int]:
        """The next frame of conn read into ``view`` when it is large and fits
        (as native does): its size; else None, with the header bytes read
        given to the decoder. The reads wait in the kernel."""
        had = conn.decoder.buffered()
        known = min(len(had), HEADER.size)
        header = bytearray(HEADER.size)
        header[:known] = had[:known]
        sock = conn.io
        # How far the header and the payload were read: what the decoder gets
        # back if a signal handler's exception (Ctrl-C) stops the read midway,
        # so that the next read goes on from there.
        got = [known, 0]
        try:
            if not _recv_exactly(sock, header, got, 0, HEADER.size, spin):
                return self._direct_eof(conn)
            (size,) = HEADER.unpack(header)
            if size < DIRECT_READ_MIN or size > len(view) or size > self.max_message_size:
                msgs: list[bytes] = []
                try:
                    conn.decoder.feed(memoryview(header)[known:], msgs)
                except FrameTooLarge as e:
                    self._drop(conn, None)
                    raise MessageTooLargeError(str(e)) from None
                # A header alone may be an empty message: it waits as an event
                # (read_into reads fd even when it is switched: not forwarded).
                self._pending.extend(Event(_RX, conn.fd, conn.index, m) for m in msgs)
                return None
            got[1] = len(had) - HEADER.size if len(had) > HEADER.size else 0
            view[:got[1]] = had[HEADER.size:]
            conn.decoder.discard()
            if not _recv_exactly(sock, view, got, 1, size, spin):
                return self._direct_eof(conn)
            return size
        except ConnectionResetError:
            return self._direct_eof(conn)
        except OSError as e:
            if not isinstance(e, IPCError) and e.errno is not None:
                err = _os_error("read failed", e.errno)
                self._drop(conn, str(err))
                raise err from None
            # Ours (an IPCError is an OSError) or a signal handler's (no
            # errno), as raised; what was read is kept.
            if conn.alive:
                conn.decoder.restore(bytes(header[:got[0]]) + bytes(view[:got[1]]))
            raise
        except BaseException:
            if conn.alive:
                conn.decoder.restore(bytes(header[:got[0]]) + bytes(view[:got[1]]))
            raise

    def _direct_eof(self, conn: _Conn) -> int:
        """The peer closed during a direct read: as read() reports it."""
        self._drop(conn, None)
        raise ConnectionClosedError(f"connection on fd {conn.fd} is closed by the peer")

    def _receive(self, fd: int, keep: int, spin: _Blocking,
                 room: Optional[int] = None) -> list[bytes]:
        """Block until fd delivers at least one new message; return the first
        ``keep`` of those that came (and, with ``room``, no more than ``room``
        bytes together, a larger first one alone: read_many's batch, as native
        fills its buffer); the rest wait as MESSAGE_RX events."""
        conn = self._connection(fd)
        msgs, error = self._read_until_message(conn, spin)
        if not msgs:
            self._drop(conn, None)
            raise MessageTooLargeError(error)
        if room is not None:
            keep = min(keep, _fitting(msgs, room))
        # Messages beyond `keep` wait as events, like any received, before the
        # ERROR and DISCONNECTION of a bad header that followed them.
        if len(msgs) > keep:
            self._pending.extend(Event(_RX, fd, conn.index, m) for m in msgs[keep:])
            del msgs[keep:]
        if error is not None:
            self._drop(conn, error)
        return msgs

    def _read_until_message(self, conn: _Conn, spin: _Blocking) -> Tuple[list, Optional[str]]:
        """Read conn until at least one message is whole; (messages, the
        too-large text if a bad header followed them or came first). The
        reads wait in the kernel (our own sockets are in blocking mode: it
        wakes the read itself, quicker than poll() then recv(), as native),
        after busy_poll's reads that do not wait."""
        fd = conn.fd
        msgs: list[bytes] = []
        error: Optional[str] = None
        while not msgs and error is None:
            try:
                n = conn.io.recv_into(self._scratch_view, 0, spin.flags())  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                spin.idle(fd)
                continue
            except ConnectionResetError:
                n = 0
            except OSError as e:
                if e.errno is None:     # a signal handler's (a TimeoutError): as it is
                    raise
                # Like the event loop (and native): the connection ends with an
                # ERROR and a DISCONNECTION; the caller gets the same text.
                err = _os_error("read failed", e.errno)
                self._drop(conn, str(err))
                raise err from None
            if n == 0:
                self._drop(conn, None)
                raise ConnectionClosedError(f"connection on fd {fd} is closed by the peer")
            try:
                conn.decoder.feed(self._scratch_view[:n], msgs)
            except FrameTooLarge as e:
                error = str(e)
        return msgs, error

    def _read_conn(self, conn: _Conn) -> None:
        """Read conn until it would block (or the budget is spent); deliver messages."""
        msgs: list[bytes] = []
        error: Optional[str] = None
        ended = False
        view, total = self._scratch_view, 0
        while total < READ_BUDGET:
            try:
                n = conn.io.recv_into(view, 0, _DONTWAIT)  # type: ignore[attr-defined]
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except ConnectionResetError:
                n = 0
            except OSError as e:
                error, ended = f"read failed: {os.strerror(e.errno or 0)}", True
                break
            if n == 0:
                ended = True
                if conn.decoder.partial:
                    error = "peer closed the connection in the middle of a message"
                break
            total += n
            try:
                conn.decoder.feed(view[:n], msgs)
            except FrameTooLarge as e:
                error, ended = str(e), True
                break
            if n < len(view):
                break       # drained: another read now would only say EAGAIN
        self._deliver(conn, msgs)
        if ended:
            self._drop(conn, error)

    def _deliver(self, conn: _Conn, msgs: list) -> None:
        if conn.peer is None:
            fd, index, append = conn.fd, conn.index, self._pending.append
            for m in msgs:
                append(Event(_RX, fd, index, m))
            return
        for m in msgs:
            if not conn.alive:
                return
            self._forward(conn, m)

    # -- switching -------------------------------------------------------------
    def add_switch(self, fd1: int, fd2: int) -> None:
        if fd1 == fd2:
            raise IPCError(f"cannot switch fd {fd1} with itself")
        c1, c2 = self._switchable(fd1), self._switchable(fd2)
        for c in (c1, c2):
            if c.peer is not None:
                raise IPCError(f"fd {c.fd} is already switched")
        c1.peer, c2.peer = c2, c1
        for c in (c1, c2):
            # Foreign fds are read and written without waiting; our own
            # sockets stay in blocking mode (the loop passes MSG_DONTWAIT).
            if c.kind != CONNECTION:
                os.set_blocking(c.fd, False)
            self._set_interest(c)

    def _switchable(self, fd: int) -> _Conn:
        conn = self._lookup(fd)
        if conn.kind == SERVICE:
            raise UnknownFdError(f"fd {fd} is not a connection")
        return conn

    def set_switch_callbacks(self, fd: int, on_in: Optional[OnIn],
                             on_out: Optional[OnOut]) -> None:
        conn = self._switchable(fd)
        for name, cb in (("on_in", on_in), ("on_out", on_out)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable or None")
        conn.on_in, conn.on_out = on_in, on_out

    def _switch_in(self, conn: _Conn) -> None:
        if conn.on_in is None:
            self._read_conn(conn)
            return
        try:
            result, payload = conn.on_in(conn.fd)
            result = CBEvent(result)
            if result == CBEvent.NO_ERROR:
                payload = bytes(as_payload(payload))
                if len(payload) > self.max_message_size:
                    raise MessageTooLargeError(
                        too_large_text(len(payload), self.max_message_size))
        except Exception:
            log.exception("switch input callback of fd %d failed", conn.fd)
            result = CBEvent.ERROR
        self._callback_result(conn, result, payload if result == CBEvent.NO_ERROR else None)

    def _callback_result(self, conn: _Conn, result: CBEvent, payload: Optional[bytes]) -> None:
        if result == CBEvent.NO_ERROR and payload is not None:
            self._forward(conn, payload)
        elif result == CBEvent.FD_CLOSING:
            self._drop(conn, None)
        elif result == CBEvent.ERROR:
            self._drop(conn, f"switch callback failed on fd {conn.fd}")

    def _forward(self, origin: _Conn, payload: bytes) -> None:
        self._pending.append(Event(_SWITCH_RX, origin.fd, origin.index, payload))
        dest = origin.peer
        assert dest is not None and dest.alive
        if dest.on_out is None:
            self._enqueue(dest, encode(payload), _SWITCH_TX)
            self._set_interest(origin)       # pause reading if dest is over its bound
            return
        try:
            result = CBEvent(dest.on_out(dest.fd, payload))
        except Exception:
            log.exception("switch output callback of fd %d failed", dest.fd)
            result = CBEvent.ERROR
        if result == CBEvent.NO_ERROR:
            self._pending.append(Event(_SWITCH_TX, dest.fd, dest.index))
        else:
            self._callback_result(dest, result, None)

    # -- the event loop ----------------------------------------------------------
    def _wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"\1")
        except BlockingIOError:
            pass                                # full: a wake-up is already pending

    def _fetch(self, timeout: Optional[float]) -> None:
        if not self._by_fd and self._timer is None:
            raise IPCError("nothing to wait for: no fd and no timer")
        if self._ended:
            self._release_ended()
        now = time.monotonic()
        deadline = None if self._timer is None else now + self._timer / 1000
        # The call's timeout: a failure, where the timer is an event.
        expiry = None if timeout is None else now + timeout
        until = deadline if expiry is None else expiry if deadline is None else min(deadline, expiry)
        pending = self._pending
        if self._busy_poll and self._spin(until):
            return
        while True:
            if until is None:
                self._round(None)
            else:
                self._round(max(0.0, until - time.monotonic()))
            if pending:
                return
            if deadline is not None and time.monotonic() >= deadline:
                pending.append(Event(EventType.TIMER))
                return
            if expiry is not None and time.monotonic() >= expiry:
                raise TimeoutError("wait timed out")

    def _spin(self, deadline: Optional[float]) -> bool:
        """busy_poll: rounds that do not sleep, for busy_poll us at most (less
        when the timer's deadline comes first); True when one brought an event.
        Why: see busy_poll in the README (a sleeping loop's wake-up costs more)."""
        end = time.monotonic() + self._busy_poll / 1e6
        if deadline is not None:
            end = min(end, deadline)
        pending, monotonic = self._pending, time.monotonic
        while True:
            self._round(0)
            if pending:
                return True
            _yield_cpu()                    # to a process on this CPU (as native)
            if monotonic() >= end:
                return False

    def _round(self, timeout: Optional[float], wait: bool = False) -> None:
        """Flush every queue without blocking, wait up to ``timeout`` seconds
        (None: forever; not at all when the flush brought events, unless
        ``wait``: the linger) for readiness, then handle every ready fd."""
        self._flush_dirty()
        if self._pending and not wait:
            timeout = 0
        for conn, mask in self._poller.select(timeout):
            if conn is _WAKE:
                _drain(self._wake_r)
                self._guard.apply(self)     # messages other threads scheduled
                continue
            self._handle(conn, mask)

    def _flush_dirty(self) -> None:
        """Send what is queued, without blocking (a round's first step)."""
        if self._dirty:
            for conn in list(self._dirty):
                if conn.alive:
                    self._flush(conn)

    def _handle(self, conn: _Conn, mask: int) -> None:
        if not conn.alive:
            return
        if conn.closing:
            self._flush(conn)               # only written now
            return
        if conn.kind == SERVICE:
            self._accept(conn)
        elif conn.peer is not None:
            if mask & _READ:
                self._switch_in(conn)
            if conn.alive and mask & _WRITE:
                self._flush(conn)
        elif conn.kind == EXTERNAL:
            self._pending.append(Event(EventType.EXTERNAL, conn.fd, conn.index))
        else:
            if mask & _READ:
                self._read_conn(conn)
            if conn.alive and mask & _WRITE:
                self._flush(conn)

    def _refuse_with_spare(self, service: _Conn) -> Optional[bool]:
        """Out of fds with a client waiting: accept() would fail at once every
        round (level-triggered readiness), a busy loop. Free the spare fd, accept
        the client with it and close it (it sees EOF), then take the spare again.
        True: a client was refused; False: none was waiting; None: no spare."""
        if not self._spare_fd.close():
            return None
        try:
            sock, _ = service.io.accept()  # type: ignore[attr-defined]
            sock.close()
            taken = True
        except OSError:
            taken = False
        self._spare_fd.open()
        return taken

    def _accept(self, service: _Conn) -> None:
        while True:
            try:
                sock, _ = service.io.accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Out of fds: a waiting client is refused, so the round does not
                # spin on it; with no client waiting there is nothing to say.
                refused = self._refuse_with_spare(service) \
                    if e.errno in (errno.EMFILE, errno.ENFILE) else None
                if refused is False:
                    return
                self._pending.append(Event(EventType.ERROR, service.fd, service.index, None,
                                           f"accept failed: {os.strerror(e.errno or 0)}"))
                if refused:
                    continue
                return
            if len(self._by_fd) >= self.max_connections:
                sock.close()
                self._pending.append(Event(
                    EventType.ERROR, service.fd, service.index, None,
                    f"connection refused: max_connections ({self.max_connections}) reached"))
                continue
            sock.setblocking(True)        # blocking mode, whatever the listener's (see _DONTWAIT)
            conn = self._add(_Conn(sock.fileno(), sock, CONNECTION, self.max_message_size))
            self._pending.append(Event(EventType.CONNECTION, conn.fd, conn.index))


def _context_fds() -> "tuple[_poller.EpollPoller | _poller.SelectorPoller, int, int]":
    """A new context's poller and wake-up pipe (read end, write end). Out of
    fds: native's IPCError "cannot create context: ..." with errno, and
    nothing left open; out of memory: MemoryError, as native."""
    poller = None
    try:
        poller = _poller.new_poller()
        r, w = os.pipe()
    except OSError as e:
        if poller is not None:
            poller.close()
        if e.errno == errno.ENOMEM:
            raise MemoryError("cannot create context: out of memory") from None
        raise _os_error("cannot create context", e.errno) from None
    return poller, r, w


def _os_error(what: str, errno_: Optional[int]) -> IPCError:
    """IPCError 'WHAT: STRERROR' (the native text, without OSError's '[Errno N]'),
    with .errno set."""
    err = IPCError(f"{what}: {os.strerror(errno_ or 0)}")
    err.errno = errno_
    return err


def _connected_unix_stream(fd: int) -> Optional[socket.socket]:
    """A socket object owning fd when fd is a connected Unix stream socket
    (what ipcd must hand over); else None, with fd closed."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:             # not a socket at all (a pipe, /dev/null)
        os.close(fd)
        return None
    try:
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            sock.getpeername()  # ENOTCONN when it is not connected
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _writev_quiet(fd: int, buffers: list) -> int:
    """os.writev without SIGPIPE (a pipe has no MSG_NOSIGNAL), as native does:
    unless SIGPIPE is ignored, it is blocked for the call and the one a write
    to a closed pipe raised is taken off the pending set; the caller only sees
    BrokenPipeError."""
    if signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN:
        return os.writev(fd, buffers)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    try:
        was_pending = signal.SIGPIPE in signal.sigpending()
        try:
            return os.writev(fd, buffers)
        except BrokenPipeError:
            if not was_pending and signal.SIGPIPE in signal.sigpending():
                signal.sigwait({signal.SIGPIPE})
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _SpareFd:
    """One fd on /dev/null, held so that it can be freed when fds run out."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = -1

    def open(self) -> None:
        if self.fd < 0:
            try:
                self.fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = -1

    def close(self) -> bool:
        """Free the fd; False when there was none."""
        if self.fd < 0:
            return False
        os.close(self.fd)
        self.fd = -1
        return True


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _release(pid: int, by_fd: dict, ended: dict, r: int, w: int,
             poller: "_poller.EpollPoller | _poller.SelectorPoller", spare: "_SpareFd") -> None:
    """Finalizer of a collected context: close every fd it holds (its
    connections, services, their lock files, the wake-up pipe, the poller,
    the spare fd). Its services' sockets are removed only in the process that
    made it: a forked child that drops its copy closes its own fds and
    nothing else (the parent's lock stays, held by the parent's fd)."""
    owner = os.getpid() == pid
    for conn in list(by_fd.values()):
        if conn.path is not None and owner:
            with contextlib.suppress(OSError):
                _rundir.remove_stale_socket(conn.path)
        if conn.lock_fd >= 0:
            os.close(conn.lock_fd)
        with contextlib.suppress(OSError):  # an external fd its owner closed already
            conn.io.close()
    by_fd.clear()
    for io in ended.values():
        io.close()
    ended.clear()
    poller.close()
    os.close(r)
    os.close(w)
    spare.close()


def _check_fd_type(fd: object) -> None:
    """The native backend's rule: a fd is an int, not a bool (TypeError otherwise)."""
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"fd must be int, not {type(fd).__name__}")


def _frame_rest(lens: list, written: int) -> int:
    """Bytes left of the frame in progress once ``written`` bytes of frames of
    payload sizes ``lens`` went out (0 on a frame boundary): the core's progress()."""
    start = 0
    for size in lens:
        end = start + HEADER.size + size
        if written < end:
            return end - written if written > start else 0
        start = end
    return 0


def _advance(buffers: list, n: int) -> list:
    """The part of ``buffers`` left after ``n`` bytes were written."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers = buffers[1:]
    if buffers and n:
        buffers = [memoryview(buffers[0])[n:]] + buffers[1:]
    return buffers


def _fitting(msgs: list, room: int) -> int:
    """How many of ``msgs`` fit in ``room`` bytes together (at least one)."""
    count = 0
    for m in msgs:
        room -= len(m)
        if room < 0 and count:
            break
        count += 1
    return count


def _recv_exactly(sock: object, buf: object, filled: list, at: int, end: int,
                  spin: _Blocking) -> bool:
    """Fill buf from filled[at] to ``end`` from a blocking socket, keeping
    filled[at] up to date (so an interruption knows how far it got); False
    at EOF. The reads wait as ``spin`` says (busy_poll)."""
    view = memoryview(buf)  # type: ignore[arg-type]
    while filled[at] < end:
        try:
            n = sock.recv_into(view[filled[at]:end], 0, spin.flags())  # type: ignore[attr-defined]
        except BlockingIOError:
            spin.idle(sock.fileno())  # type: ignore[attr-defined]
            continue
        except InterruptedError:
            continue
        if n == 0:
            return False
        filled[at] += n
    return True


class _Blocking:
    """How one blocking call waits (the core's blocking.zig): transfers that
    do not wait until ``end`` (busy_poll; monotonic, 0.0: none), then
    transfers that wait in the kernel, or, with a ``deadline`` (the call's
    timeout), poll() up to it: then TimeoutError("<what> timed out"). One
    per call, so that the call spins busy_poll us at most. Signals need
    nothing here: Python's own calls run the handler and go on (PEP 475)."""

    __slots__ = ("end", "deadline", "what", "fd")

    def __init__(self, busy_poll_us: int, deadline: Optional[float] = None,
                 what: str = "", fd: int = -1) -> None:
        self.end = time.monotonic() + busy_poll_us / 1e6 if busy_poll_us else 0.0
        if deadline is not None and self.end:
            self.end = min(self.end, deadline)
        self.deadline = deadline
        self.what = what
        self.fd = fd

    def flags(self) -> int:
        """recv/send flags (MSG_DONTWAIT or none) of the next transfer."""
        return _DONTWAIT if self.end or self.deadline is not None else 0

    def idle(self, fd: int, events: int = select.POLLIN) -> None:
        """Nothing moved: go on spinning while there is time, else wait."""
        if self.end:
            _yield_cpu()
            if time.monotonic() >= self.end:
                self.end = 0.0
            return
        if self.deadline is None:
            _wait_fd(fd, events)
            return
        left = self.deadline - time.monotonic()
        if left <= 0 or not _wait_fd(fd, events, left):
            raise TimeoutError(f"{self.what} on fd {self.fd} timed out"
                               if self.fd >= 0 else f"{self.what} timed out")


#: The _Blocking of every call without busy_poll or timeout (never changed:
#: its end is 0.0 and it has no deadline, so idle() only waits).
_NO_SPIN = _Blocking(0)


def _yield_cpu() -> None:
    """busy_poll, between two polls that found nothing: give the CPU to a
    process waiting for this one (often the peer); without it, a spin on a
    shared CPU kept the peer off it for the whole busy_poll."""
    os.sched_yield()


def _wait_fd(fd: int, events: int, timeout: Optional[float] = None) -> bool:
    """Wait until fd has ``events`` (at most ``timeout`` seconds); whether it has."""
    poller = select.poll()
    poller.register(fd, events)
    if timeout is None:
        return bool(poller.poll())
    end = time.monotonic() + timeout
    while True:
        # poll() takes at most _poller.MAX_WAIT_MS (an int): a longer wait is several.
        if poller.poll(min(math.ceil(timeout * 1000), _poller.MAX_WAIT_MS)):
            return True
        timeout = end - time.monotonic()
        if timeout <= 0:
            return False
