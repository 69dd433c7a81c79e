"""How many messages one WebSocket has queued toward its service.

The core's queue bound (max_queue_size) counts frame bytes: an empty message
is charged 4 bytes, but each queued message costs ~44 bytes (native) to ~100
bytes (pure) more in memory, so a client flooding tiny messages to a service
that does not read would make websocketd hold 11 to 25 times its bound.
websocketd therefore charges every message at least MESSAGE_CHARGE bytes: at
most `queue bound // MESSAGE_CHARGE` messages are queued toward a service;
past that, the WebSocket is no longer read until the service takes some
(docs/websocket.md, Bounds). The core's bound is unchanged.

The core reports nothing when a switched message is written (switch_events
is off), so every `mark_every`-th message goes through ctx.schedule instead:
its MESSAGE_TX says that it, and everything queued before it, was written.

Marks are also due by bytes: what follows the last mark unconfirmed (no
MESSAGE_TX will ever report it) stays within `queue bound - (max message +
4)`. So once every mark is written, the service's queue holds at most that,
and the next message, whatever its size, can always be scheduled as a mark:
messages held in the session never wait with no MESSAGE_TX to come (they
did: a run that took the queue over its bound before a mark was due left the
rest held for good).
"""

from __future__ import annotations

import collections
from typing import Deque

#: Bytes each message toward a service counts as at least (what a queued
#: message costs in memory, rounded up: see the module's docstring).
MESSAGE_CHARGE = 128


class Credit:
    """The messages queued toward one service, counted at marks."""

    __slots__ = ("limit", "mark_every", "in_flight", "unmarked_room", "_since_mark",
                 "_bytes_since_mark", "_marks")

    def __init__(self, queue_bound: int, message_bound: int) -> None:
        #: Messages toward the service at most before the client is paused.
        self.limit = max(1, queue_bound // MESSAGE_CHARGE)
        #: A mark every that many messages (a quarter of the limit).
        self.mark_every = max(1, self.limit // 4)
        #: Messages queued and not yet known to be written.
        self.in_flight = 0
        #: Bytes (framed) that may follow the last mark: room is left for one
        #: more message of any size (message_bound) as a mark.
        self.unmarked_room = max(0, queue_bound - (message_bound + 4))
        self._since_mark = 0                   # forwarded since the last mark
        self._bytes_since_mark = 0             # ... their framed bytes
        self._marks: Deque[int] = collections.deque()   # messages each mark confirms

    def mark_due(self, size: int) -> bool:
        """Whether the next message (`size` bytes) should be a mark (scheduled)."""
        return self._since_mark + 1 >= self.mark_every or self.in_flight >= self.limit \
            or self.unmarked_left() < 4 + size

    def forwarded(self, size: int) -> None:
        """One message of `size` bytes was handed to the core unmarked."""
        self.in_flight += 1
        self._since_mark += 1
        self._bytes_since_mark += 4 + size

    def scheduled(self) -> None:
        """One message was scheduled: a mark."""
        self._marks.append(self._since_mark + 1)
        self._since_mark = self._bytes_since_mark = 0
        self.in_flight += 1

    def marks_pending(self) -> bool:
        """Whether a mark's MESSAGE_TX is still to come."""
        return bool(self._marks)

    def unmarked_left(self) -> int:
        """Framed bytes that may still be forwarded before a mark is due."""
        return self.unmarked_room - self._bytes_since_mark

    def written(self) -> None:
        """The oldest mark was written (its MESSAGE_TX), and all before it."""
        if self._marks:
            self.in_flight -= self._marks.popleft()

    def before_mark(self) -> int:
        """Messages that may be forwarded (not scheduled) before a mark is due."""
        return max(0, min(self.mark_every - 1 - self._since_mark,
                          self.limit - 1 - self.in_flight))

    def may_resume(self) -> bool:
        """Whether a paused client may be read again: half the limit or less
        in flight (resumed as soon as it was under the limit, a client paused
        and resumed once a message, each message then a mark of its own)."""
        return self.in_flight <= self.limit // 2 or not self._marks

    def over(self) -> bool:
        """At the limit with a mark to wait for (without one, nothing would
        say the queue drained: the core's byte bound holds the client then,
        as a mark is refused only by a queue near it)."""
        return self.in_flight >= self.limit and bool(self._marks)
