"""A pipe that Python's C-level signal handler writes to, for a loop that
waits in a context on the main thread.

Why: Python runs a signal's handler between two bytecodes; a signal that
arrives after the last check but before the wait enters the kernel
(epoll_wait) does not interrupt that wait, so its handler would run only at the
next event, maybe never (a SIGTERM lost about 1 stop in 5 on the native
backend, 1 in 100 on pure). With `signal.set_wakeup_fd` pointing at a pipe the
context watches (add_external), the wait returns at once with an EXTERNAL event
and the handler runs. docs/reference.md, "Signals, timeouts and fork".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

log = logging.getLogger("pyipc")


class SignalWakeup:
    """The pipe: `fd` (read end) is for the context to watch; install() makes
    it Python's signal wake-up fd, uninstall() gives the previous one back."""

    __slots__ = ("fd", "_write_fd", "_previous")

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._previous: Optional[int] = None

    def install(self) -> bool:
        """Become the wake-up fd (main thread only, Python's rule: elsewhere
        nothing changes and the result is False)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        self._previous = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        return True

    def uninstall(self) -> None:
        """Give the previous wake-up fd back (if install() took its place)."""
        if self._previous is not None:
            signal.set_wakeup_fd(self._previous)
            self._previous = None

    def drain(self) -> None:
        """Empty the pipe (after its EXTERNAL event: the handler has run)."""
        drain_pipe(self.fd)

    def close(self, read_end_too: bool) -> None:
        """uninstall(), close the write end, and the read end unless the
        context that watches it closes it (close_all). Off the main thread
        Python cannot give the previous wake-up fd back: the write end is
        then left open on /dev/null, since a closed one would be reused and
        a signal would write its byte into whatever file took the number."""
        if self._previous is not None and \
                threading.current_thread() is not threading.main_thread():
            log.warning("signal wake-up fd closed off the main thread: fd %d "
                        "stays open on /dev/null", self._write_fd)
            _point_at_null(self._write_fd)
        else:
            self.uninstall()
            os.close(self._write_fd)
        if read_end_too:
            os.close(self.fd)


def _point_at_null(fd: int) -> None:
    """Make fd an fd open on /dev/null (writes vanish; it stays valid)."""
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def drain_pipe(fd: int) -> None:
    """Read a non-blocking pipe until it is empty (a wake-up pipe: the bytes
    say only that something happened)."""
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
