"""The events a context holds in Python before it returns them.

For the pure backend this is the context's one queue of pending events (the
twin of the core's events.zig): the event loop appends to it, wait_event and
wait_events take from its front, and the reads take their fd's messages out
of it first, in order. The native backend's queue is the core's; it keeps
events here only when a signal's handler raised while the core was handing
a batch over (see NativeContext._keep_handed), so none is lost.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from ._checks import buffer_too_small_text, closed_by_peer, is_too_large_text
from ._types import READ_MANY_BYTES, Event, EventType, MessageTooLargeError

_RX = EventType.MESSAGE_RX


class EventQueue(deque[Event]):
    """A deque of Event, and how a read takes its fd's messages out of it."""

    __slots__ = ()

    def _first_message(self, fd: int) -> Optional[int]:
        """Where fd's first MESSAGE_RX waits, if one does.

        Raises ConnectionClosedError when fd's DISCONNECTION comes first.
        """
        for i, ev in enumerate(self):
            if ev.fd != fd:
                continue
            if ev.type == _RX:
                return i
            raise_if_ended(ev)
        return None

    def take_message(self, fd: int) -> Optional[bytes]:
        """read()'s first source: fd's first MESSAGE_RX, removed; None if none."""
        i = self._first_message(fd)
        if i is None:
            return None
        message = self[i].message
        del self[i]
        return message

    def take_into(self, fd: int, view: memoryview) -> Optional[int]:
        """read_into()'s first source: fd's first MESSAGE_RX copied into
        `view`; its size, or None when there is none. A message that does
        not fit stays (MessageTooLargeError)."""
        i = self._first_message(fd)
        if i is None:
            return None
        # A MESSAGE_RX always has its message (Event.message is None for others).
        message: bytes = self[i].message  # type: ignore[assignment]
        size = len(message)
        if size > len(view):
            raise MessageTooLargeError(buffer_too_small_text(len(view), size))
        view[:size] = message
        del self[i]
        return size

    def take_messages(self, fd: int, max_messages: int) -> list[bytes]:
        """read_many()'s first source: fd's MESSAGE_RX events (at most
        max_messages and READ_MANY_BYTES together, a larger first one alone;
        up to fd's DISCONNECTION), removed.

        Raises ConnectionClosedError when fd's DISCONNECTION comes first.
        """
        taken: list[bytes] = []
        keep: list[Event] = []
        done = False
        room = READ_MANY_BYTES
        for ev in self:
            if not done and ev.fd == fd:
                if ev.type == _RX:
                    # A MESSAGE_RX always has its message.
                    message: bytes = ev.message  # type: ignore[assignment]
                    size = len(message)
                    if taken and size > room:
                        done = True          # the batch is full: this one waits
                        keep.append(ev)
                        continue
                    taken.append(message)
                    room -= size
                    done = len(taken) == max_messages
                    continue
                if ev.type in (EventType.ERROR, EventType.DISCONNECTION):
                    if not taken:
                        raise_if_ended(ev)
                    done = ev.type == EventType.DISCONNECTION
            keep.append(ev)
        if taken:
            self.clear()
            self.extend(keep)
        return taken

    def drop(self, fd: int) -> None:
        """Forget the events of fd that were not returned yet (after close)."""
        if any(ev.fd == fd for ev in self):
            keep = [ev for ev in self if ev.fd != fd]
            self.clear()
            self.extend(keep)


def raise_if_ended(ev: Event) -> None:
    """A read meeting `ev`, an event of its fd that comes before any message
    of it: the ERROR of a frame over max_message_size raises
    MessageTooLargeError (that header came after messages in one read: they
    were returned first), the DISCONNECTION ConnectionClosedError."""
    if ev.type == EventType.ERROR and ev.error is not None and is_too_large_text(ev.error):
        raise MessageTooLargeError(ev.error)
    if ev.type == EventType.DISCONNECTION:
        raise closed_by_peer(ev.fd)
