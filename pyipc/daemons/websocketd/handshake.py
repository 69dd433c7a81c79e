"""One accepted TCP connection until it is a WebSocket, or is answered and
closed: the TLS handshake (wss://), then the HTTP request, parsed by the
`websockets` package's sans-I/O ServerProtocol.

The bytes are read by the daemon's loop (the socket is an external fd of the
context) and fed here; nothing here blocks. The same ServerProtocol object
goes on as the WebSocket's protocol once the request is accepted. Bytes the
client sent after its request (frames of a client that did not wait for the
101) are held back in `rest`, not fed to the protocol before the 101: parsed
while it is still CONNECTING, a close frame or a broken frame would not be
acted on (no answer, the connection left hanging). The session feeds them
once the WebSocket is open: nothing that arrives with or split across the
handshake is lost.
"""

from __future__ import annotations

import logging
import os
import time
from http import HTTPStatus
from typing import Optional, Union

from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from .._netwire import send_now
from . import responses
from .transport import Plain, Tls, TransportClosed

#: Bytes read from a socket at once.
READ_SIZE = 1 << 18
#: The end of an HTTP request's head (websocketd's requests have no body).
_HEAD_END = b"\r\n\r\n"
#: Bytes a request's head may have, its end included: what one unfinished
#: handshake can make websocketd hold (the websockets package alone allows
#: 128 header lines of 8 KiB: over 1 MiB). Past it: 431.
MAX_REQUEST_HEAD = 64 * 1024

#: websockets logs each connection at INFO under this name (below ours).
PROTOCOL_LOG = logging.getLogger("pyipc.daemons.websocketd.protocol")
# Its lines repeat ours; set the level to INFO or DEBUG to see them.
PROTOCOL_LOG.setLevel(logging.WARNING)


class HandshakeFailed(Exception):
    """The connection ended or broke before its request was complete."""


class Handshake:
    """An accepted connection in its handshake."""

    __slots__ = ("fd", "peer", "transport", "protocol", "started", "timer", "rest", "_tail",
                 "_head_done", "_head_size")

    def __init__(self, fd: int, peer: str, transport: Union[Plain, Tls],
                 max_message_size: int) -> None:
        self.fd = fd
        self.peer = peer
        self.transport = transport
        self.protocol = ServerProtocol(max_size=max_message_size, logger=PROTOCOL_LOG)
        self.started = time.monotonic()
        self.timer: object = None   # the daemon's handshake timeout, if any
        # Bytes after the request's head (see the module doc): for the session.
        self.rest = b""
        self._tail = b""            # the last bytes fed, to find a head end split across reads
        self._head_done = False
        self._head_size = 0         # bytes of the head fed so far

    def step(self) -> Optional[Request]:
        """The socket is readable: read it and return the request once it is
        complete (None: not yet). Raises HandshakeFailed when the client
        closed or broke the connection, or sent something that is not an
        HTTP request (after its 400 response is sent)."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise HandshakeFailed(f"read failed: {e.strerror}") from None
        try:
            plain = self.transport.receive(data)
        except TransportClosed as e:
            self.write(b"")              # a TLS alert, if any
            raise HandshakeFailed(str(e)) from None
        if plain:
            self._feed(plain)
        elif not data:
            self.protocol.receive_eof()
        return self._request(ended=not data or self.transport.ended)

    def _feed(self, plain: bytes) -> None:
        """Give the protocol the request's head, and no byte past its end."""
        if self._head_done:
            self.rest += plain
            return
        seen = self._tail + plain
        end = seen.find(_HEAD_END)
        if end < 0:
            self._count_head(len(plain))
            self._tail = seen[-(len(_HEAD_END) - 1):]
            self.protocol.receive_data(plain)
            return
        cut = end + len(_HEAD_END) - len(self._tail)     # in plain
        self._count_head(cut)
        self._head_done = True
        self.rest = plain[cut:]
        self.protocol.receive_data(plain[:cut])

    def _count_head(self, size: int) -> None:
        """`size` more bytes of the head: past MAX_REQUEST_HEAD, a 431 and
        HandshakeFailed (nothing more is held for it)."""
        self._head_size += size
        if self._head_size > MAX_REQUEST_HEAD:
            why = f"request head over {MAX_REQUEST_HEAD} bytes"
            self.write(responses.error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                       why).serialize())
            raise HandshakeFailed(why)

    def _request(self, ended: bool) -> Optional[Request]:
        for event in self.protocol.events_received():
            if isinstance(event, Request):
                return event
        error = self.protocol.handshake_exc
        if error is not None:
            why = f"{error}: {error.__cause__}" if error.__cause__ else str(error)
            # websockets answered a too long request itself; else we say why.
            sent = b"".join(self.protocol.data_to_send())
            self.write(sent or responses.error(HTTPStatus.BAD_REQUEST, why).serialize())
            raise HandshakeFailed(why)
        if ended:
            raise HandshakeFailed("closed before its request was complete")
        self.write(b"")                  # TLS handshake records, if any
        return None

    def respond(self, response: Response) -> None:
        """Send the response (the protocol closes after any but a 101)."""
        self.protocol.send_response(response)
        self.flush()

    def flush(self) -> None:
        """Write what the protocol has to send (websockets marks the end
        of a refused connection with an empty chunk, skipped here)."""
        self.write(b"".join(self.protocol.data_to_send()))

    def write(self, plain: bytes) -> None:
        """Write `plain` (through TLS), without blocking.

        Handshake replies are small (a 101 is ~150 bytes, a TLS flight a few
        KiB, the static files under 16 KiB) and are the first bytes on a new
        socket, so its send buffer takes them whole; a client that leaves it
        full is broken or hostile and is dropped (HandshakeFailed)."""
        data = self.transport.send(plain)
        while data:
            try:
                n = send_now(self.fd, data)       # no SIGPIPE from a reset client
            except InterruptedError:
                continue
            except BlockingIOError:
                raise HandshakeFailed("the client does not read its handshake "
                                      "reply") from None
            except OSError as e:
                raise HandshakeFailed(f"write failed: {e.strerror}") from None
            data = data[n:]
