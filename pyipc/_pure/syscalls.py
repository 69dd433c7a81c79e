"""System calls of the pure backend that need care (the core's sys.zig):
sends a signal's handler cannot lose count of, writes to pipes without
SIGPIPE, non-socket fds, the spare fd for running out of fds, native's
error texts for OS errors.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Optional

from .._checks import Bytes

from .._types import IPCError

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
#: Our own sockets are in blocking mode (the blocking calls wait in the kernel,
#: no fcntl per call); the event loop's transfers pass MSG_DONTWAIT, as native's.
DONTWAIT = socket.MSG_DONTWAIT
SEND_NOW = _SEND_FLAGS | DONTWAIT


class RawFd:
    """A non-socket fd (a pipe, a tty) with the few socket methods we use.

    It stands in for a socket.socket as Conn.io (an external fd that is not
    a socket): only these methods are called on such a Conn's io."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def recv_into(self, buf: memoryview, *_: object) -> int:
        return os.readv(self._fd, [buf])     # non-blocking mode: never waits

    def sendmsg(self, buffers: list[Bytes], *_: object) -> int:
        return _writev_quiet(self._fd, buffers)

    def send(self, buffer: bytes | memoryview, *_: object) -> int:
        return _writev_quiet(self._fd, [buffer])

    def close(self) -> None:
        os.close(self._fd)


def sending(io: socket.socket, buffers: list[Bytes], flags: int) -> map[int]:
    """One write of `buffers`, made when the result is iterated: it yields
    the bytes written. Iterate it with `for n in sending(...): x += n`:
    CPython runs signal handlers at calls and backward jumps, not inside a
    for loop's step, so a handler's exception cannot come between the bytes
    leaving and their being counted (a plain `n = io.send(...)` loses n to
    an exception raised as the call returns: the bytes would be sent again,
    or a frame left half-sent). One buffer goes through send(): no list for
    sendmsg to parse, and the kernel's single-buffer path (a 68-byte frame:
    0.3-0.7 us cheaper than sendmsg, measured)."""
    if len(buffers) == 1:
        return map(io.send, buffers, (flags,))
    return map(io.sendmsg, (buffers,), ((),), (flags,))


def _writev_quiet(fd: int, buffers: list[Bytes]) -> int:
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


class SpareFd:
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


def drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def os_error(what: str, errno_: Optional[int]) -> IPCError:
    """IPCError 'WHAT: STRERROR' (the native text, without OSError's '[Errno N]'),
    with .errno set."""
    err = IPCError(f"{what}: {os.strerror(errno_ or 0)}")
    err.errno = errno_
    return err
