"""The pure backend's readiness poller (the core's poller*.zig).

On Linux it is `select.epoll` used directly: `selectors`' EpollSelector
makes a SelectorKey per fd and wraps every wait in more Python, about 0.7 µs
per wait on the development VM (1.46 against 0.77 µs for one ready fd), paid
on every round trip. Elsewhere (kqueue on the BSDs and macOS, poll) it is
`selectors.DefaultSelector` behind the same four methods. Both report what
`selectors` reports: READ and WRITE, masked to the interest registered, with
a hang-up or error counted as both.
"""

from __future__ import annotations

import math
import select
import selectors
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

if TYPE_CHECKING:
    from .conn_table import Conn

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE

#: What epoll is asked for, per mask of READ and WRITE.
_EPOLL_MASK = (0, select.EPOLLIN, select.EPOLLOUT, select.EPOLLIN | select.EPOLLOUT) \
    if hasattr(select, "epoll") else ()


#: What a watched fd's data is (select() hands it back): its connection, or
#: None for the context's wake-up pipe.
Data = Optional["Conn"]

#: The longest wait of one poll()/epoll_wait() (a C int of milliseconds, 24.8
#: days): a longer timeout waits in several (the callers wait again).
MAX_WAIT_MS = 2 ** 31 - 1


def _epoll_timeout(timeout: Optional[float]) -> float:
    """selectors' rule: None waits for ever (-1), a timeout is rounded up to a
    whole millisecond (epoll's resolution), so a wait is never cut short."""
    if timeout is None:
        return -1
    if timeout <= 0:
        return 0
    return min(math.ceil(timeout * 1e3), MAX_WAIT_MS) * 1e-3


class EpollPoller:
    """select.epoll with the data and interest of each fd kept in one dict."""

    __slots__ = ("_epoll", "_keys")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._keys: dict[int, Tuple[Data, int]] = {}

    def register(self, fd: int, mask: int, data: Data) -> None:
        """Watch `fd` for `mask` (READ, WRITE or both); `data` comes back."""
        self._epoll.register(fd, _EPOLL_MASK[mask])    # fails before anything is kept
        self._keys[fd] = (data, mask)

    def modify(self, fd: int, mask: int, data: Data) -> None:
        """Change what `fd` is watched for."""
        self._epoll.modify(fd, _EPOLL_MASK[mask])
        self._keys[fd] = (data, mask)

    def unregister(self, fd: int) -> None:
        """Stop watching `fd` (it may be closed already)."""
        del self._keys[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:         # closed meanwhile: the kernel dropped it already
            pass

    def select(self, timeout: Optional[float]) -> List[Tuple[Data, int]]:
        """(data, mask) of every ready fd, waiting at most `timeout` seconds."""
        keys = self._keys
        ready: List[Tuple[Data, int]] = []
        try:
            events = self._epoll.poll(_epoll_timeout(timeout), max(len(keys), 1))
        except InterruptedError:
            return ready
        for fd, event in events:
            key = keys.get(fd)
            if key is not None:
                mask = (WRITE if event & ~select.EPOLLIN else 0) | \
                       (READ if event & ~select.EPOLLOUT else 0)
                ready.append((key[0], mask & key[1]))
        return ready

    def close(self) -> None:
        """Close the epoll fd."""
        self._epoll.close()

    def fileno(self) -> Optional[int]:
        """The epoll fd (ctx.fileno() nests it: see readiness.py)."""
        return self._epoll.fileno()


class SelectorPoller:
    """selectors.DefaultSelector (kqueue, poll) behind EpollPoller's methods."""

    __slots__ = ("_selector",)

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()

    def register(self, fd: int, mask: int, data: Data) -> None:
        """Watch `fd` for `mask` (READ, WRITE or both); `data` comes back."""
        self._selector.register(fd, mask, data)

    def modify(self, fd: int, mask: int, data: Data) -> None:
        """Change what `fd` is watched for."""
        self._selector.modify(fd, mask, data)

    def unregister(self, fd: int) -> None:
        """Stop watching `fd`."""
        self._selector.unregister(fd)

    def select(self, timeout: Optional[float]) -> List[Tuple[Data, int]]:
        """(data, mask) of every ready fd, waiting at most `timeout` seconds."""
        if timeout is not None:
            timeout = min(timeout, MAX_WAIT_MS / 1e3)
        return [(key.data, mask) for key, mask in self._selector.select(timeout)]

    def close(self) -> None:
        """Close the selector."""
        self._selector.close()

    def fileno(self) -> Optional[int]:
        """The selector's fd (kqueue), or None (poll(2) has none)."""
        fileno = getattr(self._selector, "fileno", None)
        return None if fileno is None else int(fileno())


#: Either poller (they have the same methods).
Poller = Union[EpollPoller, SelectorPoller]


def new_poller() -> Poller:
    """The quickest poller this platform has."""
    return EpollPoller() if hasattr(select, "epoll") else SelectorPoller()
