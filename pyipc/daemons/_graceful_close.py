"""A relay's TCP socket closed without losing its last bytes.

When a switch ends because the local service closed, the core writes what
is queued for the TCP side, then closes it. A socket closed while its peer
is still sending has unread input, and Linux then answers with a reset
instead of a FIN; the reset makes the peer's kernel drop what we wrote that
its program had not read yet: a remote client lost the service's last
messages (38 of 40 came) while it was still writing.

So the daemons (tcpd, tlsd) close such a socket the way web servers do
(a "lingering close"): on its DISCONNECTION, while the core still keeps its
number open, a dup keeps the socket open; our sending side is ended (a FIN
after everything written), and what the peer still sends is read and
dropped until it closes its side too, LINGER_CLOSE_TIMEOUT at most.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Dict

from .. import Context, IPCError
from ._sockets import drop_input
from ._timers import TimerHandle

log = logging.getLogger("pyipc.daemons")

#: Seconds a relay's TCP socket stays open after its end for the peer to
#: close its side (what it sends meanwhile is dropped); then it is closed.
LINGER_CLOSE_TIMEOUT = 5.0
#: Reads of a lingering socket per wake-up at most (64 KiB each), so that a
#: peer that keeps sending cannot hold the loop.
LINGER_READS = 16


class GracefulCloser:
    """The lingering sockets of one daemon: dups it watches, by fd."""

    def __init__(self, ctx: Context, call_later: Callable[[float, Callable[[], None]],
                                                          TimerHandle],
                 cancel: Callable[[TimerHandle], None]) -> None:
        self._ctx = ctx
        self._call_later = call_later
        self._cancel = cancel
        self._lingering: Dict[int, TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._lingering)

    def owns(self, fd: int) -> bool:
        """Whether fd is one of the lingering dups."""
        return fd in self._lingering

    def close(self, fd: int) -> None:
        """fd, a TCP socket the context has just reported ended (its number
        still open until the next wait), is closed gracefully (see the
        module's docstring). Out of fds, it is left to the core's close."""
        try:
            dup = os.dup(fd)
        except OSError as e:
            log.debug("fd %d: no lingering close: %s", fd, e.strerror)
            return
        sock = socket.socket(fileno=dup)
        try:
            sock.setblocking(False)             # read only what is there
            sock.shutdown(socket.SHUT_WR)       # a FIN after what was written
            self._ctx.add_external(dup)
        except (OSError, IPCError):             # already reset, or no room
            sock.close()
            return
        sock.detach()                           # the context owns dup now
        self._lingering[dup] = self._call_later(LINGER_CLOSE_TIMEOUT,
                                                lambda: self._end(dup))

    def readable(self, fd: int) -> None:
        """The peer sent more, or closed: dropped; at its end, closed."""
        if drop_input(fd, LINGER_READS):
            self._end(fd)

    def _end(self, fd: int) -> None:
        timer = self._lingering.pop(fd, None)
        if timer is None:
            return
        self._cancel(timer)
        self._ctx.close(fd)
