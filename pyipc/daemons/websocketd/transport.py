"""The byte layer under the WebSocket protocol: plain TCP, or TLS (wss://).

TLS is the standard library's `ssl` without I/O (an SSLObject over two
MemoryBIOs): websocketd reads and writes the socket itself, inside pyipc's
event loop and switching callbacks, and hands the bytes through here. So a
wss:// connection needs no thread and no blocking handshake, and the same
code serves ws:// and wss://.
"""

from __future__ import annotations

import ssl
from typing import Optional


class TransportClosed(Exception):
    """The peer ended TLS (close_notify) or sent something TLS refuses."""


class Plain:
    """ws://: bytes pass unchanged."""

    __slots__ = ()

    handshake_done = True
    #: (TLS's end comes with the socket's for plain TCP.)
    ended = False

    def receive(self, data: bytes) -> bytes:
        """Bytes read from the socket -> bytes for the WebSocket protocol."""
        return data

    def send(self, data: bytes) -> bytes:
        """Bytes of the WebSocket protocol -> bytes to write to the socket."""
        return data

    def pending(self) -> bytes:
        """Bytes the layer itself has to write (none for plain TCP)."""
        return b""


class Tls:
    """wss://: a TLS session driven by the bytes given to it. Server side
    (an accepted client), or client side when `server_hostname` is given (a
    dial: the remote's certificate is checked as `context` says, and its
    name against server_hostname when the context checks host names)."""

    __slots__ = ("_obj", "_in", "_out", "handshake_done", "ended")

    def __init__(self, context: ssl.SSLContext, server_hostname: Optional[str] = None) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=server_hostname is None,
                                     server_hostname=server_hostname)
        self.handshake_done = False
        #: The peer ended TLS (close_notify, or EOF) right after the plaintext
        #: the last receive() returned: the caller takes that as the end.
        self.ended = False

    def begin(self) -> bytes:
        """A client's first flight (its ClientHello): what to write first."""
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self._out.read()

    def receive(self, data: bytes) -> bytes:
        """Feed what was read; return the plaintext it completes (maybe b"").
        The handshake's own records to send are then in pending(). The
        peer's end raises TransportClosed, unless plaintext came before it
        in the same bytes: that is returned, with `ended` set."""
        if self.ended:
            raise TransportClosed("the peer ended TLS")
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        try:
            if not self.handshake_done:
                self._obj.do_handshake()
                self.handshake_done = True
            return self._read_all()
        except ssl.SSLWantReadError:
            return b""
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError) as e:
            raise TransportClosed("the peer ended TLS") from e
        except ssl.SSLError as e:
            raise TransportClosed(f"TLS error: {e.reason or e}") from e

    def _read_all(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._obj.read(1 << 16)
                if not chunk:
                    raise ssl.SSLZeroReturnError(ssl.SSL_ERROR_ZERO_RETURN, "close_notify")
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                if not chunks:
                    raise
                # A last message and close_notify in one read (servers close
                # so): the message is not lost with the end.
                self.ended = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, data: bytes) -> bytes:
        """Encrypt `data`; return every record to write (with any pending)."""
        if data:
            self._obj.write(data)
        return self._out.read()

    def pending(self) -> bytes:
        """Records TLS has to write now (handshake flights, alerts)."""
        return self._out.read()


def make_transport(context: Optional[ssl.SSLContext]) -> "Plain | Tls":
    """Plain for ws://, Tls for wss://."""
    return Plain() if context is None else Tls(context)
