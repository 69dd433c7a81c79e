"""The service's side of a WebSocket session: its socket read by websocketd
itself with pyipc's own frame decoder (the pure backend's), not by the core.

Why not the core: when a switched fd ends, the core closes its peer at once,
and a WebSocket must first get a close frame with a code that says why. Read
here, the end of the service is seen by the session, which queues the close
frame (1000 when the service closed the connection between two messages,
1011 when its stream broke) before it ends the switch. What goes *to* the
service is framed and queued by the core as usual.
"""

from __future__ import annotations

import collections
import os
import socket
from typing import Deque, List, Optional, Tuple

from websockets.frames import CloseCode

from ..._pure.framing import FrameDecoder, FrameTooLarge
from .handshake import READ_SIZE


class ServiceReader:
    """Whole messages from the service's socket, and how it ended."""

    __slots__ = ("_sock", "_decoder", "messages", "end")

    def __init__(self, service_fd: int, max_message_size: int) -> None:
        # Read without waiting (MSG_DONTWAIT): the core keeps its own
        # connections in blocking mode. A dup, so that no Python object ever
        # closes the core's fd; closed by close().
        self._sock = socket.socket(fileno=os.dup(service_fd))
        self._decoder = FrameDecoder(max_message_size)
        self.messages: Deque[bytes] = collections.deque()   # whole, not yet forwarded
        self.end: Optional[Tuple[int, str]] = None            # close code and reason

    def read(self) -> None:
        """Read once: whole messages go to `messages`; the end to `end`."""
        try:
            data = self._sock.recv(READ_SIZE, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            # A service that closed with our bytes unread: the kernel says
            # ECONNRESET instead of EOF once what it sent is read (as the
            # core's reads take it): its end, as any other.
            data = b""
        except OSError as e:
            self.end = (CloseCode.INTERNAL_ERROR, f"service connection failed: {e.strerror}")
            return
        if not data:
            self.end = ((CloseCode.INTERNAL_ERROR, "the service ended in the middle of a message")
                        if self._decoder.partial else
                        (CloseCode.NORMAL_CLOSURE, "the service closed the connection"))
            return
        out: List[bytes] = []
        try:
            self._decoder.feed(memoryview(data), out)
        except FrameTooLarge as e:
            self.end = (CloseCode.INTERNAL_ERROR, f"the service sent a message over "
                        f"max_message_size ({e.size} > {e.limit} bytes)")
        self.messages.extend(out)

    def close(self) -> None:
        """Close the dup (the core closes the service's fd itself)."""
        self._sock.close()
